"""The local stack (`python -m cl_core.stack`) against real services on free loopback ports.

One stack (S3, MLflow, Prefect server + worker) is brought up for the module; tests then check what a person
relies on: a second `up` is harmless, `status` tells the truth, env.sh configures clients, a dead service is
restarted alone, S3 data survives a restart, a taken port or a broken model is reported by name with its log, and
`down` leaves nothing running.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cl_core.stack import Stack, StackConfig, free_port, free_port_block
from cl_core.stack.seaweedfs import PORT_BLOCK
from cl_core.stack.service import pid_alive, session_members

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CORE = ["s3", "mlflow", "prefect", "worker"]


def _config(state: Path) -> StackConfig:
    s3 = free_port_block(PORT_BLOCK)
    block = set(range(s3, s3 + PORT_BLOCK))
    others: list[int] = []
    while len(others) < 5:
        port = free_port(exclude=block | set(others))
        others.append(port)
    mlflow, prefect, worker, vllm, gateway = others
    return StackConfig(state_dir=state, s3_port=s3, mlflow_port=mlflow, prefect_port=prefect, worker_port=worker,
                       vllm_port=vllm, gateway_port=gateway, adapter_dir=state / "adapters")


def _cli(config: StackConfig, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess, configured through the environment variables only."""
    env = {**os.environ, "CL_STACK_DIR": str(config.state_dir), "CL_S3_PORT": str(config.s3_port),
           "CL_MLFLOW_PORT": str(config.mlflow_port), "CL_PREFECT_PORT": str(config.prefect_port),
           "CL_PREFECT_WORKER_PORT": str(config.worker_port), "CL_VLLM_PORT": str(config.vllm_port),
           "CL_GATEWAY_PORT": str(config.gateway_port), "CL_ADAPTER_DIR": str(config.adapter_dir),
           "CL_VLLM_MODEL": config.vllm_model}
    return subprocess.run([sys.executable, "-m", "cl_core.stack", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _pids(stack: Stack) -> dict[str, int | None]:
    return {name: svc.pid() for name, svc in stack.services().items() if name in CORE}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(_config(tmp_path_factory.mktemp("stack")), log=lambda _: None)
    result = stack.up(CORE)
    try:
        assert result.ok, [f"{o.service}: {o.detail}" for o in result.failures()]
        yield stack
    finally:
        stack.down()


def test_up_starts_every_service_healthy_and_writes_env(stack: Stack) -> None:
    assert [name for name, state, pid, _ in stack.status(CORE) if state == "healthy" and pid] == CORE
    assert stack.services()["vllm"].status() == "stopped"
    env = subprocess.run(["bash", "-c", f"source {stack.config.env_path} && env"], capture_output=True, text=True,
                         check=True).stdout
    values = dict(line.split("=", 1) for line in env.splitlines() if "=" in line)
    c = stack.config
    assert values["CL_S3_ENDPOINT"] == f"http://127.0.0.1:{c.s3_port}" == values["MLFLOW_S3_ENDPOINT_URL"]
    assert values["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{c.mlflow_port}"
    assert values["PREFECT_API_URL"] == f"http://127.0.0.1:{c.prefect_port}/api"
    assert values["CL_VLLM_URLS"] == f"http://127.0.0.1:{c.vllm_port}"
    assert values["CL_S3_BUCKET"] == "cl-experiences" and values["CL_S3_PREFIX"] == ""
    assert values["CL_ADAPTER_DIR"] == str(c.adapter_dir) and c.adapter_dir.is_dir()
    assert values["PREFECT_LOGGING_EXTRA_LOGGERS"] == "cl_core"  # cl_core's log lines in the flow run's log
    assert values["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] == "ignore"
    client = c.s3.client()
    for bucket in ("cl-experiences", "mlflow"):
        client.head_bucket(Bucket=bucket)


def test_clients_configured_by_env_reach_mlflow_with_artifacts_in_s3(stack: Stack, tmp_path: Path) -> None:
    """What env.sh promises: an MLflow client logs an artifact through the server and it lands in the S3 bucket."""
    script = (
        "import mlflow, sys\n"
        "mlflow.set_experiment('stack-test')\n"
        "with mlflow.start_run() as run:\n"
        "    mlflow.log_metric('m', 1.0)\n"
        f"    mlflow.log_artifact({str(tmp_path / 'note.txt')!r})\n"
        "print(run.info.run_id)\n"
    )
    (tmp_path / "note.txt").write_text("adapter lineage")
    out = subprocess.run(["bash", "-c", f"source {stack.config.env_path} && {sys.executable} -c \"$0\"", script],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    run_id = out.stdout.strip().splitlines()[-1]
    keys = [o["Key"] for o in stack.config.s3.client().list_objects_v2(Bucket="mlflow").get("Contents", [])]
    assert any(run_id in k and k.endswith("note.txt") for k in keys), keys


def test_prefect_work_pool_exists_and_worker_polls_it(stack: Stack) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack.services()["prefect"].api_url}), \
            get_client(sync_client=True) as client:
        pool = client.read_work_pool("cl-local")
        workers = client.read_workers_for_work_pool("cl-local")
    assert pool.type == "process"
    assert any(w.name == "cl-local-worker" for w in workers)


def test_second_up_is_harmless_and_registers_the_deployments(stack: Stack) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = _pids(stack)
    out = _cli(stack.config, "up", "--only", ",".join(CORE))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("already running") == len(CORE)
    assert _pids(stack) == before
    assert "deployments registered on work pool cl-local" in out.stdout
    with temporary_settings(updates={PREFECT_API_URL: stack.services()["prefect"].api_url}), \
            get_client(sync_client=True) as client:
        scheduled = client.read_deployment_by_name("periodic-learning/scheduled")
    assert scheduled.work_pool_name == "cl-local" and scheduled.schedules
    status = _cli(stack.config, "status", "--only", ",".join(CORE))
    assert status.returncode == 0 and status.stdout.count("healthy") == len(CORE), status.stdout
    assert _cli(stack.config, "status").returncode == 1  # vllm is not running: status says so


def test_dead_service_is_restarted_alone(stack: Stack) -> None:
    before = _pids(stack)
    os.killpg(before["worker"], signal.SIGKILL)
    for _ in range(50):
        if stack.services()["worker"].status() == "stopped":
            break
        time.sleep(0.1)
    assert stack.services()["worker"].status() == "stopped"
    result = stack.up(CORE)
    assert result.ok
    assert {o.service: o.state for o in result.outcomes} == {"s3": "already running", "mlflow": "already running",
                                                             "prefect": "already running", "worker": "started"}
    after = _pids(stack)
    assert after["worker"] != before["worker"]
    assert {k: v for k, v in after.items() if k != "worker"} == {k: v for k, v in before.items() if k != "worker"}


def test_s3_data_survives_restart(stack: Stack) -> None:
    client = stack.config.s3.client()
    client.put_object(Bucket="cl-experiences", Key="survive/a.jsonl", Body=b'{"prompt": "p"}\n')
    old = stack.services()["s3"].pid()
    assert stack.down(["s3"]) == [("s3", True)]
    assert stack.services()["s3"].status() == "stopped"
    assert stack.up(["s3"]).ok
    assert stack.services()["s3"].pid() != old
    body = stack.config.s3.client().get_object(Bucket="cl-experiences", Key="survive/a.jsonl")["Body"].read()
    assert body == b'{"prompt": "p"}\n'


def test_port_taken_by_another_process_names_port_and_setting(tmp_path: Path) -> None:
    config = _config(tmp_path / "stack")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", config.s3_port))
        squatter.listen()
        out = _cli(config, "up", "--only", "s3,mlflow")
    assert out.returncode == 1
    assert f"port {config.s3_port}" in out.stderr and "CL_S3_PORT" in out.stderr, out.stderr
    assert "mlflow: skipped: needs s3" in out.stderr
    assert _cli(config, "status", "--only", "s3,mlflow").stdout.count("stopped") == 2


def test_bad_settings_are_rejected_before_anything_starts(tmp_path: Path) -> None:
    config = _config(tmp_path / "stack")
    env_cli = _cli(config, "up", "--only", "nosuch")
    assert env_cli.returncode == 2 and "unknown service" in env_cli.stderr and "s3" in env_cli.stderr
    bad_port = subprocess.run([sys.executable, "-m", "cl_core.stack", "status"], cwd=REPO, text=True,
                              capture_output=True, env={**os.environ, "CL_MLFLOW_PORT": "http"})
    assert bad_port.returncode == 2 and "CL_MLFLOW_PORT" in bad_port.stderr


def test_vllm_that_cannot_load_its_model_is_named_with_its_log(tmp_path: Path) -> None:
    """A model directory that looks right (config.json) but holds no weights: vLLM starts, fails, and `up` says
    which service failed, where its log is and what the log ends with, and exits 1 with nothing left running."""
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (model / "model.safetensors").write_bytes(b"not safetensors")
    config = _config(tmp_path / "stack")
    config = dataclasses.replace(config, vllm_model=str(model), vllm_dtype="float32", vllm_max_model_len=256)
    out = _cli(config, "up", "--only", "vllm", timeout=300)
    log = config.state_dir / "logs" / "vllm.log"
    assert out.returncode == 1, out.stdout + out.stderr
    assert "service 'vllm' failed to start" in out.stderr
    assert f"log: {log}" in out.stderr and "last log lines:" in out.stderr
    assert log.is_file() and log.stat().st_size > 0
    rec = config.state_dir / "pids" / "vllm.json"
    assert not rec.exists() or not pid_alive(json.loads(rec.read_text())["pid"])


def test_down_stops_everything_and_is_idempotent(stack: Stack) -> None:
    leaders = _pids(stack)
    assert all(leaders.values())
    stopped = dict(stack.down())
    assert all(stopped[name] for name in CORE) and stopped["vllm"] is False and stopped["gateway"] is False
    for name, pid in leaders.items():
        assert not session_members(pid), f"{name} left processes behind"
        assert stack.services()[name].status() == "stopped"
    assert dict(stack.down()) == dict.fromkeys(stack.services(), False)
    out = _cli(stack.config, "down")
    assert out.returncode == 0 and "stopped" not in out.stdout.replace("not running", "")
