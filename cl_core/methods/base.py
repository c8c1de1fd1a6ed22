"""The contract every anti-forgetting method follows, and the registry that finds methods by name.

A method never reaches into the learner. It *returns* things the learner applies: an extra loss term
(`penalty`), a trainable mask (`trainable_mask`, False = frozen, restored bit-exactly after each step), a batch
transform (`transform_batch`, e.g. replay) and, at the end of a task, parameter edits (`end_task`, e.g. PackNet's
pruning). What a method needs from the learner (current weights, squared gradients for a Fisher estimate) it asks
through the read-only `LearnerView`. That keeps methods combinable as a list (`MethodSet`) and testable alone.

Task boundaries: `begin_task` / `end_task` bracket each group of experiences with one task tag in a learning round.
A tag seen before continues its task (progressive and O-LoRA reuse its adapter block; PackNet lets it train what
it owns); online methods (EWC, L2) consolidate at every `end_task`, which is the streaming form of these methods.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from safetensors.torch import load_file, save_file

from cl_core.errors import CheckpointError, InvalidInputError
from cl_core.learner.peft_learner import Example
from cl_core.registry import Registry, package_loader


@dataclass(frozen=True)
class MethodSettings:
    """The knobs of all methods (taken from `ContinualConfig`); each method reads the ones it uses."""

    lora_rank: int = 16
    ewc_lambda: float = 0.4
    ewc_gamma: float = 0.9
    ewc_samples: int = 32
    l2_lambda: float = 0.01
    olora_lambda: float = 0.5
    max_tasks: int = 4
    replay_ratio: float = 0.5
    replay_strategy: str = "random"
    replay_memory: int = 1000
    batch_size: int = 8
    seed: int = 0
    neighbourhood_size: int = 8
    neighbourhood_answer_tokens: int = 32
    neighbourhood_memory: int = 1000
    neighbourhood_pool: str = "builtin"
    neighbourhood_anchor: str = "first"
    neighbourhood_weight: float = 1.0
    neighbourhood_recall: int = 0

    @classmethod
    def from_config(cls, config: Any) -> MethodSettings:
        """The method knobs of a `ContinualConfig` (same field names): one source, so the two cannot drift."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class TaskContext:
    """The task a group of training examples belongs to: its tag, the order it was first seen, its examples."""

    name: str
    index: int
    examples: Sequence[Example]
    example_ids: Sequence[int] = ()
    example_losses: Sequence[float] = ()


class LearnerView(Protocol):
    """What a method may ask of the learner. Read-only: nothing here changes the learner."""

    def lora_parameters(self) -> dict[str, torch.Tensor]:
        """Current trainable LoRA tensors by PEFT name (live tensors: use them in a penalty, never write them)."""
        ...

    def squared_gradients(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Mean over examples of each example's squared loss gradient (the empirical diagonal Fisher)."""
        ...


class ExampleSource(Protocol):
    """Turns stored experience ids into training examples and feature vectors (used by replay)."""

    def examples(self, ids: Sequence[int]) -> list[tuple[int, Example]]: ...

    def embeddings(self, ids: Sequence[int]) -> torch.Tensor: ...

    def gradients(self, ids: Sequence[int]) -> torch.Tensor: ...


class AntiForgettingMethod:
    """Base class: every hook has a neutral default, so a method overrides only what it changes."""

    name: ClassVar[str] = ""
    per_task_blocks: ClassVar[bool] = False
    """True when each task trains its own rank block of `lora_rank` (progressive, olora, packnet): the adapter then
    has `max_tasks` blocks, and a config may hold at most one such method. `ContinualConfig` derives the adapter's
    rank and that check from this attribute, so a new block method needs no edit there."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A method that sizes the adapter itself (overrides `rank_blocks`) without declaring `per_task_blocks`
        # carves per-task blocks: that is how progressive and packnet said so before the attribute existed.
        if "per_task_blocks" not in cls.__dict__ and "rank_blocks" in cls.__dict__:
            cls.per_task_blocks = True

    def __init__(self, settings: MethodSettings, source: ExampleSource | None = None) -> None:
        self.settings = settings
        self.source = source

    # --- how the adapter must be shaped -----------------------------------------------------------------------
    def rank_blocks(self) -> int:
        """How many rank blocks of `lora_rank` the adapter needs: `max_tasks` for per-task block methods, else 1."""
        return self.settings.max_tasks if self.per_task_blocks else 1

    # --- hooks ------------------------------------------------------------------------------------------------
    def begin_task(self, task: TaskContext, learner: LearnerView) -> None:
        """A group of examples of `task` is about to be trained on."""

    def replay_slots(self, batch_size: int) -> int:
        """How many places of each batch this method fills itself (replay); the rest are new examples."""
        return 0

    def transform_batch(self, batch: list[Example], exclude_ids: Sequence[int]) -> list[Example]:
        """The batch actually trained on (e.g. new examples plus replayed ones)."""
        return batch

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """An extra loss term on the current parameters, or None."""
        return None

    def trainable_mask(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """Bool tensors per parameter name (True = may change); names left out are fully trainable."""
        return None

    def end_task(self, task: TaskContext, learner: LearnerView) -> dict[str, torch.Tensor] | None:
        """The group was trained on: consolidate. May return new values for some parameters (e.g. pruning)."""
        return None

    def after_step(self, batch_losses: Sequence[float]) -> None:
        """Per-example losses of the batch just trained on, in the order `transform_batch` returned it (replay
        refreshes the loss priorities of what it replayed: they go stale otherwise)."""

    # --- state ------------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors (saved as safetensors) and JSON-able metadata that restore this method exactly."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state()` returned."""


METHODS: Registry[type[AntiForgettingMethod]] = Registry("anti-forgetting method",
                                                         loader=package_loader("cl_core.methods"))
"""Every anti-forgetting method by name. The first lookup imports each module of `cl_core.methods`, so a new
method is one new file there with `@register_method("name")`; `ContinualConfig` checks names against this."""


def register_method(name: str) -> Callable[[type[AntiForgettingMethod]], type[AntiForgettingMethod]]:
    """Class decorator: make a method available under `name` (in configs and `make_method`)."""
    register = METHODS.register(name)

    def decorate(cls: type[AntiForgettingMethod]) -> type[AntiForgettingMethod]:
        if not (isinstance(cls, type) and issubclass(cls, AntiForgettingMethod)):
            raise InvalidInputError(f"@register_method({name!r}) decorates AntiForgettingMethod subclasses, "
                                    f"got {cls!r}")
        return register(cls)

    return decorate


def available_methods() -> list[str]:
    """Names accepted by `make_method` and `ContinualConfig.anti_forgetting`, sorted."""
    return METHODS.names()


def make_method(name: str, settings: MethodSettings, source: ExampleSource | None = None) -> AntiForgettingMethod:
    """The method registered as `name`; an unknown name raises `InvalidInputError` listing the known ones."""
    return METHODS.get(name)(settings, source)


def save_tensors_and_meta(directory: Path, stem: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """`<stem>.safetensors` + `<stem>.json`: the no-pickle format of every method's state."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps(meta))


def load_tensors_and_meta(directory: Path, stem: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        tensors = load_file(str(directory / f"{stem}.safetensors"))
        meta = json.loads((directory / f"{stem}.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"method state {stem!r} in {directory} is missing or unreadable: {exc}") from exc
    return tensors, meta
