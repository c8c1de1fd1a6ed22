"""Prefect: the server (API, UI, scheduler) and a process worker that runs the scheduled deployments.

The server keeps its SQLite database under `PREFECT_HOME` in the state directory, so deployments, schedules and
run history survive a restart. The worker polls the process work pool `cl-local` (created idempotently before the
worker starts) and runs each flow run as a subprocess with the worker's environment: the stack hands it the whole
environment contract (S3, MLflow, vLLM), so flow runs reach the same services as everything else. Its health is
Prefect's own worker health-check server (`--with-healthcheck`), bound to loopback on its own port.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from cl_core.stack.service import Service, StackError, executable, http_ok

DEFAULT_WORK_POOL = "cl-local"
# cl_core's own log lines (training phases, adapter loads, registry retries, skipped S3 objects) belong in the
# flow run's log in the Prefect UI, next to Prefect's; Prefect captures only the loggers it is told about.
# A line logged from a thread without a run context (the learner's publish thread) stays on the console instead of
# warning that it cannot reach the API.
LOGGING_ENV = {"PREFECT_LOGGING_EXTRA_LOGGERS": "cl_core", "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"}


def _prefect_env(home: Path, api_url: str | None) -> dict[str, str]:
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PYTHONUNBUFFERED": "1", **LOGGING_ENV}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


class PrefectServer(Service):
    """`prefect server start` on 127.0.0.1; healthy when GET /api/health answers."""

    name = "prefect"
    port_env = "CL_PREFECT_PORT"
    start_timeout = 120.0
    stop_grace = 10.0

    def __init__(self, state_dir: Path, port: int) -> None:
        super().__init__(state_dir, port)
        self.home = self.state_dir / "prefect"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)

    def environment(self) -> dict[str, str]:
        # PREFECT_API_URL must not point at another server while this one starts; the UI uses this value
        return {**_prefect_env(self.home, None), "PREFECT_API_URL": "", "PREFECT_UI_API_URL": self.api_url,
                "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(self.port)}

    def command(self) -> list[str]:
        return [executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                "--analytics-off"]

    def healthy(self) -> bool:
        return http_ok(f"{self.api_url}/health")


class PrefectWorker(Service):
    """`prefect worker start --pool cl-local --type process --with-healthcheck`; healthy when its /health answers.

    `env` is what flow runs need (the environment contract); `cwd` is where flow runs start (the repository, so
    deployments that import `flows.*` find them).
    """

    name = "worker"
    port_env = "CL_PREFECT_WORKER_PORT"
    start_timeout = 90.0
    stop_grace = 15.0

    def __init__(self, state_dir: Path, port: int, api_url: str, pool: str = DEFAULT_WORK_POOL,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        super().__init__(state_dir, port)
        self.api_url = api_url
        self.pool = pool
        self.extra_env = dict(env or {})
        self.home = self.state_dir / "prefect"
        if cwd is not None:
            self.cwd = Path(cwd)

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        ensure_work_pool(self.api_url, self.pool)

    def environment(self) -> dict[str, str]:
        return {**self.extra_env, **_prefect_env(self.home, self.api_url),
                "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1", "PREFECT_WORKER_WEBSERVER_PORT": str(self.port)}

    def command(self) -> list[str]:
        return [executable("prefect"), "worker", "start", "--pool", self.pool, "--type", "process",
                "--name", f"{self.pool}-worker", "--with-healthcheck"]

    def healthy(self) -> bool:
        return http_ok(f"{self.url}/health")


def ensure_work_pool(api_url: str, pool: str, pool_type: str = "process") -> None:
    """Create the work pool unless it exists; an existing pool of another type is an error (it would not run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type=pool_type))
            return
    if existing.type != pool_type:
        raise StackError(f"work pool {pool!r} exists with type {existing.type!r}, the stack's worker needs "
                         f"{pool_type!r}: delete it (`prefect work-pool delete {pool}`) or set CL_PREFECT_POOL")
