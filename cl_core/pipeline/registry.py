"""The MLflow model registry of adapter versions: runs, registered versions, aliases `champion` / `challenger`.

One candidate = one MLflow run (params, metrics, validation result, gate decision, lineage, the adapter in PEFT
format and optionally the training checkpoint) + one registered model version created from the run's `adapter/`
artifacts. The base model is never logged: a version is only a LoRA delta, and its `base_model` tag says which
frozen weights it applies to.

Aliases:
- `challenger`: the latest candidate that passed the gate and is not promoted yet. `log_candidate` moves it when
  the decision passed (`set_challenger=True`), so a rejected candidate never becomes the challenger.
- `champion`: what the vLLM deployment serves. Only the promote step moves it, and only *after* every replica
  switched the stable adapter name to the new version: the alias then never names a version that is not served.
  Rollback is the same move to an older version.

Failures: the registry owns the retry policy. MLflow's own per-request retries (7 with exponential backoff,
minutes against a dead server) are turned off during our calls, and each call is retried here `max_attempts`
times with exponential backoff on transient errors only (connection refused/reset, timeouts, HTTP 408/429/5xx,
S3 endpoint errors). After that a `RegistryUnavailable` names the tracking URI. A candidate whose artifacts could
not be logged leaves a FAILED run and no registered version: nothing half-registered can be promoted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from cl_core.bank.manifest import MANIFEST_FILE as BANK_MANIFEST_FILE
from cl_core.errors import ContinualError
from cl_core.pipeline.gate import DERIVED_METRICS, GateDecision, derive
from mlflow import MlflowClient

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
LINEAGE_VERSION_TAGS = ("base_model", "base_model_fingerprint", "parent_version", "watermark")
_LINEAGE_SYNONYMS = {"watermark": ("data_watermark",), "base_model_fingerprint": ("base_fingerprint",),
                     "s3_objects": ("data_objects",)}
_ALIAS_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\- ]+$")
_TRANSIENT_TEXT = ("connection refused", "failed to establish a new connection", "max retries exceeded",
                   "connection reset", "connection aborted", "remote end closed", "remotedisconnected",
                   "timed out", "timeout", "temporarily unavailable", "too many 5", "too many 429",
                   "too many 408", "bad gateway", "service unavailable", "database is locked")
_HTTP_POLICY_LOCK = threading.RLock()
T = TypeVar("T")


class RegistryUnavailable(ContinualError, RuntimeError):
    """The MLflow server (or its artifact store) did not answer after the retries; nothing was left half-done."""

    def __init__(self, uri: str, what: str, attempts: int, elapsed_s: float, cause: BaseException) -> None:
        self.uri = uri
        super().__init__(
            f"MLflow registry at {uri} is unavailable: {what} failed {attempts} times in {elapsed_s:.1f} s "
            f"(last error: {_short(cause)}). Check that the server is up (`python -m cl_core.stack "
            f"status` locally) and that MLFLOW_TRACKING_URI / --tracking-uri point at it.")


class VersionNotFound(ContinualError, LookupError):
    """A version number or alias that the registered model does not have."""


@dataclass(frozen=True)
class CandidateVersion:
    """What `log_candidate` registered: the version number, its run, and where a person can look at them."""

    version: int
    run_id: str
    run_url: str | None
    version_url: str | None


@dataclass(frozen=True)
class VersionInfo:
    """A registered version with its run's metrics and params (metric names as logged: `candidate.*` etc.)."""

    version: int
    run_id: str
    tags: dict[str, str]
    metrics: dict[str, float]
    params: dict[str, str]
    source: str
    aliases: tuple[str, ...] = ()
    run_tags: dict[str, str] = field(default_factory=dict)

    @property
    def gate(self) -> str | None:
        """`passed`, `rejected`, `pending` or None (the `gate` tag)."""
        return self.tags.get("gate")

    def metrics_of(self, who: str) -> dict[str, float]:
        """`candidate` or `champion` metrics of this version's run, without the prefix."""
        prefix = f"{who}."
        return {k[len(prefix):]: v for k, v in self.metrics.items() if k.startswith(prefix)}


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry can fix: the server or artifact store is down, slow or overloaded."""
    import requests

    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code in (408, 429) or exc.response.status_code >= 500
    if isinstance(exc, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError):
        return True
    try:
        import botocore.exceptions as bce

        if isinstance(exc, bce.EndpointConnectionError | bce.ConnectionClosedError | bce.ReadTimeoutError
                      | bce.ConnectTimeoutError):
            return True
        if isinstance(exc, bce.ClientError):
            return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)) >= 500
    except ImportError:  # pragma: no cover - boto3 is a pipeline dependency
        pass
    if isinstance(exc, MlflowException):
        if exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
            return True
        text = str(exc).lower()
        # MLflow wraps every transport failure (refused, reset, timeout, 5xx after retries) in this message.
        if text.startswith("api request to") and "failed with" in text:
            return True
        return any(t in text for t in _TRANSIENT_TEXT)
    text = str(exc).lower()  # e.g. boto3's S3UploadFailedError wrapping an endpoint error
    return any(t in text for t in ("could not connect to the endpoint", "connection refused", "connection reset"))


@contextmanager
def _mlflow_http_policy(timeout_s: float) -> Iterator[None]:
    """MLflow reads its HTTP retry/timeout policy from the environment on every request: pin it while we call.

    The lock keeps concurrent registry calls (Prefect's thread task runner) from restoring each other's values.
    """
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s)))}
    with _HTTP_POLICY_LOCK:
        saved = {key: os.environ.get(key) for key in keys}
        os.environ.update(keys)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class AdapterRegistry:
    """Registered LoRA adapter versions in MLflow; see the module docstring for aliases and failure semantics.

    `tracking_uri` defaults to MLFLOW_TRACKING_URI, then http://127.0.0.1:5000. Nothing is contacted until the
    first call. `ui_url` is where the MLflow UI lives (defaults to the tracking URI when it is http(s)).
    """

    def __init__(self, tracking_uri: str | None = None, model_name: str = "continual-adapter",
                 experiment: str = "continual-learning", *, ui_url: str | None = None, max_attempts: int = 4,
                 backoff_s: float = 0.5, request_timeout_s: float = 30.0) -> None:
        self.tracking_uri = (tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI).rstrip("/")
        if not model_name or not _NAME_RE.match(model_name):
            raise ValueError(f"model_name {model_name!r} must be letters, digits, spaces, '.', '_' or '-'")
        if not experiment:
            raise ValueError("experiment must be a non-empty experiment name")
        if max_attempts < 1 or backoff_s < 0 or request_timeout_s <= 0:
            raise ValueError(f"need max_attempts >= 1, backoff_s >= 0, request_timeout_s > 0; got {max_attempts}, "
                             f"{backoff_s}, {request_timeout_s}")
        self.model_name = model_name
        self.experiment = experiment
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.request_timeout_s = request_timeout_s
        if ui_url is None and self.tracking_uri.startswith(("http://", "https://")):
            ui_url = self.tracking_uri
        self.ui_url = ui_url.rstrip("/") if ui_url else None
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._experiment_id: str | None = None

    # ----------------------------------------------------------------------------------------------- plumbing
    def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one MLflow call, retrying transient failures with exponential backoff; then RegistryUnavailable."""
        start = time.monotonic()
        for attempt in range(1, self.max_attempts + 1):
            try:
                with _mlflow_http_policy(self.request_timeout_s):
                    return fn(*args, **kwargs)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == self.max_attempts:
                    raise RegistryUnavailable(self.tracking_uri, what, attempt, time.monotonic() - start,
                                              exc) from exc
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("MLflow %s failed (%s); retry %d/%d in %.1f s", what, _short(exc, 160), attempt,
                            self.max_attempts - 1, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def experiment_id(self) -> str:
        """The experiment's id, created on first use."""
        if self._experiment_id is None:
            exp = self._call("get experiment", self.client.get_experiment_by_name, self.experiment)
            if exp is None:
                try:
                    self._experiment_id = self._call("create experiment", self.client.create_experiment,
                                                     self.experiment)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # created concurrently: fine
                        raise
                    exp = self._call("get experiment", self.client.get_experiment_by_name, self.experiment)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    raise ValueError(f"MLflow experiment {self.experiment!r} is deleted; restore it (`mlflow "
                                     f"experiments restore --experiment-id {exp.experiment_id}`) or pick another")
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _ensure_registered_model(self) -> None:
        try:
            self._call("get registered model", self.client.get_registered_model, self.model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                self._call("create registered model", self.client.create_registered_model, self.model_name,
                           description="LoRA adapter versions of the continual-learning pipeline (PEFT format; "
                                       "the frozen base model is named by each version's base_model tag).")
            except MlflowException as again:
                if again.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise

    # ------------------------------------------------------------------------------------------------- writing
    def log_candidate(self, params: Mapping[str, Any], metrics: Mapping[str, Any], adapter_dir: str | Path,
                      checkpoint_dir: str | Path | None = None, gx_result: Mapping[str, Any] | None = None,
                      data_docs_dir: str | Path | None = None,
                      decision: GateDecision | Mapping[str, Any] | None = None,
                      lineage: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None, *,
                      run_name: str | None = None, set_challenger: bool = True,
                      idempotency_key: str | None = None) -> CandidateVersion:
        """Log one candidate as a run and register its adapter as a new model version.

        metrics: `{"candidate": {...}, "champion": {...} | None, **extra}` — per-model metric mappings as the
            evaluation step produced them (logged as `candidate.<name>` / `champion.<name>`; the derived
            `heldout_gain`, `retention_drop`, `probe_regression`, `forgetting` are computed and logged too), plus
            any extra flat numbers (e.g. `train.loss`) logged as they are.
        lineage: `base_model` (required), `base_model_fingerprint`, `watermark`, `s3_objects`, `parent_version`
            (the champion version it was trained from / evaluated against; None for the first), and any extra keys;
            logged as `lineage.*` params and run tags, and the main ones as version tags.
        idempotency_key: when given and a version with that key exists, it is returned instead of registering a
            duplicate (a retried Prefect task that already registered).
        """
        adapter_dir = _check_adapter_dir(adapter_dir)
        checkpoint_dir = _check_dir(checkpoint_dir, "checkpoint_dir") if checkpoint_dir is not None else None
        data_docs_dir = _check_dir(data_docs_dir, "data_docs_dir") if data_docs_dir is not None else None
        flat_metrics = flatten_metrics(metrics)
        lineage = _check_lineage(lineage)
        decision_dict = _decision_dict(decision)
        gate = decision_dict["verdict"] if decision_dict else "pending"
        params = {str(k): _param_value(v) for k, v in params.items()}
        lineage_params = {f"lineage.{k}": _param_value(v) for k, v in lineage.items()}
        if clash := sorted(set(params) & set(lineage_params)):
            raise ValueError(f"params {clash} clash with lineage params; drop them from params")
        user_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        version_tags = {"gate": gate, **{k: _param_value(_lineage_value(lineage, k)) for k in LINEAGE_VERSION_TAGS},
                        **user_tags}
        if idempotency_key:
            version_tags["idempotency_key"] = idempotency_key
            if (existing := self._find_by_key(idempotency_key)) is not None:
                log.info("candidate %s already registered as version %d", idempotency_key, existing.version)
                return CandidateVersion(existing.version, existing.run_id, self.run_url(existing.run_id),
                                        self.version_url(existing.version))

        experiment_id = self.experiment_id()
        run_tags = {**user_tags, **lineage_params, "gate": gate}
        if run_name:
            run_tags["mlflow.runName"] = run_name
        run = self._call("create run", self.client.create_run, experiment_id, tags=run_tags)
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            all_params = [Param(k, v) for k, v in {**params, **lineage_params}.items()]
            all_metrics = [Metric(k, v, now, 0) for k, v in flat_metrics.items()]
            for i in range(0, max(len(all_params), len(all_metrics)), 100):
                self._call("log params/metrics", self.client.log_batch, run_id, metrics=all_metrics[i:i + 100],
                           params=all_params[i:i + 100], tags=[])
            self._call("log adapter", self.client.log_artifacts, run_id, str(adapter_dir), "adapter")
            if checkpoint_dir is not None:
                self._call("log checkpoint", self.client.log_artifacts, run_id, str(checkpoint_dir), "checkpoint")
            if gx_result is not None:
                self._call("log GX result", self.client.log_dict, run_id, dict(gx_result),
                           "validation/gx_result.json")
            if data_docs_dir is not None:
                self._call("log data docs", self.client.log_artifacts, run_id, str(data_docs_dir),
                           "validation/data_docs")
            if decision_dict is not None:
                self._call("log gate decision", self.client.log_dict, run_id, decision_dict, "gate/decision.json")
                if isinstance(decision, GateDecision):
                    self._call("log gate decision", self.client.log_text, run_id, decision.to_markdown(),
                               "gate/decision.md")
            self._call("finish run", self.client.set_terminated, run_id, "FINISHED")
        except BaseException:
            try:  # best effort: the server may be the thing that is down
                with _mlflow_http_policy(min(5.0, self.request_timeout_s)):
                    self.client.set_terminated(run_id, "FAILED")
            except Exception as exc:
                log.warning("could not mark run %s FAILED: %s", run_id, _short(exc, 160))
            raise

        self._ensure_registered_model()
        source = f"{run.info.artifact_uri.rstrip('/')}/adapter"
        description = "gate: " + ("; ".join(decision_dict["reasons"]) if decision_dict else "not decided yet")
        mv = self._call("create model version", self.client.create_model_version, self.model_name, source=source,
                        run_id=run_id, tags=version_tags, description=description[:4000])
        version = int(mv.version)
        if set_challenger and gate == "passed":
            self.set_alias(version, "challenger")
        return CandidateVersion(version, run_id, self.run_url(run_id, experiment_id), self.version_url(version))

    def set_alias(self, version: int, alias: str) -> None:
        """Point `alias` at `version` (moves it if it named another). `champion` is moved by the promote step only."""
        _check_alias(alias)
        version = int(version)
        self._require_version(version)
        self._call(f"set alias {alias}", self.client.set_registered_model_alias, self.model_name, alias,
                   str(version))

    def clear_alias(self, alias: str) -> None:
        """Remove `alias` (e.g. `challenger` once it was promoted); no error when it is not set."""
        _check_alias(alias)
        if self.version_for(alias) is not None:
            self._call(f"delete alias {alias}", self.client.delete_registered_model_alias, self.model_name, alias)

    def mark(self, version: int, tags: Mapping[str, Any]) -> None:
        """Set tags on a version (e.g. `promoted_at`, `rollback_of`, `promotion=failed`)."""
        version = int(version)
        self._require_version(version)
        for key, value in tags.items():
            self._call("set version tag", self.client.set_model_version_tag, self.model_name, str(version),
                       str(key), _param_value(value))

    # ------------------------------------------------------------------------------------------------- reading
    def version_for(self, alias: str) -> int | None:
        """The version `alias` points at, or None when the alias (or the registered model) does not exist."""
        _check_alias(alias)
        try:
            model = self._call("get registered model", self.client.get_registered_model, self.model_name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        version = model.aliases.get(alias)
        return int(version) if version is not None else None

    def resolve(self, ref: str | int) -> int:
        """A version number or an alias -> version number; VersionNotFound names what exists."""
        if isinstance(ref, int) or str(ref).isdigit():
            version = int(ref)
            self._require_version(version)
            return version
        version = self.version_for(str(ref))
        if version is None:
            known = self._known_aliases()
            raise VersionNotFound(f"model {self.model_name!r} has no alias {ref!r}; aliases set: "
                                  f"{', '.join(known) if known else 'none'}")
        return version

    def get(self, version: int) -> VersionInfo:
        """A version with its tags, source and its run's metrics/params."""
        mv = self._require_version(int(version))
        return self._info(mv)

    def versions(self) -> list[VersionInfo]:
        """Every version of the registered model, oldest first."""
        found, token = [], None
        while True:
            try:
                page = self._call("search versions", self.client.search_model_versions,
                                  f"name='{self.model_name}'", max_results=200, page_token=token)
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return []
                raise
            found.extend(page)
            token = getattr(page, "token", None)
            if not token:
                break
        if not found:
            return []
        # Search results carry no aliases (MLflow leaves them out): take them from the registered model.
        by_version: dict[int, list[str]] = {}
        for alias, version in self._call("get registered model", self.client.get_registered_model,
                                         self.model_name).aliases.items():
            by_version.setdefault(int(version), []).append(alias)
        return [self._info(mv, tuple(sorted(by_version.get(int(mv.version), ()))))
                for mv in sorted(found, key=lambda mv: int(mv.version))]

    def download_adapter(self, version: int, dst: str | Path, *, overwrite: bool = False) -> Path:
        """Download a version's PEFT adapter into directory `dst` (created whole: temp dir, then rename)."""
        mv = self._require_version(int(version))
        dst = Path(dst)
        path = self._download(mv.source, dst, overwrite, f"download adapter v{version}")
        if (path / BANK_MANIFEST_FILE).is_file():
            return path
        missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"version {version} adapter at {mv.source} lacks {missing}; it is not a PEFT "
                                    "adapter directory")
        return path

    def download_checkpoint(self, version: int, dst: str | Path, *, overwrite: bool = False) -> Path | None:
        """Download a version's training checkpoint into `dst`; None when it was registered without one."""
        mv = self._require_version(int(version))
        listed = self._call("list artifacts", self.client.list_artifacts, mv.run_id, "checkpoint")
        if not listed:
            return None
        source = f"{self._call('get run', self.client.get_run, mv.run_id).info.artifact_uri.rstrip('/')}/checkpoint"
        return self._download(source, Path(dst), overwrite, f"download checkpoint v{version}")

    def read_decision(self, version: int) -> dict[str, Any] | None:
        """The gate decision JSON logged with a version's run, or None."""
        mv = self._require_version(int(version))
        listed = self._call("list artifacts", self.client.list_artifacts, mv.run_id, "gate")
        if not any(item.path.endswith("decision.json") for item in listed):
            return None
        return self._load_json(mv.run_id, "gate/decision.json")

    # -------------------------------------------------------------------------------------------------- URLs
    def run_url(self, run_id: str, experiment_id: str | None = None) -> str | None:
        """The run's page in the MLflow UI (None when the tracking URI has no UI, e.g. a local file store)."""
        if self.ui_url is None:
            return None
        if experiment_id is None:
            experiment_id = self._call("get run", self.client.get_run, run_id).info.experiment_id
        return f"{self.ui_url}/#/experiments/{experiment_id}/runs/{run_id}"

    def version_url(self, version: int) -> str | None:
        """The version's page in the MLflow UI."""
        if self.ui_url is None:
            return None
        return f"{self.ui_url}/#/models/{quote(self.model_name)}/versions/{int(version)}"

    # ------------------------------------------------------------------------------------------------ helpers
    def _require_version(self, version: int):
        try:
            return self._call("get model version", self.client.get_model_version, self.model_name, str(version))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise VersionNotFound(f"model {self.model_name!r} at {self.tracking_uri} has no version {version}"
                                      ) from None
            raise

    def _known_aliases(self) -> list[str]:
        try:
            model = self._call("get registered model", self.client.get_registered_model, self.model_name)
        except MlflowException:
            return []
        return sorted(model.aliases)

    def _info(self, mv: Any, aliases: tuple[str, ...] | None = None) -> VersionInfo:
        run = self._call("get run", self.client.get_run, mv.run_id)
        aliases = tuple(sorted(mv.aliases or ())) if aliases is None else aliases
        return VersionInfo(version=int(mv.version), run_id=mv.run_id, tags=dict(mv.tags), metrics=dict(
            run.data.metrics), params=dict(run.data.params), source=mv.source, aliases=aliases,
            run_tags={k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")})

    def _find_by_key(self, key: str) -> VersionInfo | None:
        for info in self.versions():
            if info.tags.get("idempotency_key") == key:
                return info
        return None

    def _download(self, source: str, dst: Path, overwrite: bool, what: str) -> Path:
        import mlflow.artifacts

        occupied = (dst.is_dir() and any(dst.iterdir())) or (dst.exists() and not dst.is_dir())
        if occupied and not overwrite:
            raise FileExistsError(f"{dst} exists and is not empty; pass overwrite=True or another directory")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        try:
            got = Path(self._call(what, mlflow.artifacts.download_artifacts, artifact_uri=source,
                                  dst_path=str(tmp), tracking_uri=self.tracking_uri))
            if dst.exists():
                old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
                dst.rename(old)
                got.rename(dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                got.rename(dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dst

    def _load_json(self, run_id: str, path: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            local = self._call("download", self.client.download_artifacts, run_id, path, tmp)
            return json.loads(Path(local).read_text())


def flatten_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The flat metric names logged on a candidate run, from either form the pipeline produces.

    Nested: `{"candidate": {...}, "champion": {...} | None, **extra}`. Flat: `{"candidate.heldout_exact": ..,
    "champion.heldout_exact": .., **extra}`. Either way the derived values (`heldout_gain`, ...) are recomputed
    from the candidate/champion pair (a stale one passed in is replaced) and extra numbers are logged as they are.
    """
    if not isinstance(metrics, Mapping):
        raise ValueError(f"metrics must be a mapping, got {type(metrics).__name__}")
    per_model: dict[str, dict[str, float] | None] = {"candidate": {}, "champion": None}
    extra: dict[str, float] = {}
    for key, value in metrics.items():
        key = str(key)
        if key in per_model:
            if value is None and key == "champion":
                continue
            if not isinstance(value, Mapping):
                raise ValueError(f"metrics[{key!r}] must be a mapping of metric name -> number, got {value!r}")
            per_model[key] = {**(per_model[key] or {}), **{str(k): _number(v, f"{key}.{k}") for k, v in value.items()}}
        elif key.startswith(("candidate.", "champion.")):
            who, name = key.split(".", 1)
            per_model[who] = {**(per_model[who] or {}), name: _number(value, key)}
        elif key not in DERIVED_METRICS:
            extra[key] = _number(value, key)
    candidate, champion = per_model["candidate"] or {}, per_model["champion"]
    if not candidate:
        raise ValueError("metrics has no candidate metrics: pass {'candidate': {...}, 'champion': {...}} or flat "
                         "'candidate.<name>' keys (the CI gate reads them back from the run)")
    flat = {f"candidate.{k}": v for k, v in candidate.items()}
    flat.update({f"champion.{k}": v for k, v in (champion or {}).items()})
    flat.update(derive(candidate, champion))
    flat.update(extra)
    return flat


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"metric {name} must be a number, got {value!r}")
    return float(value)


def _param_value(value: Any) -> str:
    if value is None:
        return "none"
    text = json.dumps(value, sort_keys=True, default=str) if isinstance(value, Mapping | list | tuple) else str(value)
    if len(text) > 6000:  # MLflow's param value limit
        raise ValueError(f"param/tag value too long for MLflow ({len(text)} > 6000 chars): {text[:80]}...")
    return text


def _check_adapter_dir(path: str | Path) -> Path:
    path = Path(path)
    if (path / BANK_MANIFEST_FILE).is_file():  # a bank bundle: bank.json + one PEFT directory per adapter + router
        return path
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if not path.is_dir() or missing:
        raise FileNotFoundError(f"adapter_dir {path} must be a PEFT adapter directory (save_pretrained output); "
                                f"missing: {', '.join(missing) if path.is_dir() else 'the directory itself'}")
    return path


def _check_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path} is not a directory")
    return path


def _check_lineage(lineage: Mapping[str, Any] | None) -> dict[str, Any]:
    lineage = dict(lineage or {})
    if not lineage.get("base_model"):
        raise ValueError("lineage needs `base_model` (the frozen model the adapter applies to); also pass "
                         "base_model_fingerprint, watermark, s3_objects and parent_version where known")
    for key in lineage:
        if not re.match(r"^[A-Za-z0-9_.\-]+$", str(key)):
            raise ValueError(f"lineage key {key!r} must be letters, digits, '.', '_' or '-'")
    return lineage


def _lineage_value(lineage: Mapping[str, Any], key: str) -> Any:
    """A canonical lineage value, accepting the synonyms the tasks use (`data_watermark`, `base_fingerprint`)."""
    for name in (key, *_LINEAGE_SYNONYMS.get(key, ())):
        if lineage.get(name) is not None:
            return lineage[name]
    return None


def _decision_dict(decision: GateDecision | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if decision is None:
        return None
    if isinstance(decision, GateDecision):
        return decision.to_dict()
    data = dict(decision)
    if not isinstance(data.get("passed"), bool):
        raise ValueError(f"decision must be a GateDecision or a dict with a boolean `passed`, got {decision!r}")
    data.setdefault("verdict", "passed" if data["passed"] else "rejected")
    data.setdefault("reasons", [])
    return data


def _check_alias(alias: str) -> None:
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias) or alias.lower() == "latest" or re.match(
            r"^v\d+$", alias, re.IGNORECASE):
        raise ValueError(f"alias {alias!r} must be letters, digits, '_' or '-', and not 'latest' or 'v<number>'")
