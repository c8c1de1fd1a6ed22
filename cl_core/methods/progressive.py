"""`progressive`: a new adapter per task; earlier ones are frozen and still used.

Progressive networks (Rusu et al. 2016) grow new capacity per task and freeze the old. For LoRA the growth is a
new rank block (see `blocks.py`): task k trains only block k, blocks of earlier tasks keep serving their deltas
unchanged, so nothing learned before can be overwritten; later tasks still build on the earlier deltas, which are
in the forward pass. The adapter has `max_tasks` blocks; a task tag seen before continues in its own block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from cl_core.errors import InvalidInputError
from cl_core.methods.base import AntiForgettingMethod, LearnerView, TaskContext, register_method
from cl_core.methods.blocks import block_masks


@register_method("progressive")
class ProgressiveAdapters(AntiForgettingMethod):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.blocks: dict[str, int] = {}
        self.current: int | None = None

    def rank_blocks(self) -> int:
        return self.settings.max_tasks

    def begin_task(self, task: TaskContext, learner: LearnerView) -> None:
        if task.name not in self.blocks:
            if len(self.blocks) >= self.settings.max_tasks:
                raise InvalidInputError(
                    f"{self.name}: all max_tasks={self.settings.max_tasks} adapter blocks are taken by tasks "
                    f"{sorted(self.blocks)}; a new task {task.name!r} needs a free one. Raise "
                    "ContinualConfig.max_tasks (the adapter's rank grows with it) or tag it as an existing task.")
            self.blocks[task.name] = len(self.blocks)
        self.current = self.blocks[task.name]

    def trainable_mask(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        if self.current is None:
            raise InvalidInputError(f"{self.name}: training before begin_task; no adapter block is selected")
        return block_masks(params, self.current, self.settings.lora_rank)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"blocks": self.blocks, "current": self.current}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.blocks = {str(k): int(v) for k, v in meta["blocks"].items()}
        self.current = meta["current"]
