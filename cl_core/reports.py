"""What learning returns: small frozen records a person (or a Prefect artifact) can read."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class AdapterVersion:
    """One published adapter version: where it is, what it came from and why it exists."""

    version: int
    name: str
    path: str
    created_at: float
    parent: int | None
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    adapter: str = "default"
    """The bank adapter this is a version of (`default` for a model with one adapter)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LearnReport:
    """Outcome of `learn()`: steps, losses on the new data before/after, and the published version (or None)."""

    steps: int
    skipped_steps: int
    num_new: int
    num_replayed: int
    loss_before: float
    loss_after: float
    version: AdapterVersion | None
    seconds: float
    message: str = ""
    tasks: tuple[str, ...] = ()
    adapters: dict[str, AdapterVersion] = field(default_factory=dict)
    """With a bank: the version each trained adapter published this round (the others did not change)."""

    @property
    def published(self) -> bool:
        return self.version is not None


@dataclass(frozen=True)
class CorrectionReport:
    """Outcome of `learn_from_correction`: whether the good response became the greedy answer, and at what cost."""

    steps: int
    skipped_steps: int
    loss_before: float
    loss_after: float
    min_margin: float
    learned: bool
    version: AdapterVersion | None
    seconds: float
    preference_id: int | None
    message: str = ""
    adapter: str = "default"
    """The bank adapter the correction trained."""


@dataclass(frozen=True)
class ScoreResult:
    """Log-likelihood of a response given a prompt under the served version, computed by vLLM."""

    total_logprob: float
    mean_logprob: float
    num_tokens: int
    token_logprobs: list[float]
    adapter_version: int | None

    @property
    def perplexity(self) -> float:
        return math.exp(-self.mean_logprob)


@dataclass(frozen=True)
class RetentionReport:
    """Outcome of `evaluate_retention`: per-task accuracy of one served version (None = the bare base model)."""

    scores: dict[str, float]
    version: int | None
    seconds: float

    def __getitem__(self, task: str) -> float:
        return self.scores[task]

    @property
    def mean(self) -> float:
        return sum(self.scores.values()) / len(self.scores) if self.scores else float("nan")
