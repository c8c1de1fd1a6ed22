"""The replay-strategy interface, its registry, and state persistence (safetensors + JSON, no pickle).

A replay strategy answers two questions for rehearsal-based continual learning (Rolnick et al., "Experience
Replay for Continual Learning", NeurIPS 2019; Chaudhry et al., "On Tiny Episodic Memories in Continual Learning",
2019): WHAT TO KEEP in a bounded memory as the stream of experiences goes by, and WHAT TO PICK from it for a
training batch. The experiences themselves (text) stay in the experience store; a strategy handles only their
integer ids plus the little per-item data its rule needs (task tag, loss, a feature vector), and keeps that data
only for the items in memory, so its size is bounded by `capacity` however long the stream runs.

Every strategy is deterministic given its seed: all randomness comes from one numpy PCG64 generator whose state is
part of `state()`, so a restored strategy makes exactly the choices the saved one would have made.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import numbers
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cl_core.errors import CheckpointError, InvalidInputError
from cl_core.registry import Registry, package_loader

STATE_FORMAT = 1
TENSORS_FILE = "replay.safetensors"
META_FILE = "replay.json"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One experience offered to the replay memory: its id in the experience store, its task/domain tag and,
    when the learner has computed it, its current training loss (non-negative)."""

    id: int
    task: str
    loss: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, numbers.Integral) or isinstance(self.id, bool):
            raise InvalidInputError(f"Candidate.id must be an integer experience id, got {self.id!r}")
        if not isinstance(self.task, str) or not self.task:
            raise InvalidInputError(f"Candidate.task must be a non-empty string, got {self.task!r}")
        object.__setattr__(self, "id", int(self.id))
        if self.loss is not None:
            object.__setattr__(self, "loss", check_loss(self.loss, f"Candidate(id={self.id}).loss"))


@runtime_checkable
class FeatureSource(Protocol):
    """Computes per-item vectors lazily, only for strategies that need them (the learner implements this).

    It is asked only about the ids being observed, once per `observe` call, so costly forward/backward passes
    are spent only where a strategy's rule needs them."""

    def embeddings(self, ids: Sequence[int]) -> torch.Tensor:
        """[len(ids), d] float32: one representation per experience (e.g. the mean last hidden state)."""
        ...

    def gradients(self, ids: Sequence[int]) -> torch.Tensor:
        """[len(ids), p] float32: one loss gradient per experience, possibly random-projected to p dimensions."""
        ...


def check_loss(value: Any, what: str) -> float:
    """A loss as a finite non-negative float, or InvalidInputError naming `what`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInputError(f"{what} must be a real number, got {value!r}")
    loss = float(value)
    if not math.isfinite(loss) or loss < 0:
        raise InvalidInputError(f"{what} must be finite and ≥ 0 (a training loss), got {loss}")
    return loss


def check_vectors(value: Any, ids: Sequence[int], what: str, dim: int | None = None) -> torch.Tensor:
    """Validate what a FeatureSource returned: a finite [len(ids), d] tensor (d == `dim` when given)."""
    if not isinstance(value, torch.Tensor):
        raise InvalidInputError(f"FeatureSource.{what} must return a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2 or value.shape[0] != len(ids) or value.shape[1] < 1:
        raise InvalidInputError(f"FeatureSource.{what} must return shape [{len(ids)}, d ≥ 1] for {len(ids)} ids, "
                                f"got {list(value.shape)}")
    if dim is not None and value.shape[1] != dim:
        raise InvalidInputError(f"FeatureSource.{what} returned dimension {value.shape[1]}, but the vectors already "
                                f"in memory have dimension {dim}: keep the feature extractor fixed for a memory")
    out = value.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not torch.isfinite(out).all():
        raise InvalidInputError(f"FeatureSource.{what} returned NaN or inf")
    return out


def _check_count(n: Any, what: str) -> int:
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise InvalidInputError(f"{what} must be an integer ≥ 0, got {n!r}")
    return int(n)


class ReplayStrategy(ABC):
    """What to keep in a bounded replay memory and what to pick from it. Subclasses implement the `_` hooks;
    the public methods validate arguments and enforce the contract shared by all strategies.

    Options are keyword-only parameters of a subclass's `__init__`, stored as attributes of the same name; they
    are saved with the state so `load_replay_strategy` can rebuild the exact strategy."""

    name: ClassVar[str]
    needs_features: ClassVar[str | None] = None
    """"embeddings" or "gradients" when `observe` needs a FeatureSource; None when it does not."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if not isinstance(capacity, numbers.Integral) or isinstance(capacity, bool) or capacity <= 0:
            raise InvalidInputError(f"replay capacity must be an integer ≥ 1 (items kept in memory), got {capacity!r}")
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0:
            raise InvalidInputError(f"replay seed must be an integer ≥ 0, got {seed!r}")
        self.capacity = int(capacity)
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)

    # -- public contract -------------------------------------------------------------------------------------

    @property
    @abstractmethod
    def memory(self) -> list[int]:
        """The ids in memory, in a deterministic order (a new list; never more than `capacity`)."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @property
    def options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.option_names()}

    def observe(self, candidates: Sequence[Candidate], features: FeatureSource | None = None) -> list[int]:
        """Offer new experiences to the memory; returns the ids that were in memory before and are not after.

        Ids already in memory, and repeats within `candidates`, are not offered again (a strategy may still
        refresh what it knows about them, e.g. a new loss). A candidate that was offered and not kept is not in
        the result: it never was in memory."""
        if self.needs_features is not None and features is None:
            raise InvalidInputError(f"replay strategy {self.name!r} needs a FeatureSource ({self.needs_features}) "
                                    f"in observe(); pass features=..., or use 'random' or 'priority'")
        before = self.memory
        in_memory = set(before)
        fresh: list[Candidate] = []
        known: list[Candidate] = []
        seen: set[int] = set()
        for c in candidates:
            if not isinstance(c, Candidate):
                raise InvalidInputError(f"observe() takes Candidate objects, got {type(c).__name__}")
            if c.id in seen:
                continue
            seen.add(c.id)
            (known if c.id in in_memory else fresh).append(c)
        if known:
            self._refresh(known)
        if fresh:
            self._observe(fresh, features)
        after = set(self.memory)
        if len(after) > self.capacity:  # a broken strategy must not silently grow without bound
            raise AssertionError(f"{self.name}: memory holds {len(after)} > capacity {self.capacity}")
        return [i for i in before if i not in after]

    def select(self, n: int, exclude: Collection[int] = ()) -> list[int]:
        """Up to `n` distinct ids from memory, none in `exclude` (fewer only when fewer are eligible)."""
        n = _check_count(n, "select(n)")
        skip = set(exclude)
        eligible = [i for i in self.memory if i not in skip]
        if n == 0 or not eligible:
            return []
        return self._select(eligible, min(n, len(eligible)))

    def update(self, ids: Sequence[int], losses: Sequence[float]) -> None:
        """Report fresh losses for replayed ids (after a training step). Only loss-driven strategies use them;
        ids no longer in memory are ignored."""
        ids, losses = list(ids), list(losses)
        if len(ids) != len(losses):
            raise InvalidInputError(f"update() needs one loss per id: got {len(ids)} ids and {len(losses)} losses")
        checked = [check_loss(v, f"update() loss for id {i}") for i, v in zip(ids, losses, strict=True)]
        self._update([int(i) for i in ids], checked)

    def discard(self, ids: Collection[int]) -> None:
        """The experience store evicted these ids: forget them (unknown ids are ignored)."""
        gone = set(self.memory).intersection(int(i) for i in ids)
        if gone:
            self._discard(gone)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors for safetensors plus JSON-able metadata: everything needed for an exact restore."""
        tensors, data = self._state()
        meta = {"format": STATE_FORMAT, "strategy": self.name, "capacity": self.capacity, "seed": self.seed,
                "options": self.options, "rng": copy.deepcopy(self._rng.bit_generator.state), "data": data}
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state()` returned, RNG included. Name, capacity and options must match the saved ones;
        the seed need not (the RNG position is restored, and `seed` reports the saved one)."""
        if meta.get("format") != STATE_FORMAT:
            raise CheckpointError(f"replay state format {meta.get('format')!r} is not supported "
                                  f"(this version reads {STATE_FORMAT})")
        mismatch = [f"{key} {meta.get(key)!r} (here {mine!r})"
                    for key, mine in (("strategy", self.name), ("capacity", self.capacity), ("options", self.options))
                    if meta.get(key) != mine]
        if mismatch:
            raise CheckpointError(f"replay state was saved with {', '.join(mismatch)}; build the strategy with the "
                                  f"saved settings, or use load_replay_strategy(directory)")
        try:
            self._load_state(tensors, meta["data"])
            self._rng.bit_generator.state = copy.deepcopy(meta["rng"])
            self.seed = int(meta["seed"])  # only the RNG's starting point; its saved position is what counts
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"replay state for {self.name!r} is damaged: {exc!r}") from exc
        if len(self.memory) > self.capacity:
            raise CheckpointError(f"replay state holds {len(self.memory)} items > capacity {self.capacity}")

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `replay.safetensors` and `replay.json` into `directory` (created if missing)."""
        path = Path(directory)
        try:
            path.mkdir(parents=True, exist_ok=True)
            tensors, meta = self.state()
            _atomic_write(path / TENSORS_FILE, lambda tmp: save_file(tensors, str(tmp)))
            _atomic_write(path / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta)))
        except OSError as exc:
            raise CheckpointError(f"cannot write the replay state to {path}: {exc}") from exc

    def load(self, directory: str | os.PathLike[str]) -> None:
        """Restore this strategy from what `save(directory)` wrote."""
        tensors, meta = read_state(directory)
        self.load_state(tensors, meta)

    # -- hooks for subclasses ----------------------------------------------------------------------------------

    @abstractmethod
    def _observe(self, fresh: list[Candidate], features: FeatureSource | None) -> None:
        """Offer candidates that are not in memory (distinct ids); `features` is set when `needs_features` is."""

    def _refresh(self, known: list[Candidate]) -> None:  # noqa: B027 - a no-op is the right default
        """Candidates whose ids are already in memory were observed again (default: nothing to do)."""

    def _select(self, eligible: list[int], k: int) -> list[int]:
        """Exactly `k` distinct ids out of `eligible` (1 ≤ k ≤ len(eligible)); default: uniform."""
        return self._uniform(eligible, k)

    def _update(self, ids: list[int], losses: list[float]) -> None:  # noqa: B027 - a no-op is the right default
        """Fresh losses for replayed ids (default: ignored)."""

    @abstractmethod
    def _discard(self, ids: set[int]) -> None:
        """Forget these ids (all are in memory)."""

    @abstractmethod
    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Strategy-specific tensors and JSON-able data."""

    @abstractmethod
    def _load_state(self, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
        """Inverse of `_state`."""

    # -- helpers ------------------------------------------------------------------------------------------------

    def _uniform(self, items: Sequence[int], k: int) -> list[int]:
        picked = self._rng.choice(len(items), size=k, replace=False)
        return [items[int(i)] for i in picked]

    def _features(self, features: FeatureSource | None) -> FeatureSource:
        if features is None:  # observe() checked already; this keeps type checkers and direct hook calls honest
            raise InvalidInputError(f"replay strategy {self.name!r} needs a FeatureSource")
        return features


def _atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def read_state(directory: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read what `ReplayStrategy.save` wrote, as (tensors, meta)."""
    path = Path(directory)
    try:
        tensors = load_file(str(path / TENSORS_FILE))
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"no replay state in {path}: {exc.filename} is missing") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the replay state in {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META_FILE} does not hold a replay state object")
    return tensors, meta


# -- registry -------------------------------------------------------------------------------------------------

REPLAY_STRATEGIES: Registry[type[ReplayStrategy]] = Registry("replay strategy",
                                                             loader=package_loader("cl_core.replay"))
"""Every replay strategy by name. The first lookup imports each module of `cl_core.replay`, so a new strategy is one
new file there with `@register_replay_strategy("name")`; `ContinualConfig.replay_strategy` is checked against it."""
S = TypeVar("S", bound=type[ReplayStrategy])


def register_replay_strategy(name: str) -> Callable[[S], S]:
    """Class decorator: make a ReplayStrategy subclass available to `make_replay_strategy(name, ...)`."""
    register = REPLAY_STRATEGIES.register(name)

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, ReplayStrategy)):
            raise TypeError(f"@register_replay_strategy({name!r}) decorates ReplayStrategy subclasses, got {cls!r}")
        return register(cls)

    return decorate


def available_replay_strategies() -> list[str]:
    """Names accepted by `make_replay_strategy`, sorted."""
    return REPLAY_STRATEGIES.names()


def make_replay_strategy(name: str, capacity: int, seed: int = 0, **options: Any) -> ReplayStrategy:
    """Build the strategy registered as `name`; unknown names or options raise InvalidInputError listing the
    accepted ones."""
    cls = REPLAY_STRATEGIES.get(name)
    unknown = sorted(set(options) - set(cls.option_names()))
    if unknown:
        raise InvalidInputError(f"replay strategy {name!r} has no option {', '.join(unknown)}; its options: "
                                f"{', '.join(cls.option_names()) or 'none'}")
    return cls(capacity, seed, **options)


def load_replay_strategy(directory: str | os.PathLike[str]) -> ReplayStrategy:
    """Rebuild a strategy (name, capacity, seed, options) from a saved state and restore it exactly."""
    tensors, meta = read_state(directory)
    try:
        strategy = make_replay_strategy(meta["strategy"], meta["capacity"], meta["seed"], **meta["options"])
    except (KeyError, TypeError, InvalidInputError) as exc:
        raise CheckpointError(f"the replay state in {directory} names no usable strategy: {exc}") from exc
    strategy.load_state(tensors, meta)
    return strategy
