"""Priority functions: how important a stored experience is, and the sampling weight that follows from it.

Why two numbers: the store keeps a *raw* priority per experience (a loss, a reward, a timestamp, an uncertainty)
because that is what a person can read and what keeps its meaning across restarts and processes. The sum-tree
that samples proportionally needs a non-negative *weight*; each function maps raw priorities to weights in one
vectorized call, so the store can rebuild a million weights from SQLite in milliseconds. Eviction orders by the
raw priority (lowest first), which every weight function preserves (weights are non-decreasing in the raw value).

Functions are registered by name (`ContinualConfig.priority_function` picks one); an unknown name is an
`InvalidInputError` that lists the known names. A configured instance (e.g. `Recency(half_life_s=3600)`) can be
passed to `ExperienceStore` instead of a name.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from cl_core.errors import InvalidInputError
from cl_core.registry import Registry

# Added to clamped weights: an item of weight 0 could never be drawn, and a group of all-zero weights (e.g. only
# feedback with reward ≤ 0) could not be sampled at all. 1e-6 is far below any loss or rating that matters.
EPSILON = 1e-6
# An unrated experience is weighted like a plain thumbs-up: the learner also trains it with weight 1.0.
NEUTRAL_REWARD = 1.0


class PriorityFunction:
    """Base class: `initial` gives the raw priority of a new experience, `weights` maps raw priorities to weights.

    `initial` may return None for "not measured yet" (a loss before any training): the store then uses the
    highest raw priority it holds, so a new experience is sampled at least as eagerly as the hardest known one
    (the convention of prioritized experience replay, Schaul et al. 2016).
    """

    name: ClassVar[str] = ""
    #: `mark_learned(ids, losses)` replaces the raw priority by the measured loss.
    updated_by_loss: ClassVar[bool] = False
    #: Weights depend only on differences of raw values (`weights(raw, anchor)` uses `raw - anchor`); the store
    #: re-anchors all weights when new values would overflow.
    anchored: ClassVar[bool] = False

    def initial(self, *, reward: float | None, kind: str, created_at: float,
                uncertainty: float | None) -> float | None:
        raise NotImplementedError

    def weights(self, raw: np.ndarray, anchor: float = 0.0) -> np.ndarray:
        """Non-negative weights, non-decreasing in `raw` (default: the raw value clamped at 0, plus EPSILON)."""
        return np.maximum(np.asarray(raw, dtype=np.float64), 0.0) + EPSILON

    def anchor(self, raw: np.ndarray) -> float:
        """The reference value for anchored functions (ignored by the others)."""
        return 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


PRIORITY_FUNCTIONS: Registry[type[PriorityFunction]] = Registry("priority function")
"""Every priority function by name (the built-ins are defined below, in this module); `ContinualConfig`
checks `priority_function` against it."""


def register(cls: type[PriorityFunction]) -> type[PriorityFunction]:
    """Class decorator: make a priority function available by its `name`."""
    if not (isinstance(cls, type) and issubclass(cls, PriorityFunction)):
        raise InvalidInputError(f"@register decorates PriorityFunction subclasses, got {cls!r}")
    if not cls.name:
        raise InvalidInputError(f"{cls.__name__} needs a non-empty `name` to be registered")
    return PRIORITY_FUNCTIONS.register(cls.name)(cls)


def priority_names() -> tuple[str, ...]:
    """Registered priority function names, sorted."""
    return tuple(PRIORITY_FUNCTIONS.names())


def get_priority_function(spec: str | PriorityFunction, **options: Any) -> PriorityFunction:
    """The priority function named `spec` (built with `options`), or `spec` itself if it already is one."""
    if isinstance(spec, PriorityFunction):
        return spec
    return PRIORITY_FUNCTIONS.get(spec)(**options)


@register
class Loss(PriorityFunction):
    """The latest training loss (mean token cross-entropy): hard examples are replayed more.

    Unknown until the experience is first trained on; then refreshed by every `mark_learned(ids, losses)`.
    """

    name = "loss"
    updated_by_loss = True

    def initial(self, *, reward: float | None, kind: str, created_at: float,
                uncertainty: float | None) -> float | None:
        return None


@register
class Uncertainty(PriorityFunction):
    """The model's uncertainty about the response when it was served (see `uncertainty()` for the measure).

    Measured once at serving time (from the engine's token logprobs) and passed to `add` as `priority` or as
    `token_logprobs` / `top_logprobs`; without a measurement it is treated like an unmeasured loss.
    """

    name = "uncertainty"

    def initial(self, *, reward: float | None, kind: str, created_at: float,
                uncertainty: float | None) -> float | None:
        return uncertainty


@register
class Reward(PriorityFunction):
    """The rating. Weight = max(reward, 0) + EPSILON; unrated counts as NEUTRAL_REWARD (1.0).

    Negative rewards are clamped rather than shifted: a bad rating means "do not imitate", which as a replay
    weight is worth no more than a zero rating. Shifting by the lowest reward seen would make every weight depend
    on one outlier and change all weights whenever a new minimum arrives. Such experiences are `feedback_only`
    anyway, so they only meet this weight when feedback-only experiences are sampled explicitly.
    """

    name = "reward"

    def initial(self, *, reward: float | None, kind: str, created_at: float,
                uncertainty: float | None) -> float | None:
        return NEUTRAL_REWARD if reward is None else float(reward)


@register
class Recency(PriorityFunction):
    """Newer is more important: raw priority = creation time, weight halves every `half_life_s` seconds of age.

    An exponential decay is the only weighting that needs no refresh as time passes: the ratio of two weights
    depends only on the difference of their creation times, so stored weights never go stale. Evicting the
    lowest raw priority first is FIFO (oldest first).
    """

    name = "recency"
    anchored = True

    def __init__(self, half_life_s: float = 86_400.0) -> None:
        if not _finite_number(half_life_s) or half_life_s <= 0:
            raise InvalidInputError(f"half_life_s must be a positive number of seconds, got {half_life_s!r}")
        self.half_life_s = float(half_life_s)

    def initial(self, *, reward: float | None, kind: str, created_at: float,
                uncertainty: float | None) -> float | None:
        return created_at

    def weights(self, raw: np.ndarray, anchor: float = 0.0) -> np.ndarray:
        with np.errstate(over="ignore"):
            return np.exp2((np.asarray(raw, dtype=np.float64) - anchor) / self.half_life_s)

    def anchor(self, raw: np.ndarray) -> float:
        return float(np.max(raw)) if len(raw) else time.time()

    def __repr__(self) -> str:
        return f"Recency(half_life_s={self.half_life_s})"


def uncertainty(token_logprobs: Sequence[float] | None = None,
                top_logprobs: Sequence[Mapping[Any, Any] | Sequence[float]] | None = None) -> float:
    """Uncertainty of a served response, in nats per token (≥ 0).

    - With `top_logprobs` (per generated position, the engine's top-k logprobs: a dict token -> logprob or
      vLLM `Logprob`, or a plain list of logprobs): the mean entropy of the top-k distribution, renormalized.
      Entropy measures how unsure the model was at each step even where it emitted a likely token; top-k
      entropy underestimates the full one, but ranks responses the same way for a fixed k.
    - Otherwise, with `token_logprobs` (the logprob of each emitted token, e.g. vLLM `logprobs=0`): the mean
      negative logprob, i.e. the per-token surprisal (log perplexity) of the response. Every engine gives it,
      and it is the loss the learner would see on this response.
    """
    if top_logprobs is not None:
        if not isinstance(top_logprobs, Sequence) or isinstance(top_logprobs, str) or not top_logprobs:
            raise InvalidInputError("top_logprobs must be a non-empty list with one top-k distribution per token")
        return float(np.mean([_entropy(i, position) for i, position in enumerate(top_logprobs)]))
    if token_logprobs is None:
        raise InvalidInputError("uncertainty needs token_logprobs (one logprob per generated token) or top_logprobs")
    values = _logprob_list("token_logprobs", token_logprobs)
    if not values:
        raise InvalidInputError("token_logprobs is empty: give one logprob per generated token")
    return float(-np.mean(values))


def _entropy(i: int, position: Mapping[Any, Any] | Sequence[float]) -> float:
    raw = list(position.values()) if isinstance(position, Mapping) else position
    values = np.array(_logprob_list(f"top_logprobs[{i}]", raw, allow_minus_inf=True))
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        raise InvalidInputError(f"top_logprobs[{i}] has no finite logprob: give the top-k logprobs of that token")
    logp = finite - (finite.max() + np.log(np.exp(finite - finite.max()).sum()))
    return float(-(np.exp(logp) * logp).sum())


def _logprob_list(name: str, values: Any, allow_minus_inf: bool = False) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InvalidInputError(f"{name} must be a list of logprobs (floats ≤ 0), got {type(values).__name__}")
    out = []
    for j, value in enumerate(values):
        value = getattr(value, "logprob", value)  # vLLM `Logprob` objects carry the number in `.logprob`
        ok = (_finite_number(value) or (allow_minus_inf and value == -math.inf)) and value <= 1e-6
        if not ok:
            raise InvalidInputError(f"{name}[{j}] must be a log-probability (a finite float ≤ 0), got {value!r}")
        out.append(float(value))
    return out


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
