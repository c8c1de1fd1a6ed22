"""`MethodSet`: several anti-forgetting methods used together, e.g. `["replay", "ewc"]` or `["olora", "replay"]`.

Penalties add up, trainable masks intersect (a weight frozen by any method stays frozen), batch transforms run in
the given order, and parameter edits are applied in order. The set also owns the task registry (tag -> index, in
the order tasks were first seen) and saves every method's state as `<method>.safetensors` + `<method>.json`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from cl_core.errors import CheckpointError, InvalidInputError
from cl_core.learner.peft_learner import Example
from cl_core.methods.base import (
    AntiForgettingMethod,
    ExampleSource,
    LearnerView,
    MethodSettings,
    TaskContext,
    load_tensors_and_meta,
    make_method,
    save_tensors_and_meta,
)


class MethodSet:
    """The methods of one model, applied together through the learner's step."""

    def __init__(self, names: Sequence[str], settings: MethodSettings, source: ExampleSource | None = None) -> None:
        if not names:
            raise InvalidInputError("give at least one anti-forgetting method name, or 'none'")
        if len(set(names)) != len(names):
            raise InvalidInputError(f"anti-forgetting methods are listed twice: {list(names)}")
        self.names = list(names)
        self.settings = settings
        self.methods: list[AntiForgettingMethod] = [make_method(n, settings, source) for n in names]
        blocks = {m.rank_blocks() for m in self.methods} - {1}
        if len(blocks) > 1:
            raise InvalidInputError(f"methods {names} need different adapter layouts; combine at most one of "
                                    "progressive, olora and packnet")
        block_owners = [m.name for m in self.methods if m.rank_blocks() > 1]
        if len(block_owners) > 1:
            raise InvalidInputError(f"{' and '.join(block_owners)} each split the adapter into per-task blocks "
                                    "their own way; use only one of them")
        self.tasks: dict[str, int] = {}

    def rank_blocks(self) -> int:
        return max(m.rank_blocks() for m in self.methods)

    def task(self, name: str, examples: Sequence[Example], ids: Sequence[int] = (),
             losses: Sequence[float] = ()) -> TaskContext:
        index = self.tasks.setdefault(name, len(self.tasks))
        return TaskContext(name=name, index=index, examples=list(examples), example_ids=list(ids),
                           example_losses=list(losses))

    def begin_task(self, task: TaskContext, learner: LearnerView) -> None:
        for method in self.methods:
            method.begin_task(task, learner)

    def end_task(self, task: TaskContext, learner: LearnerView) -> dict[str, torch.Tensor]:
        edits: dict[str, torch.Tensor] = {}
        for method in self.methods:
            edits |= method.end_task(task, learner) or {}
        return edits

    def replay_slots(self, batch_size: int) -> int:
        return min(batch_size - 1, sum(m.replay_slots(batch_size) for m in self.methods))

    def transform_batch(self, batch: list[Example], exclude_ids: Sequence[int]) -> list[Example]:
        for method in self.methods:
            batch = method.transform_batch(batch, exclude_ids)
        return batch

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        terms = [t for t in (m.penalty(params) for m in self.methods) if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def trainable_mask(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        combined: dict[str, torch.Tensor] = {}
        for method in self.methods:
            for name, mask in (method.trainable_mask(params) or {}).items():
                combined[name] = mask if name not in combined else combined[name] & mask
        return combined or None

    def after_step(self, batch_losses: Sequence[float]) -> None:
        for method in self.methods:
            method.after_step(batch_losses)

    # --- state ------------------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for method in self.methods:
            tensors, meta = method.state()
            save_tensors_and_meta(directory, method.name, tensors, meta)
        (directory / "methods.json").write_text(json.dumps({"names": self.names, "tasks": self.tasks}))

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        try:
            saved = json.loads((directory / "methods.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"no readable methods.json in {directory}: {exc}") from exc
        if saved["names"] != self.names:
            raise CheckpointError(f"the checkpoint's anti-forgetting methods are {saved['names']}, this model "
                                  f"uses {self.names}; load it with anti_forgetting={saved['names']}")
        for method in self.methods:
            method.load_state(*load_tensors_and_meta(directory, method.name))
        self.tasks = {str(k): int(v) for k, v in saved["tasks"].items()}
