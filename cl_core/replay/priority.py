"""`priority`: keep the highest-loss items, pick proportionally to loss^alpha, refresh losses after replay.

Why: items the model still gets wrong carry the most learning signal, and rehearsing them is what protects the
decision boundary from drifting (loss-aware memory; cf. Aljundi et al., "Online Continual Learning with Maximally
Interfered Retrieval", NeurIPS 2019). Picking follows prioritized experience replay (Schaul et al., ICLR 2016):
P(i) ∝ (loss_i + eps)^alpha, where alpha interpolates between uniform (0) and greedy, and eps keeps every item
reachable. Losses go stale as the model trains, so `update(ids, losses)` writes the losses measured during a
replay step back; they decide both the next picks and which item the next arrival evicts.

A candidate observed without a loss gets the largest loss currently known (memory or batch), PER's rule for
new transitions: it is replayed at least once before its real loss is known. Re-observing an id already in
memory with a loss refreshes that loss.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from cl_core.errors import InvalidInputError
from cl_core.replay.base import Candidate, FeatureSource, ReplayStrategy, register_replay_strategy


@register_replay_strategy("priority")
class PriorityReplay(ReplayStrategy):
    """Bounded top-loss memory; ties at the boundary keep the item already in memory."""

    def __init__(self, capacity: int, seed: int = 0, *, alpha: float = 0.6, eps: float = 1e-3) -> None:
        super().__init__(capacity, seed)
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 10:
            raise InvalidInputError(f"priority replay alpha must be in [0, 10] (0 = uniform picks), got {alpha!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
            raise InvalidInputError(f"priority replay eps must be a finite number > 0, got {eps!r}")
        self.alpha = float(alpha)
        self.eps = float(eps)
        self._loss: dict[int, float] = {}  # id -> loss, in order of entry

    @property
    def memory(self) -> list[int]:
        return list(self._loss)

    def loss_of(self, experience_id: int) -> float:
        """The loss the memory holds for an id (KeyError when not in memory)."""
        return self._loss[experience_id]

    def _observe(self, fresh: list[Candidate], features: FeatureSource | None) -> None:
        known = [c.loss for c in fresh if c.loss is not None]
        default = max([*self._loss.values(), *known], default=1.0)
        pool = list(self._loss.items()) + [(c.id, default if c.loss is None else c.loss) for c in fresh]
        if len(pool) > self.capacity:
            keep = {i for i, _ in sorted(pool, key=lambda item: -item[1])[: self.capacity]}  # stable: old wins ties
            pool = [item for item in pool if item[0] in keep]
        self._loss = dict(pool)

    def _refresh(self, known: list[Candidate]) -> None:
        for c in known:
            if c.loss is not None:
                self._loss[c.id] = c.loss

    def _select(self, eligible: list[int], k: int) -> list[int]:
        weights = np.array([self._loss[i] for i in eligible], dtype=np.float64)
        weights = (weights + self.eps) ** self.alpha
        picked = self._rng.choice(len(eligible), size=k, replace=False, p=weights / weights.sum())
        return [eligible[int(i)] for i in picked]

    def _update(self, ids: list[int], losses: list[float]) -> None:
        for i, loss in zip(ids, losses, strict=True):
            if i in self._loss:
                self._loss[i] = loss

    def _discard(self, ids: set[int]) -> None:
        self._loss = {i: v for i, v in self._loss.items() if i not in ids}

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"ids": torch.tensor(list(self._loss), dtype=torch.int64),
                "losses": torch.tensor(list(self._loss.values()), dtype=torch.float64)}, {}

    def _load_state(self, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
        ids, losses = tensors["ids"].tolist(), tensors["losses"].tolist()
        if len(ids) != len(losses):
            raise ValueError(f"{len(ids)} ids but {len(losses)} losses")
        self._loss = {int(i): float(v) for i, v in zip(ids, losses, strict=True)}
