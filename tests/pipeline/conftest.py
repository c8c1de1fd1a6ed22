"""Real services for the pipeline tests, on free loopback ports in temporary directories.

Each session fixture starts its service only when a test asks for it, waits until it is healthy, and stops its
whole process group at the end of the session (if pytest itself is killed, Linux sends the server SIGTERM). They
use the stack's own `Service` classes (`cl_core.stack`), so the tests exercise the same
start/health/stop code as `infra/stack.sh`.

- `s3_service`     -> `S3Endpoint`: endpoint_url, access_key, secret_key, region, client() (SeaweedFS)
- `s3_bucket`      -> (bucket_name, boto3 client): a fresh, empty bucket per test, removed afterwards
- `mlflow_service` -> tracking URI (str) of an MLflow server: SQLite backend, artifacts proxied to S3
- `vllm_server`    -> `VLLMServerInfo`: base_url (server root), openai_url (root + /v1), model_path, adapter_dir,
                      served_model_name ("base"); the tiny random model, LoRA + runtime updating + dev mode on
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cl_core.stack import (
    SERVED_MODEL_NAME,
    MLflowServer,
    PortInUseError,
    S3Endpoint,
    SeaweedFS,
    Service,
    ServiceStartError,
    VLLMServer,
    ensure_buckets,
    free_port,
    free_port_block,
)
from cl_core.stack.seaweedfs import PORT_BLOCK

MLFLOW_ARTIFACTS_BUCKET = "mlflow"


@dataclass(frozen=True)
class VLLMServerInfo:
    """A running vLLM OpenAI server. `base_url` is the server root, the form `CL_VLLM_URLS` uses."""

    base_url: str
    openai_url: str
    model_path: Path
    adapter_dir: Path
    served_model_name: str
    port: int


def _start(make: callable, attempts: int = 3) -> Service:
    """Start a service on freshly chosen ports; another process may grab a port between choice and bind."""
    last: Exception | None = None
    for _ in range(attempts):
        service = make()
        service.die_with_parent = True  # a killed pytest leaves no servers behind
        try:
            service.start()
            service.wait_healthy()
            return service
        except (PortInUseError, ServiceStartError) as exc:
            service.stop(grace=2)
            last = exc
            if isinstance(exc, ServiceStartError) and "address already in use" not in exc.log_tail.lower():
                break
    raise last  # type: ignore[misc]


@pytest.fixture(scope="session")
def s3_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint]:
    state = tmp_path_factory.mktemp("s3-service")
    service = _start(lambda: SeaweedFS(state, free_port_block(PORT_BLOCK)))
    try:
        yield service.endpoint
    finally:
        service.stop(grace=5)


@pytest.fixture
def s3_bucket(s3_service: S3Endpoint) -> Iterator[tuple[str, object]]:
    client = s3_service.client()
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name, client
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys})
        client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def mlflow_service(s3_service: S3Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    ensure_buckets(s3_service, [MLFLOW_ARTIFACTS_BUCKET])
    state = tmp_path_factory.mktemp("mlflow-service")
    service = _start(lambda: MLflowServer(state, free_port(), s3_service,
                                          artifacts_destination=f"s3://{MLFLOW_ARTIFACTS_BUCKET}/mlflow"))
    try:
        yield service.url
    finally:
        service.stop(grace=5)


@pytest.fixture(scope="session")
def vllm_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServerInfo]:
    state = tmp_path_factory.mktemp("vllm-service")
    adapter_dir = tmp_path_factory.mktemp("vllm-adapters")
    service = _start(lambda: VLLMServer(state, free_port(), model=str(tiny_model_dir), dtype="float32",
                                        max_model_len=256, max_lora_rank=16, max_loras=4, kv_cache_gib=0.25))
    try:
        yield VLLMServerInfo(base_url=service.url, openai_url=service.openai_url, model_path=Path(tiny_model_dir),
                             adapter_dir=adapter_dir, served_model_name=SERVED_MODEL_NAME, port=service.port)
    finally:
        service.stop(grace=10)
