"""`random`: reservoir sampling over the whole stream, uniform picks.

Why: with no knowledge of tasks or model state, the fairest memory is a uniform sample of everything seen so far.
Vitter's algorithm R ("Random Sampling with a Reservoir", ACM TOMS 1985) keeps exactly that in O(1) per item:
the t-th item enters with probability capacity/t, replacing a uniformly chosen slot. It is the strong baseline of
experience replay in continual learning (Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019).

Slots freed by `discard` are refilled by the next items directly (an evicted experience cannot be brought back),
which tilts the memory slightly towards recent items until the stream has moved on.
"""

from __future__ import annotations

from typing import Any

import torch

from cl_core.replay.base import Candidate, FeatureSource, ReplayStrategy, register_replay_strategy


@register_replay_strategy("random")
class ReservoirReplay(ReplayStrategy):
    """Algorithm R over every observed item; `select` picks uniformly without replacement."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        super().__init__(capacity, seed)
        self._slots: list[int] = []
        self.seen = 0
        """Items offered so far (the t of algorithm R)."""

    @property
    def memory(self) -> list[int]:
        return list(self._slots)

    def _observe(self, fresh: list[Candidate], features: FeatureSource | None) -> None:
        for c in fresh:
            self.seen += 1
            if len(self._slots) < self.capacity:
                self._slots.append(c.id)
                continue
            j = int(self._rng.integers(self.seen))
            if j < self.capacity:
                self._slots[j] = c.id

    def _discard(self, ids: set[int]) -> None:
        self._slots = [i for i in self._slots if i not in ids]

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"ids": torch.tensor(self._slots, dtype=torch.int64)}, {"seen": self.seen}

    def _load_state(self, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
        slots = [int(i) for i in tensors["ids"].tolist()]
        seen = int(data["seen"])
        self._slots, self.seen = slots, seen
