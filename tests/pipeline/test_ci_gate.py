"""The CI promotion gate command, run as CI runs it: a subprocess against the real MLflow server.

Exit 0 when the candidate passes, 1 when it fails (reasons printed), 2 for usage errors and an unreachable registry.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cl_core.pipeline.gate import GateRules, decide
from cl_core.pipeline.registry import AdapterRegistry

ROOT = Path(__file__).resolve().parents[2]
CHAMPION = {"heldout_exact": 0.5, "corrections_exact": 0.0, "replay_exact": 0.8, "probe_exact": 0.9}
GOOD = {"heldout_exact": 0.7, "corrections_exact": 1.0, "replay_exact": 0.8, "probe_exact": 0.9}
FORGETFUL = {"heldout_exact": 0.8, "corrections_exact": 1.0, "replay_exact": 0.5, "probe_exact": 0.9}


def gate(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "cl_core.pipeline", "gate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def register(registry: AdapterRegistry, tmp: Path, candidate: dict, champion: dict | None,
             parent: int | None) -> int:
    adapter = tmp / uuid.uuid4().hex
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(os.urandom(256))
    made = registry.log_candidate({}, {"candidate": candidate, "champion": champion}, adapter,
                                  decision=decide(candidate, champion, GateRules()),
                                  lineage={"base_model": "tiny", "parent_version": parent})
    return made.version


@pytest.fixture(scope="module")
def history(mlflow_service: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """v1 champion (promoted), v2 a good challenger trained from v1, v3 a forgetful one; plus a model with
    nothing promoted yet whose only version carries the base model's numbers."""
    tmp = tmp_path_factory.mktemp("ci-gate")
    name = f"ci-{uuid.uuid4().hex[:8]}"
    registry = AdapterRegistry(mlflow_service, model_name=name, experiment=name)
    base = {"heldout_exact": 0.2, "corrections_exact": 0.0, "replay_exact": 0.8, "probe_exact": 0.9}
    assert register(registry, tmp, CHAMPION, base, parent=None) == 1
    registry.set_alias(1, "champion")
    assert register(registry, tmp, GOOD, CHAMPION, parent=1) == 2
    assert register(registry, tmp, FORGETFUL, CHAMPION, parent=1) == 3
    assert registry.version_for("challenger") == 2  # v3 was rejected by the pipeline's own gate

    fresh = AdapterRegistry(mlflow_service, model_name=f"{name}-fresh", experiment=name)
    register(fresh, tmp, GOOD, base, parent=None)
    return mlflow_service, name


@pytest.mark.integration
def test_good_challenger_passes(history):
    uri, name = history
    result = gate("--tracking-uri", uri, "--model", name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gate PASSED" in result.stdout and "candidate v2 (challenger) vs v1" in result.stdout
    assert "head-to-head" in result.stdout and "heldout_gain 0.2 >= 0" in result.stdout


@pytest.mark.integration
def test_forgetful_candidate_fails_with_reasons(history, tmp_path):
    uri, name = history
    result = gate("--tracking-uri", uri, "--model", name, "--candidate", "3", "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    decision = json.loads(result.stdout)
    assert decision["passed"] is False and decision["candidate"]["version"] == 3
    assert decision["champion"]["version"] == 1
    assert decision["reasons"] == ["retention_drop 0.3 > 0.05 (replay_exact candidate 0.5 vs champion 0.8)"]

    # the same candidate passes under rules from a YAML file that tolerate the drop
    rules = tmp_path / "pipeline.yaml"
    rules.write_text("model_name: x\ngate:\n  max_retention_drop: 0.5\n")
    relaxed = gate("--tracking-uri", uri, "--model", name, "--candidate", "3", "--rules", str(rules))
    assert relaxed.returncode == 0, relaxed.stdout + relaxed.stderr

    summary = tmp_path / "summary.md"
    summary.write_text("# earlier step\n")
    plain = gate("--tracking-uri", uri, "--model", name, "--candidate", "3", "--json-out", str(tmp_path / "d.json"),
                 "--markdown-out", str(summary))
    assert plain.returncode == 1 and "gate REJECTED" in plain.stdout and "rejected because:" in plain.stdout
    assert "retention_drop 0.3 > 0.05" in plain.stdout
    assert json.loads((tmp_path / "d.json").read_text())["reasons"] == decision["reasons"]
    markdown = summary.read_text()
    assert markdown.startswith("# earlier step\n### Promotion gate:") and "| retention_drop | 0.3 | 0.05 | FAIL |" \
        in markdown


@pytest.mark.integration
def test_champion_own_run_metrics(history):
    uri, name = history
    # v1's own run measured heldout 0.5; against those numbers v2 (0.7) still passes
    result = gate("--tracking-uri", uri, "--model", name, "--champion-metrics", "run", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    out = json.loads(result.stdout)
    assert out["champion_metrics"].startswith("champion v1's own run")
    assert out["derived"]["heldout_gain"] == pytest.approx(0.2)


@pytest.mark.integration
def test_no_champion_yet_uses_the_logged_baseline(history):
    uri, name = history
    result = gate("--tracking-uri", uri, "--model", f"{name}-fresh")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "vs no champion" in result.stdout and "baseline numbers logged with candidate v1" in result.stdout


@pytest.mark.integration
def test_usage_errors_exit_2(history, tmp_path):
    uri, name = history
    missing = gate("--tracking-uri", uri, "--model", f"{name}-none")
    assert missing.returncode == 2 and "has no alias 'challenger'" in missing.stderr
    same = gate("--tracking-uri", uri, "--model", name, "--candidate", "1")
    assert same.returncode == 2 and "same version (1)" in same.stderr
    no_version = gate("--tracking-uri", uri, "--model", name, "--candidate", "99")
    assert no_version.returncode == 2 and "has no version 99" in no_version.stderr
    bad_rules = tmp_path / "bad.yaml"
    bad_rules.write_text("gate:\n  min_gain: 0.1\n")
    bad = gate("--tracking-uri", uri, "--model", name, "--rules", str(bad_rules))
    assert bad.returncode == 2 and "unknown key(s) min_gain; known keys: min_heldout_gain" in bad.stderr
    no_section = tmp_path / "nogate.yaml"
    no_section.write_text("model_name: x\n")
    assert gate("--rules", str(no_section)).returncode == 2
    assert gate("--candidate").returncode == 2  # argparse usage error


def test_unreachable_registry_exits_2_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    result = gate("--tracking-uri", f"http://127.0.0.1:{port}", "--attempts", "2")
    assert result.returncode == 2
    assert f"MLflow registry at http://127.0.0.1:{port} is unavailable" in result.stderr
    assert time.monotonic() - start < 30
