"""The local stack on loopback: SeaweedFS (S3), an MLflow server, a Prefect server and worker, a vLLM server.

`python -m cl_core.stack up|down|status` (or `infra/stack.sh`) runs it; the same `Service` classes give
the test suite real services on free ports (tests/pipeline/conftest.py).
"""

from cl_core.stack.mlflow_server import MLflowServer
from cl_core.stack.prefect_server import PrefectServer, PrefectWorker, ensure_work_pool
from cl_core.stack.seaweedfs import S3Endpoint, SeaweedFS, ensure_buckets
from cl_core.stack.service import (
    PortInUseError,
    Service,
    ServiceStartError,
    StackError,
    free_port,
    free_port_block,
    port_is_free,
)
from cl_core.stack.stack import SERVICES, Stack, StackConfig
from cl_core.stack.vllm_server import SERVED_MODEL_NAME, VLLMServer

__all__ = [
    "SERVED_MODEL_NAME",
    "SERVICES",
    "MLflowServer",
    "PortInUseError",
    "PrefectServer",
    "PrefectWorker",
    "S3Endpoint",
    "SeaweedFS",
    "Service",
    "ServiceStartError",
    "Stack",
    "StackConfig",
    "StackError",
    "VLLMServer",
    "ensure_buckets",
    "ensure_work_pool",
    "free_port",
    "free_port_block",
    "port_is_free",
]
