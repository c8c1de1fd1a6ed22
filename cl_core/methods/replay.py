"""`replay`: rehearse stored past experiences alongside new ones.

Each batch is `replay_ratio` past experiences and the rest new (experience replay; Rolnick et al. 2019 show it
is hard to beat for LLM-scale continual learning). Which past experiences are kept in the replay memory and which
are picked per batch is a replay strategy (`cl_core.replay`: `random` reservoir, loss `priority`, `herding`,
`gradient`), chosen by `replay_strategy`. The memory holds store ids; the texts stay in the experience store.
A task's experiences enter the memory at its `end_task`, so a task never replays itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cl_core.errors import InvalidInputError
from cl_core.learner.peft_learner import Example
from cl_core.methods.base import AntiForgettingMethod, LearnerView, TaskContext, register_method
from cl_core.replay import Candidate, make_replay_strategy


@register_method("replay")
class Replay(AntiForgettingMethod):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        self.strategy = make_replay_strategy(s.replay_strategy, s.replay_memory, seed=s.seed)
        self._last: tuple[int, list[int]] = (0, [])  # (position of the replayed part, their ids)
        self.replayed = 0

    def replay_slots(self, batch_size: int) -> int:
        """Places per batch for replay: none while the memory is empty (the first task fills whole batches with
        new examples) and never more than the memory holds."""
        if self.settings.replay_ratio == 0 or not self.strategy.memory:
            return 0
        wanted = min(batch_size - 1, max(1, round(batch_size * self.settings.replay_ratio)))
        return min(wanted, len(self.strategy.memory))

    def transform_batch(self, batch: list[Example], exclude_ids: Sequence[int]) -> list[Example]:
        slots = self.replay_slots(self.settings.batch_size)
        self._last = (len(batch), [])
        if slots == 0 or not self.strategy.memory:
            return batch
        ids = self.strategy.select(slots, exclude=set(exclude_ids))
        found = self._source().examples(ids)
        missing = set(ids) - {exp_id for exp_id, _ in found}
        if missing:  # evicted from the store since they entered the memory
            self.strategy.discard(missing)
        self._last = (len(batch), [exp_id for exp_id, _ in found])
        self.replayed += len(found)
        return batch + [example for _, example in found]

    def after_step(self, batch_losses: Sequence[float]) -> None:
        start, ids = self._last
        losses = list(batch_losses[start:start + len(ids)])
        if ids and len(losses) == len(ids):
            self.strategy.update(ids, losses)

    def end_task(self, task: TaskContext, learner: LearnerView) -> None:
        losses = list(task.example_losses) or [None] * len(task.example_ids)
        candidates = [Candidate(id=int(i), task=task.name, loss=loss)
                      for i, loss in zip(task.example_ids, losses, strict=True)]
        if candidates:
            self.strategy.observe(candidates, self._source())
        return None

    def _source(self) -> Any:
        if self.source is None:
            raise InvalidInputError("replay needs an example source (the experience store); none was given")
        return self.source

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, meta = self.strategy.state()
        return tensors, {"strategy": self.strategy.name, "strategy_state": meta}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        if meta["strategy"] != self.strategy.name:
            raise InvalidInputError(f"replay state was saved with strategy {meta['strategy']!r}, this model uses "
                                    f"{self.strategy.name!r}; set replay_strategy={meta['strategy']!r} to load it")
        self.strategy.load_state(tensors, meta["strategy_state"])
