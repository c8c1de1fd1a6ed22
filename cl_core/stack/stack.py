"""The whole local stack: which services, on which ports, started in dependency order, and the client environment.

`StackConfig` says where everything goes (ports, state directory, model), from flags over environment variables
over defaults. `Stack.up` starts what is not already running and healthy — independent services in parallel, the
slow vLLM server first — waits until each is healthy, and writes `<state>/env.sh` with the environment contract that
points every client (pipeline, flows, tests, a shell) at these services. `down` stops what `up` started, by process
group; `status` reports each service.
"""

from __future__ import annotations

import os
import shlex
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from cl_core.bank.manifest import MANIFEST_FILE
from cl_core.stack.gateway import GatewayServer
from cl_core.stack.mlflow_server import MLflowServer
from cl_core.stack.prefect_server import DEFAULT_WORK_POOL, LOGGING_ENV, PrefectServer, PrefectWorker
from cl_core.stack.seaweedfs import S3Endpoint, SeaweedFS
from cl_core.stack.service import Service, ServiceStartError, StackError
from cl_core.stack.vllm_server import VLLMServer

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("s3", "mlflow", "prefect", "worker", "vllm", "gateway")
DEPENDS_ON: dict[str, tuple[str, ...]] = {"s3": (), "mlflow": ("s3",), "prefect": (), "worker": ("prefect",),
                                          "vllm": (), "gateway": ("vllm",)}
MLFLOW_CONFIG_KEYS = {"backend_store", "artifacts_bucket", "artifacts_prefix", "workers"}


@dataclass(frozen=True)
class MLflowSettings:
    """What `mlflow/server.yaml` says (see that file)."""

    backend_store: str = "sqlite"
    artifacts_bucket: str = "mlflow"
    artifacts_prefix: str = "mlflow"
    workers: int = 1

    @classmethod
    def load(cls, path: Path) -> MLflowSettings:
        import yaml

        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise StackError(f"MLflow server config {path} not found; restore mlflow/server.yaml or set "
                             "CL_MLFLOW_SERVER_CONFIG") from None
        if not isinstance(raw, dict):
            raise StackError(f"MLflow server config {path} must be a mapping of settings")
        unknown = set(raw) - MLFLOW_CONFIG_KEYS
        if unknown:
            raise StackError(f"MLflow server config {path}: unknown keys {sorted(unknown)}; known: "
                             f"{sorted(MLFLOW_CONFIG_KEYS)}")
        settings = cls(**raw)
        if not isinstance(settings.workers, int) or settings.workers < 1:
            raise StackError(f"MLflow server config {path}: workers must be an integer >= 1, got {settings.workers!r}")
        return settings


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        port = int(value)
    except ValueError:
        raise StackError(f"{name}={value!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise StackError(f"{name}={value!r} is outside 1-65535")
    return port


@dataclass(frozen=True)
class StackConfig:
    """Ports, paths and the served model. Each field has an environment variable (in `ENV`)."""

    state_dir: Path = REPO_ROOT / ".state" / "stack"
    s3_port: int = 8333
    mlflow_port: int = 5000
    prefect_port: int = 4200
    worker_port: int = 4201
    vllm_port: int = 8000
    gateway_port: int = 8080
    vllm_model: str = "smollm2-135m-instruct"
    vllm_dtype: str = "bfloat16"
    vllm_max_model_len: int = 2048
    vllm_max_lora_rank: int = 16
    vllm_max_loras: int = 4
    vllm_kv_cache_gib: float = 1.0
    s3_bucket: str = "cl-experiences"
    s3_prefix: str = ""
    adapter_dir: Path = REPO_ROOT / ".state" / "adapters"
    work_pool: str = DEFAULT_WORK_POOL
    mlflow_config: Path = REPO_ROOT / "mlflow" / "server.yaml"
    timeouts: dict[str, float] = field(default_factory=dict)

    ENV: ClassVar[dict[str, str]] = {
        "state_dir": "CL_STACK_DIR", "s3_port": "CL_S3_PORT", "mlflow_port": "CL_MLFLOW_PORT",
        "prefect_port": "CL_PREFECT_PORT", "worker_port": "CL_PREFECT_WORKER_PORT", "vllm_port": "CL_VLLM_PORT",
        "gateway_port": "CL_GATEWAY_PORT",
        "vllm_model": "CL_VLLM_MODEL", "vllm_dtype": "CL_VLLM_DTYPE", "vllm_max_model_len": "CL_VLLM_MAX_MODEL_LEN",
        "vllm_kv_cache_gib": "CL_VLLM_KV_CACHE_GIB", "s3_bucket": "CL_S3_BUCKET", "s3_prefix": "CL_S3_PREFIX",
        "adapter_dir": "CL_ADAPTER_DIR", "work_pool": "CL_PREFECT_POOL", "mlflow_config": "CL_MLFLOW_SERVER_CONFIG",
    }

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> StackConfig:
        """Defaults, then environment variables, then `overrides` (None values are ignored: unset flags)."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in cls.ENV.items():
            raw = env.get(var)
            if raw in (None, ""):
                continue
            kind = types[name]
            if name.endswith("_port"):
                values[name] = _env_int(env, var, 0)
            elif kind in ("int",):
                values[name] = _parse(var, raw, int)
            elif kind in ("float",):
                values[name] = _parse(var, raw, float)
            elif kind in ("Path",):
                values[name] = Path(raw).expanduser()
            else:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("state_dir", "adapter_dir", "mlflow_config"):
            if key in values:
                values[key] = Path(values[key]).expanduser().resolve()  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        ports = {name: getattr(self, name) for name in ("s3_port", "mlflow_port", "prefect_port", "worker_port",
                                                         "vllm_port", "gateway_port")}
        for name, port in ports.items():
            if not isinstance(port, int) or not 1 <= port <= 65535:
                raise StackError(f"{name} must be a port number 1-65535, got {port!r} ({self.ENV[name]})")
        s3_block = set(range(self.s3_port, self.s3_port + 8))
        for name, port in ports.items():
            if name != "s3_port" and (port in s3_block or list(ports.values()).count(port) > 1):
                raise StackError(f"{name}={port} collides with another service's port (SeaweedFS uses "
                                 f"{self.s3_port}-{self.s3_port + 7}); change {self.ENV[name]}")

    @property
    def s3(self) -> S3Endpoint:
        return S3Endpoint(endpoint_url=f"http://127.0.0.1:{self.s3_port}")

    @property
    def env_path(self) -> Path:
        return self.state_dir / "env.sh"

    def client_env(self) -> dict[str, str]:
        """The environment contract: what any client needs to use this stack."""
        s3 = self.s3
        return {
            "CL_STACK_DIR": str(self.state_dir),
            "CL_S3_ENDPOINT": s3.endpoint_url, "CL_S3_BUCKET": self.s3_bucket, "CL_S3_PREFIX": self.s3_prefix,
            "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_DEFAULT_REGION": s3.region,
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{self.mlflow_port}", "MLFLOW_S3_ENDPOINT_URL": s3.endpoint_url,
            "PREFECT_API_URL": f"http://127.0.0.1:{self.prefect_port}/api",
            "CL_VLLM_URLS": f"http://127.0.0.1:{self.vllm_port}", "CL_ADAPTER_DIR": str(self.adapter_dir),
            "CL_GATEWAY_URL": f"http://127.0.0.1:{self.gateway_port}",
            **LOGGING_ENV,
        }


def _parse(var: str, raw: str, kind: Callable[[str], object]) -> object:
    try:
        return kind(raw)
    except ValueError:
        raise StackError(f"{var}={raw!r} is not a valid {kind.__name__}") from None


@dataclass
class Outcome:
    """What happened to one service during `up`."""

    service: str
    state: str  # "started", "already running", "failed", "skipped"
    detail: str = ""


@dataclass
class UpResult:
    outcomes: list[Outcome]
    urls: dict[str, str]

    @property
    def ok(self) -> bool:
        return all(o.state in ("started", "already running") for o in self.outcomes)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.state in ("failed", "skipped")]


class Stack:
    """The services of one `StackConfig`. `only` limits every operation to some services (dependencies of a
    selected service must be up already or selected too)."""

    def __init__(self, config: StackConfig, log: Callable[[str], None] = print) -> None:
        self.config = config
        self.log = log
        self._services: dict[str, Service] | None = None

    def services(self) -> dict[str, Service]:
        """All services in dependency order (built once; building resolves nothing slow)."""
        if self._services is None:
            c = self.config
            mlflow = MLflowSettings.load(c.mlflow_config)
            backend = None if mlflow.backend_store == "sqlite" else mlflow.backend_store
            prefect = PrefectServer(c.state_dir, c.prefect_port)
            self._services = {
                "s3": SeaweedFS(c.state_dir, c.s3_port, buckets=(c.s3_bucket, mlflow.artifacts_bucket)),
                "mlflow": MLflowServer(c.state_dir, c.mlflow_port, c.s3,
                                       artifacts_destination=f"s3://{mlflow.artifacts_bucket}/"
                                                             f"{mlflow.artifacts_prefix}".rstrip("/"),
                                       backend_store_uri=backend, workers=mlflow.workers),
                "prefect": prefect,
                "worker": PrefectWorker(c.state_dir, c.worker_port, prefect.api_url, pool=c.work_pool,
                                        env=c.client_env(), cwd=REPO_ROOT),
                "vllm": VLLMServer(c.state_dir, c.vllm_port, model=c.vllm_model, dtype=c.vllm_dtype,
                                   max_model_len=c.vllm_max_model_len, max_lora_rank=c.vllm_max_lora_rank,
                                   max_loras=c.vllm_max_loras, kv_cache_gib=c.vllm_kv_cache_gib),
                "gateway": GatewayServer(c.state_dir, c.gateway_port, [f"http://127.0.0.1:{c.vllm_port}"],
                                         manifest_path=c.adapter_dir / MANIFEST_FILE),
            }
            for name, timeout in c.timeouts.items():
                self._services[name].start_timeout = timeout
        return self._services

    def select(self, only: Sequence[str] | None) -> list[str]:
        if not only:
            return list(SERVICES)
        unknown = [s for s in only if s not in SERVICES]
        if unknown:
            raise StackError(f"unknown service(s) {unknown}; known: {', '.join(SERVICES)}")
        return [s for s in SERVICES if s in only]

    def urls(self) -> dict[str, str]:
        c, s = self.config, self.services()
        return {"s3": c.s3.endpoint_url, "mlflow": s["mlflow"].url, "prefect": s["prefect"].url,
                "worker": f"pool {c.work_pool} (health {s['worker'].url}/health)",
                "vllm": f"{s['vllm'].url}/v1", "gateway": f"{s['gateway'].url}/v1"}

    # --- up ---------------------------------------------------------------------------------------------
    def up(self, only: Sequence[str] | None = None) -> UpResult:
        """Start every selected service that is not running and healthy; write env.sh; never raises for a
        service failure (each is reported in the result, and `ok` is False)."""
        names = self.select(only)
        services = self.services()
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        self.config.adapter_dir.mkdir(parents=True, exist_ok=True)
        outcomes: dict[str, Outcome] = {}
        lock = threading.Lock()

        def bring_up(name: str, deps: dict[str, Future]) -> bool:
            for dep, fut in deps.items():
                if not fut.result():
                    outcomes[name] = Outcome(name, "skipped", f"needs {dep}, which is not up")
                    return False
            for dep in DEPENDS_ON[name]:
                if dep not in deps and not services[dep].is_up():
                    outcomes[name] = Outcome(name, "skipped", f"needs {dep}, which is not running: start it too "
                                                              f"(--only {dep},{name})")
                    return False
            service = services[name]
            try:
                state = self._bring_up(name, service)
            except ServiceStartError as exc:
                outcomes[name] = Outcome(name, "failed", str(exc))
                return False
            except Exception as exc:  # a bad setting, a taken port, a missing model: named, never a traceback
                why = str(exc) if isinstance(exc, StackError) else f"service {name!r} failed to start: {exc}"
                outcomes[name] = Outcome(name, "failed", why
                                         + (f"\n  log: {service.log_path}" if service.log_path.exists() else ""))
                return False
            outcomes[name] = Outcome(name, state, service.url)
            with lock:
                self.log(f"  {name:8s} {state}: {self.urls()[name]}")
            return True

        # vLLM first: it is the slowest; every service runs in its own thread and waits for its dependencies
        order = sorted(names, key=lambda n: n != "vllm")
        futures: dict[str, Future] = {}
        with ThreadPoolExecutor(max_workers=len(order)) as pool:
            for name in order:
                deps = {d: futures[d] for d in DEPENDS_ON[name] if d in futures}
                futures[name] = pool.submit(bring_up, name, deps)
        result = UpResult([outcomes[n] for n in names], self.urls())
        self.write_env()
        return result

    def _bring_up(self, name: str, service: Service) -> str:
        rec = service.record()
        if service.running():
            if rec is not None and rec.ports != service.ports():
                raise StackError(f"{name} is already running on port(s) {rec.ports} from an earlier `up` with other "
                                 f"settings; run `down --only {name}` first")
            if service.healthy():
                if name == "s3":
                    service.after_healthy()  # buckets of the current config
                return "already running"
            service.wait_healthy()  # ours, still starting (another `up` started it): wait for it
            return "already running"
        if name == "vllm":
            service.model = self._resolve_model(service.model)  # type: ignore[attr-defined]
        service.start()
        service.wait_healthy()
        return "started"

    @staticmethod
    def _resolve_model(model: str) -> str:
        from cl_core.models import resolve_model

        return resolve_model(model)

    # --- down / status ----------------------------------------------------------------------------------
    def down(self, only: Sequence[str] | None = None) -> list[tuple[str, bool]]:
        """Stop the selected services (dependents first, in parallel per level); returns (name, was_running)."""
        names = self.select(only)
        services = self.services()
        stopped: dict[str, bool] = {}
        # dependents before what they depend on: the gateway before vllm, worker before prefect, mlflow before s3
        for level in (("gateway", "worker", "mlflow"), ("vllm", "prefect", "s3")):
            todo = [n for n in level if n in names]
            with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
                for name, was in zip(todo, pool.map(lambda n: services[n].stop(), todo), strict=True):
                    stopped[name] = was
        return [(n, stopped[n]) for n in names]

    def status(self, only: Sequence[str] | None = None) -> list[tuple[str, str, int | None, str]]:
        """(name, healthy|unhealthy|stopped, pid, url) for each selected service."""
        services, urls = self.services(), self.urls()
        return [(n, services[n].status(), services[n].pid(), urls[n]) for n in self.select(only)]

    def write_env(self) -> Path:
        """Write `<state>/env.sh` (exports of the environment contract), replacing it whole."""
        lines = ["# Written by `python -m cl_core.stack up`: `source` it to point clients at this stack."]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in self.config.client_env().items()]
        path = self.config.env_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(path)
        return path
