"""MLflow tracking server: SQLite backend store in the state directory, artifacts proxied to S3.

`--serve-artifacts` with `--artifacts-destination s3://<bucket>/<prefix>` makes the server the only thing that
talks to S3 for artifacts: clients log through `mlflow-artifacts:/` URIs over HTTP, so they need the tracking URI
only (the same as with a production server). The server gets the S3 endpoint and keys through MLflow's and boto3's
standard variables (`MLFLOW_S3_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...).

MLflow 3 guards against DNS rebinding with a Host-header allow list; it is set explicitly to the loopback names on
the server's own port so clients using either `127.0.0.1` or `localhost` are accepted and nothing else is.
"""

from __future__ import annotations

from pathlib import Path

from cl_core.stack.seaweedfs import S3Endpoint
from cl_core.stack.service import Service, executable, http_ok


class MLflowServer(Service):
    """`mlflow server` on 127.0.0.1; healthy when GET /health answers 200."""

    name = "mlflow"
    port_env = "CL_MLFLOW_PORT"
    start_timeout = 120.0
    stop_grace = 10.0

    def __init__(self, state_dir: Path, port: int, s3: S3Endpoint, artifacts_destination: str,
                 backend_store_uri: str | None = None, workers: int = 1) -> None:
        super().__init__(state_dir, port)
        if not artifacts_destination.startswith("s3://"):
            raise ValueError(f"artifacts_destination must be an s3:// URI, got {artifacts_destination!r}")
        self.s3 = s3
        self.artifacts_destination = artifacts_destination
        self.data_dir = self.state_dir / "mlflow"
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.data_dir / 'mlflow.db'}"
        self.workers = workers

    @property
    def artifacts_bucket(self) -> str:
        return self.artifacts_destination[len("s3://"):].split("/", 1)[0]

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def environment(self) -> dict[str, str]:
        return {"MLFLOW_S3_ENDPOINT_URL": self.s3.endpoint_url, "AWS_ACCESS_KEY_ID": self.s3.access_key,
                "AWS_SECRET_ACCESS_KEY": self.s3.secret_key, "AWS_DEFAULT_REGION": self.s3.region,
                # job execution (GenAI scorers, prompt optimization) spawns ~7 huey consumers; the pipeline uses
                # tracking and the registry only, and the machine has 2 cores
                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "PYTHONUNBUFFERED": "1"}

    def command(self) -> list[str]:
        hosts = ",".join(f"{h}:{self.port}" for h in ("127.0.0.1", "localhost")) + ",127.0.0.1,localhost"
        return [
            executable("mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", self.backend_store_uri, "--serve-artifacts",
            "--artifacts-destination", self.artifacts_destination, "--workers", str(self.workers),
            "--allowed-hosts", hosts,
        ]

    def healthy(self) -> bool:
        return http_ok(f"{self.url}/health")
