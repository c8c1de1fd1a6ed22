"""AdapterRegistry against a real MLflow server whose artifacts land in real S3 (SeaweedFS).

What a user checks: the registered version, its tags/metrics/params, artifacts that come back byte-identical, the
aliases, and that an MLflow outage ends in a quick, named `RegistryUnavailable` with nothing half-registered.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from cl_core.pipeline.gate import GateRules, decide
from cl_core.pipeline.registry import AdapterRegistry, RegistryUnavailable, VersionNotFound, flatten_metrics

CANDIDATE = {"heldout_exact": 0.7, "corrections_exact": 1.0, "replay_exact": 0.8, "probe_exact": 0.9,
             "probe_logprob": -0.3}
CHAMPION = {"heldout_exact": 0.5, "corrections_exact": 0.0, "replay_exact": 0.8, "probe_exact": 0.9,
            "probe_logprob": -0.31}


def make_dir(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def adapter(root: Path) -> Path:
    return make_dir(root, {"adapter_config.json": json.dumps({"peft_type": "LORA", "r": 4}).encode(),
                           "adapter_model.safetensors": os.urandom(4096)})


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def registry(mlflow_service: str) -> AdapterRegistry:
    return AdapterRegistry(mlflow_service, model_name=f"adapter-{uuid.uuid4().hex[:8]}",
                           experiment=f"exp-{uuid.uuid4().hex[:8]}")


def free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- tests
@pytest.mark.integration
def test_log_candidate_registers_everything(registry, tmp_path, s3_service):
    adapter_dir = adapter(tmp_path / "adapter")
    checkpoint = make_dir(tmp_path / "ckpt", {"config.json": b"{}", "adapters/v3/adapter_model.safetensors":
                                              os.urandom(2048), "store.db": os.urandom(512)})
    docs = make_dir(tmp_path / "docs", {"index.html": b"<html>validation</html>"})
    gx = {"success": True, "statistics": {"evaluated_expectations": 7, "unsuccessful_expectations": 0}}
    decision = decide(CANDIDATE, CHAMPION, GateRules())
    lineage = {"base_model": "tiny-llama", "base_model_fingerprint": "sha256:abc", "watermark": "2026-11-24T05",
               "s3_objects": 12, "parent_version": None}

    made = registry.log_candidate({"lora_rank": 4, "learning_rate": 1e-3}, {"candidate": CANDIDATE,
                                  "champion": CHAMPION, "train.loss": 0.25}, adapter_dir,
                                  checkpoint_dir=checkpoint, gx_result=gx, data_docs_dir=docs, decision=decision,
                                  lineage=lineage, tags={"flow_run": "abc"}, run_name="candidate-test")

    assert made.version == 1
    assert made.run_url == f"{registry.tracking_uri}/#/experiments/{registry.experiment_id()}/runs/{made.run_id}"
    assert made.version_url == f"{registry.tracking_uri}/#/models/{registry.model_name}/versions/1"
    assert requests.get(registry.tracking_uri + "/health", timeout=5).ok
    info = registry.get(made.version)
    assert info.run_id == made.run_id and info.source.endswith("/adapter")
    assert info.tags["gate"] == "passed" and info.tags["base_model"] == "tiny-llama"
    assert info.tags["parent_version"] == "none" and info.tags["watermark"] == "2026-11-24T05"
    assert info.tags["flow_run"] == "abc" and info.aliases == ("challenger",)
    assert info.metrics_of("candidate") == pytest.approx(CANDIDATE)
    assert info.metrics_of("champion") == pytest.approx(CHAMPION)
    assert info.metrics["heldout_gain"] == pytest.approx(0.2) and info.metrics["train.loss"] == 0.25
    assert info.metrics["forgetting"] == pytest.approx(0.0)
    assert info.params["lora_rank"] == "4" and info.params["lineage.s3_objects"] == "12"
    assert info.params["lineage.base_model_fingerprint"] == "sha256:abc"
    assert info.run_tags["lineage.watermark"] == "2026-11-24T05"

    got = registry.download_adapter(made.version, tmp_path / "served" / "v1")
    assert tree(got) == tree(adapter_dir)
    got_ckpt = registry.download_checkpoint(made.version, tmp_path / "restore")
    assert got_ckpt is not None and tree(got_ckpt) == tree(checkpoint)
    assert registry.read_decision(made.version) == json.loads(json.dumps(decision.to_dict()))
    run_artifacts = registry.client.list_artifacts(made.run_id, "validation")
    assert {a.path for a in run_artifacts} == {"validation/gx_result.json", "validation/data_docs"}

    # the bytes live in S3, under the run, not on the MLflow server's disk
    s3 = s3_service.client()
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow")
            for o in page.get("Contents", [])]
    assert any(made.run_id in k and k.endswith("adapter/adapter_model.safetensors") for k in keys)
    assert any(made.run_id in k and k.endswith("checkpoint/adapters/v3/adapter_model.safetensors") for k in keys)

    with pytest.raises(FileExistsError, match="overwrite=True"):
        registry.download_adapter(made.version, got)
    assert tree(registry.download_adapter(made.version, got, overwrite=True)) == tree(adapter_dir)


@pytest.mark.integration
def test_aliases_rejections_and_versions(registry, tmp_path):
    assert registry.version_for("champion") is None and registry.versions() == []
    lineage = {"base_model": "tiny", "watermark": "w1"}
    first = registry.log_candidate({}, {"candidate": CANDIDATE, "champion": CHAMPION}, adapter(tmp_path / "a1"),
                                   decision=decide(CANDIDATE, CHAMPION, GateRules()), lineage=lineage)
    worse = dict(CANDIDATE, replay_exact=0.5)
    rejected = decide(worse, CHAMPION, GateRules())
    second = registry.log_candidate({}, {"candidate": worse, "champion": CHAMPION}, adapter(tmp_path / "a2"),
                                    decision=rejected.to_dict(), lineage={**lineage, "parent_version": 1})
    pending = registry.log_candidate({}, {"candidate.heldout_exact": 0.1}, adapter(tmp_path / "a3"),
                                     lineage=lineage)

    assert registry.get(second.version).tags["gate"] == "rejected"
    assert registry.get(pending.version).tags["gate"] == "pending"
    assert registry.version_for("challenger") == first.version  # a rejected candidate never becomes challenger
    assert registry.download_checkpoint(first.version, tmp_path / "none") is None
    assert registry.read_decision(pending.version) is None

    registry.set_alias(first.version, "champion")
    assert registry.version_for("champion") == first.version and registry.resolve("champion") == first.version
    registry.set_alias(second.version, "champion")  # moving it (rollback works the same way)
    assert registry.version_for("champion") == second.version
    registry.clear_alias("challenger")
    registry.clear_alias("challenger")
    assert registry.version_for("challenger") is None
    registry.mark(first.version, {"promoted_at": "2026-11-24T05:00:00Z", "promotion": "rolled back"})
    assert registry.get(first.version).tags["promotion"] == "rolled back"

    listed = registry.versions()
    assert [v.version for v in listed] == [1, 2, 3]
    assert [v.gate for v in listed] == ["passed", "rejected", "pending"]
    assert listed[1].aliases == ("champion",)

    with pytest.raises(VersionNotFound, match="has no version 42"):
        registry.get(42)
    with pytest.raises(VersionNotFound, match="has no alias 'canary'; aliases set: champion"):
        registry.resolve("canary")
    with pytest.raises(VersionNotFound):
        registry.set_alias(42, "champion")
    with pytest.raises(ValueError, match="not 'latest'"):
        registry.set_alias(first.version, "latest")


@pytest.mark.integration
def test_idempotency_key_returns_the_existing_version(registry, tmp_path):
    args = ({}, {"candidate": CANDIDATE}, adapter(tmp_path / "a"))
    one = registry.log_candidate(*args, lineage={"base_model": "tiny"}, idempotency_key="flow-run-1")
    again = registry.log_candidate(*args, lineage={"base_model": "tiny"}, idempotency_key="flow-run-1")
    other = registry.log_candidate(*args, lineage={"base_model": "tiny"}, idempotency_key="flow-run-2")
    assert again == one and other.version == one.version + 1


def test_bad_input_is_named_before_any_server_call(tmp_path):
    registry = AdapterRegistry(f"http://127.0.0.1:{free_closed_port()}", max_attempts=1)
    incomplete = make_dir(tmp_path / "half", {"adapter_config.json": b"{}"})
    with pytest.raises(FileNotFoundError, match="missing: adapter_model.safetensors"):
        registry.log_candidate({}, {"candidate": CANDIDATE}, incomplete, lineage={"base_model": "x"})
    with pytest.raises(ValueError, match="lineage needs `base_model`"):
        registry.log_candidate({}, {"candidate": CANDIDATE}, adapter(tmp_path / "a"), lineage={})
    with pytest.raises(ValueError, match="no candidate metrics"):
        registry.log_candidate({}, {"loss": 1.0}, adapter(tmp_path / "a"), lineage={"base_model": "x"})
    with pytest.raises(ValueError, match="must be a GateDecision or a dict with a boolean `passed`"):
        registry.log_candidate({}, {"candidate": CANDIDATE}, adapter(tmp_path / "a"), lineage={"base_model": "x"},
                               decision={"verdict": "passed"})
    with pytest.raises(ValueError, match="model_name"):
        AdapterRegistry("http://127.0.0.1:1", model_name="bad'name")


def test_flatten_metrics_forms_agree():
    nested = flatten_metrics({"candidate": CANDIDATE, "champion": CHAMPION, "records": 10})
    flat = flatten_metrics({**{f"candidate.{k}": v for k, v in CANDIDATE.items()},
                            **{f"champion.{k}": v for k, v in CHAMPION.items()}, "records": 10,
                            "heldout_gain": 99.0})  # a stale derived value is recomputed
    assert nested == flat and nested["heldout_gain"] == pytest.approx(0.2) and nested["records"] == 10


def test_outage_fails_fast_with_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{free_closed_port()}"
    registry = AdapterRegistry(uri, max_attempts=3, backoff_s=0.2)
    mlflow_env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP_")}
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable) as info:
        registry.log_candidate({}, {"candidate": CANDIDATE}, adapter(tmp_path / "a"), lineage={"base_model": "x"})
    elapsed = time.monotonic() - start
    assert elapsed < 30 and elapsed >= 0.2 + 0.4  # it did back off between its 3 attempts
    assert uri in str(info.value) and "failed 3 times" in str(info.value) and info.value.uri == uri
    with pytest.raises(RegistryUnavailable):
        registry.version_for("champion")
    # MLflow's own retry settings are pinned only during the registry's calls, then restored
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP_")} == mlflow_env


# ------------------------------------------------------------------------- transient failures through a proxy
class FlakyProxy:
    """A reverse proxy in front of the real MLflow server that answers 503 to requests `fail(method, path)` picks."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.fail: Callable[[str, str], bool] = lambda method, path: False
        self.seen: list[tuple[str, str, int]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.fail(self.command, self.path):
                    proxy.seen.append((self.command, self.path, 503))
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = requests.request(self.command, proxy.upstream + self.path, data=body, headers=headers,
                                     timeout=30)
                proxy.seen.append((self.command, self.path, r.status_code))
                self.send_response(r.status_code)
                for key, value in r.headers.items():
                    if key.lower() not in ("content-length", "content-encoding", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky(mlflow_service: str) -> Iterator[FlakyProxy]:
    proxy = FlakyProxy(mlflow_service)
    yield proxy
    proxy.close()


@pytest.mark.integration
def test_transient_5xx_is_retried_then_succeeds(flaky, tmp_path):
    registry = AdapterRegistry(flaky.url, model_name=f"adapter-{uuid.uuid4().hex[:8]}",
                               experiment=f"exp-{uuid.uuid4().hex[:8]}", backoff_s=0.1)
    budget = {"left": 2}

    def first_two(method: str, path: str) -> bool:
        budget["left"] -= 1
        return budget["left"] >= 0

    flaky.fail = first_two
    made = registry.log_candidate({}, {"candidate": CANDIDATE}, adapter(tmp_path / "a"),
                                  lineage={"base_model": "tiny"})
    assert [status for _, _, status in flaky.seen[:2]] == [503, 503]
    assert registry.get(made.version).metrics_of("candidate") == pytest.approx(CANDIDATE)


@pytest.mark.integration
def test_artifact_store_outage_leaves_a_failed_run_and_no_version(flaky, tmp_path):
    registry = AdapterRegistry(flaky.url, model_name=f"adapter-{uuid.uuid4().hex[:8]}",
                               experiment=f"exp-{uuid.uuid4().hex[:8]}", max_attempts=2, backoff_s=0.1)
    flaky.fail = lambda method, path: method == "PUT" and "/mlflow-artifacts/" in path
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="log adapter failed 2 times"):
        registry.log_candidate({}, {"candidate": CANDIDATE}, adapter(tmp_path / "a"), lineage={"base_model": "x"})
    assert time.monotonic() - start < 30
    flaky.fail = lambda method, path: False
    assert registry.versions() == []
    runs = registry.client.search_runs([registry.experiment_id()])
    assert [run.info.status for run in runs] == ["FAILED"]
