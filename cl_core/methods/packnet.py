"""`packnet`: prune and freeze per-task parts of the adapter (Mallya & Lazebnik 2018, adapted to LoRA).

PackNet trains a task on the free weights, keeps the most important ones for that task, frees the rest, and
freezes what it kept. On a LoRA adapter the unit is a rank-1 component (row c of lora_A with column c of lora_B):
pruning single entries of A and B would still couple tasks through the product B·A, whereas a component owned by
one task is isolated exactly. The adapter has `max_tasks * lora_rank` components per layer. A task trains every
free component plus the ones it already owns; at `end_task` it keeps the `lora_rank` components with the largest
contribution ||B[:, c]|| * ||A[c, :]|| per layer and returns the others to the pool: B column zeroed (so the
served delta drops them) and A row re-initialised like PEFT does, ready for the next task. Unlike the original,
there is no re-training after pruning and all kept components serve every request (no task id at inference).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from cl_core.errors import InvalidInputError
from cl_core.methods.base import AntiForgettingMethod, LearnerView, TaskContext, register_method
from cl_core.methods.blocks import component_mask, is_lora_a, partner, rank_of

FREE = -1


@register_method("packnet")
class PackNet(AntiForgettingMethod):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner: dict[str, torch.Tensor] = {}  # per lora_A name: owning task index per component, FREE = -1
        self.tasks: dict[str, int] = {}
        self.current: int | None = None
        self._generator = torch.Generator().manual_seed(self.settings.seed)

    def rank_blocks(self) -> int:
        return self.settings.max_tasks

    def begin_task(self, task: TaskContext, learner: LearnerView) -> None:
        params = learner.lora_parameters()
        if not self.owner:
            self.owner = {name: torch.full((rank_of(name, t),), FREE, dtype=torch.long)
                          for name, t in params.items() if is_lora_a(name)}
        if task.name not in self.tasks:
            free = min(int((o == FREE).sum()) for o in self.owner.values())
            if free < self.settings.lora_rank:
                raise InvalidInputError(
                    f"packnet: only {free} free rank components per layer are left, a new task {task.name!r} "
                    f"needs lora_rank={self.settings.lora_rank}; tasks so far: {sorted(self.tasks)}. Raise "
                    "ContinualConfig.max_tasks or tag it as an existing task.")
            self.tasks[task.name] = len(self.tasks)
        self.current = self.tasks[task.name]

    def _trainable_components(self, name_a: str) -> torch.Tensor:
        owner = self.owner[name_a]
        return (owner == FREE) | (owner == self.current)

    def trainable_mask(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if self.current is None:
            raise InvalidInputError("packnet: training before begin_task; no task owns the free components")
        masks = {}
        for name, tensor in params.items():
            name_a = name if is_lora_a(name) else partner(name)
            components = self._trainable_components(name_a).to(tensor.device)
            masks[name] = component_mask(name, tensor, components)
        return masks

    def end_task(self, task: TaskContext, learner: LearnerView) -> dict[str, torch.Tensor]:
        params = learner.lora_parameters()
        edits: dict[str, torch.Tensor] = {}
        for name_a, owner in self.owner.items():
            a, b = params[name_a].detach(), params[partner(name_a)].detach()
            trainable = self._trainable_components(name_a)
            importance = b.norm(dim=0).cpu() * a.norm(dim=1).cpu()
            importance[~trainable] = -math.inf
            keep = torch.topk(importance, self.settings.lora_rank).indices
            owner[trainable] = FREE
            owner[keep] = self.current
            released = trainable.clone()
            released[keep] = False
            if released.any():
                new_a, new_b = a.clone(), b.clone()
                bound = 1.0 / math.sqrt(a.shape[1])  # PEFT's kaiming_uniform(a=sqrt(5)) bound for lora_A
                fresh = torch.empty((int(released.sum()), a.shape[1])).uniform_(-bound, bound,
                                                                                generator=self._generator)
                new_a[released.to(a.device)] = fresh.to(a.device, a.dtype)
                new_b[:, released.to(b.device)] = 0
                edits[name_a], edits[partner(name_a)] = new_a, new_b
        return edits

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return ({f"owner::{k}": v for k, v in self.owner.items()},
                {"tasks": self.tasks, "current": self.current, "generator": self._generator.get_state().tolist()})

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.owner = {k.split("::", 1)[1]: v.clone() for k, v in tensors.items()}
        self.tasks = {str(k): int(v) for k, v in meta["tasks"].items()}
        self.current = meta["current"]
        self._generator.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
