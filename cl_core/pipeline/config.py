"""`PipelineConfig`: one typed configuration for the learning pipeline, read from YAML plus the environment.

The YAML file (default `infra/pipeline.yaml`) says *what* the pipeline does: schedule, training, evaluation, gate.
*Where* the services are (S3, MLflow, Prefect, vLLM replicas) comes from the environment contract that
`infra/stack.sh up` writes to `.state/stack/env.sh` and that production sets in its deployment, so the same file
runs against the loopback stack and against AWS S3 / an MLflow server / a vLLM deployment. Unknown keys are
errors that list the known ones: a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cl_core.config import ContinualConfig
from cl_core.data.s3 import DEFAULT_BUCKET as DEFAULT_S3_BUCKET
from cl_core.data.s3 import DEFAULT_ENDPOINT as DEFAULT_S3_ENDPOINT
from cl_core.errors import ConfigError
from cl_core.pipeline.gate import GateConfigError, GateRules

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "infra" / "pipeline.yaml"


@dataclass(frozen=True)
class ScheduleSettings:
    """When the periodic-learning deployment runs: every `interval_minutes`, or on a `cron` expression."""

    interval_minutes: float | None = 60.0
    cron: str | None = None
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if (self.interval_minutes is None) == (self.cron is None):
            raise ConfigError("schedule: give exactly one of interval_minutes or cron")
        if self.interval_minutes is not None and not self.interval_minutes > 0:
            raise ConfigError(f"schedule.interval_minutes must be > 0, got {self.interval_minutes!r}")


@dataclass(frozen=True)
class ValidationSettings:
    """Great Expectations validation of pulled records."""

    max_invalid_fraction: float = 0.2
    """The run fails (loudly, after quarantining) when more than this share of pulled records is invalid."""
    max_tokens: int | None = None
    """Longest prompt+answer in tokens; None = the training context (`training.max_model_len`)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            raise ConfigError(f"validation.max_invalid_fraction must be in [0, 1], got {self.max_invalid_fraction}")


@dataclass(frozen=True)
class TrainingSettings:
    """How a candidate is trained: a `ContinualConfig` (LoRA, methods, learning rates, `max_steps` per task) plus
    the number of passes over the new records."""

    continual: ContinualConfig
    epochs: int = 3
    correction_rounds: bool = True
    """After the round, corrections the learner does not yet answer as corrected get a margin-driven
    `learn_from_correction` each (what users corrected is what they check first)."""
    anchors: str | None = "default"
    """Retention anchors for a new lineage (self-rehearsal): prompts whose answers by the served base model become
    the lineage's first task, so replay rehearses them and EWC's Fisher is measured on them. "default" = the
    packaged cl_core/pipeline/anchors.json, a path = your own JSON (`{"prompts": [...]}`), null = none."""

    threads: int | str = "auto"
    """CPU threads for training (torch intra-op). "auto": half the cores when a vLLM replica runs on this machine
    (a loopback URL), all of them otherwise. Two thread pools spinning on the same cores stall each other: on 2
    cores with one chat client on the local vLLM server, a training step took 62 s with 2 threads and 2.6 s with 1
    (1.1 s with 2 and no load)."""

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(f"training.epochs must be an integer ≥ 1, got {self.epochs!r}")
        if self.threads != "auto" and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                       or self.threads < 1):
            raise ConfigError(f"training.threads must be \"auto\" or an integer ≥ 1, got {self.threads!r}")
        if self.continual.priority_function == "uncertainty":
            raise ConfigError("training.priority_function 'uncertainty' needs an inference engine in the "
                              "training process; the pipeline trains detached from serving. Use 'loss'.")


def training_threads(setting: int | str, vllm_urls: Sequence[str], cores: int | None = None) -> int:
    """The number of training threads `setting` means here (see `TrainingSettings.threads`)."""
    if setting != "auto":
        return int(setting)
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // 2) if any(_on_this_machine(u) for u in vllm_urls) else cores


def _on_this_machine(url: str) -> bool:
    """Whether `url` names this machine: localhost, a loopback address (127.0.0.0/8, ::1) or 0.0.0.0 / ::."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name: another machine as far as we can tell
        return False
    return address.is_loopback or address.is_unspecified


@dataclass(frozen=True)
class EvaluationSettings:
    """What the candidate is measured on, through vLLM."""

    heldout_fraction: float = 0.2
    """Share of labelled / positively rated records held out of training to measure the new-task gain."""
    replay_probes: int = 16
    """Earlier learned experiences (from the store) re-asked to measure retention."""
    max_tokens: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"evaluation.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclass(frozen=True)
class Endpoints:
    """Where the services are (from the environment; see `infra/stack.sh`)."""

    s3_endpoint: str | None
    s3_bucket: str
    s3_prefix: str
    mlflow_uri: str
    vllm_urls: tuple[str, ...]
    adapter_dir: Path
    prefect_api: str | None
    gateway_url: str | None = None
    """The gateway clients use (`CL_GATEWAY_URL`): it routes `continual` through the promoted bank manifest."""

    @classmethod
    def from_env(cls) -> Endpoints:
        urls = tuple(u.strip().rstrip("/") for u in os.environ.get("CL_VLLM_URLS", "http://127.0.0.1:8000")
                     .split(",") if u.strip())
        if not urls:
            raise ConfigError("CL_VLLM_URLS is empty: give the base URL of every vLLM replica, comma-separated")
        return cls(s3_endpoint=os.environ.get("CL_S3_ENDPOINT", DEFAULT_S3_ENDPOINT) or None,
                   s3_bucket=os.environ.get("CL_S3_BUCKET", DEFAULT_S3_BUCKET),
                   s3_prefix=os.environ.get("CL_S3_PREFIX", ""),
                   mlflow_uri=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
                   vllm_urls=urls,
                   adapter_dir=Path(os.environ.get("CL_ADAPTER_DIR", REPO_ROOT / ".state" / "adapters")),
                   prefect_api=os.environ.get("PREFECT_API_URL"),
                   gateway_url=(os.environ.get("CL_GATEWAY_URL") or "").rstrip("/") or None)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a periodic-learning run needs, validated when built."""

    training: TrainingSettings
    endpoints: Endpoints
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    gate: GateRules = field(default_factory=GateRules)
    """The promotion rules, parsed with the rest of the file: a typo in a rule fails at load, before training.
    A mapping (the YAML section, or a test's override) is parsed into `GateRules` on construction."""
    model_name: str = "continual-adapter"
    experiment: str = "continual-learning"
    stable_name: str = "continual"
    keep_versions: int = 3
    """Versioned adapter names (`continual@v7`) kept loaded on the servers for instant rollback."""
    state_dir: Path = REPO_ROOT / ".state" / "pipeline"
    source: str = "<defaults>"

    def __post_init__(self) -> None:
        if not isinstance(self.gate, GateRules):
            object.__setattr__(self, "gate", parse_gate(self.gate, self.source))

    @property
    def max_tokens(self) -> int:
        return self.validation.max_tokens or self.training.continual.max_model_len

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> PipelineConfig:
        """Read the YAML file (`path`, else $CL_PIPELINE_CONFIG, else infra/pipeline.yaml) and the environment.

        `overrides` replace top-level sections or fields, e.g. `training={"epochs": 1}` (merged into the file's
        section) - tests and the benchmark use this to shrink a run.
        """
        import yaml

        path = Path(path or os.environ.get("CL_PIPELINE_CONFIG") or DEFAULT_CONFIG)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as exc:
            raise ConfigError(f"pipeline config {path} not found; pass a path or set CL_PIPELINE_CONFIG") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"pipeline config {path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"pipeline config {path} must be a mapping of sections, got {type(raw).__name__}")
        for key, value in overrides.items():
            raw[key] = ({**(raw.get(key) or {}), **value} if isinstance(value, dict) and key != "gate"
                        else value)
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
        known = {"training", "schedule", "validation", "evaluation", "gate", "model_name", "experiment",
                 "stable_name", "keep_versions", "state_dir"}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; known: {sorted(known)}")
        training = dict(raw.get("training") or {})
        round_keys = {f.name for f in dataclasses.fields(TrainingSettings)} - {"continual"}
        round_args = {k: training.pop(k) for k in list(training) if k in round_keys}
        try:
            continual = ContinualConfig(**training)
        except TypeError as exc:
            fields = sorted({f.name for f in dataclasses.fields(ContinualConfig)} | round_keys)
            raise ConfigError(f"{source}: training: {exc}; known fields: {fields}") from exc
        state_dir = Path(os.environ.get("CL_PIPELINE_STATE", raw.get("state_dir") or REPO_ROOT / ".state" /
                                        "pipeline"))
        return cls(training=TrainingSettings(continual=continual, **round_args),
                   endpoints=Endpoints.from_env(),
                   schedule=_section(ScheduleSettings, raw, "schedule", source),
                   validation=_section(ValidationSettings, raw, "validation", source),
                   evaluation=_section(EvaluationSettings, raw, "evaluation", source),
                   gate=parse_gate(raw.get("gate"), source),
                   **{k: raw[k] for k in ("model_name", "experiment", "stable_name", "keep_versions") if k in raw},
                   state_dir=state_dir if state_dir.is_absolute() else REPO_ROOT / state_dir, source=source)


def parse_gate(section: Mapping[str, Any] | None, source: str = "<dict>") -> GateRules:
    """The `gate:` section as `GateRules` (null or {} = the defaults); a bad rule raises `GateConfigError` (a
    `ConfigError`) naming the file, the key and what it accepts."""
    try:
        return GateRules.from_mapping(section)
    except GateConfigError as exc:
        raise GateConfigError(f"{source}: {exc}") from None


def _section(kind: type, raw: dict[str, Any], name: str, source: str) -> Any:
    values = raw.get(name) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {name!r} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{source}: {name}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    if name == "schedule" and "cron" in values and "interval_minutes" not in values:
        values = {**values, "interval_minutes": None}
    return kind(**values)
