"""`gradient`: GSS-greedy, a memory of diverse gradients (Aljundi et al., "Gradient based sample selection for
online continual learning", NeurIPS 2019, Alg. 2).

Why: rehearsal protects old knowledge through the gradients of replayed items, and many near-identical gradients
protect no more than one. GSS frames memory selection as keeping the feasible region of the replay constraints
as large as possible, which it approximates by maximising gradient diversity, with no task boundaries needed.

Per new item with gradient g: its score c = 1 + max cosine(g, G_j) over a random subset of `n_compare` memory
gradients (c in [0, 2]; high = redundant). While the memory has room the item enters with score c. Once full, a
memory slot j is drawn with probability ∝ its own score C_j, and the new item replaces it if it is more diverse
(c < C_j); an exact duplicate of a sampled gradient (c = 2) never replaces anything. Two departures from the
public reference code: it draws the replacement decision at random with odds given by the two scores, where this
module compares them (deterministic given the draw of j), and it replaces only when the new gradient's max cosine
is below 0, a gate not applied here because gradients of a language model on related texts share a common
component, so it would freeze the memory.

Scores are computed at insertion and go stale as memory changes. To age them less, when an item enters, the
memory items it was compared with raise their own score to 1 + their cosine to it (their memory now holds a
neighbour); the paper leaves them untouched. Gradients are stored L2-normalised (only cosines matter); an
all-zero gradient counts as orthogonal to everything. `select` picks uniformly, as GSS replays: the diversity is
in what is kept, not in how it is sampled.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cl_core.errors import InvalidInputError
from cl_core.replay.base import Candidate, FeatureSource, ReplayStrategy, check_vectors, register_replay_strategy


@register_replay_strategy("gradient")
class GradientDiversityReplay(ReplayStrategy):
    """GSS-greedy memory; needs `FeatureSource.gradients` (random projections of per-item gradients are fine)."""

    needs_features = "gradients"

    def __init__(self, capacity: int, seed: int = 0, *, n_compare: int = 32) -> None:
        super().__init__(capacity, seed)
        if isinstance(n_compare, bool) or not isinstance(n_compare, numbers.Integral) or n_compare < 1:
            raise InvalidInputError(f"gradient replay n_compare (memory gradients each new item is compared with) "
                                    f"must be an integer ≥ 1, got {n_compare!r}")
        self.n_compare = int(n_compare)
        self._ids: list[int] = []
        self._scores = np.zeros(0, dtype=np.float64)  # [allocated]; the first len(_ids) are live
        self._vecs = torch.zeros(0, 0)  # [allocated, p] unit gradients; the first len(_ids) rows are live

    @property
    def memory(self) -> list[int]:
        return list(self._ids)

    def scores(self) -> dict[int, float]:
        """Redundancy score per id in memory: 1 + max cosine to the memory it was compared with (lower = rarer)."""
        return {i: float(s) for i, s in zip(self._ids, self._scores, strict=False)}

    def _grow(self, rows: int, dim: int) -> None:
        if self._vecs.shape[1] != dim:  # first vectors (memory is empty, or check_vectors would have refused)
            self._vecs = torch.zeros(0, dim)
        size = self._vecs.shape[0]
        if rows <= size:
            return
        size = min(self.capacity, max(rows, 2 * size, 16))
        vecs = torch.zeros(size, dim)
        vecs[: len(self._ids)] = self._vecs[: len(self._ids)]
        scores = np.zeros(size, dtype=np.float64)
        scores[: len(self._ids)] = self._scores[: len(self._ids)]
        self._vecs, self._scores = vecs, scores

    def _observe(self, fresh: list[Candidate], features: FeatureSource | None) -> None:
        ids = [c.id for c in fresh]
        dim = self._vecs.shape[1] if self._ids else None
        grads = F.normalize(check_vectors(self._features(features).gradients(ids), ids, "gradients", dim), dim=1)
        for row, c in enumerate(fresh):
            m = len(self._ids)
            if m == 0:
                subset, sims, score = np.zeros(0, dtype=np.int64), np.zeros(0), 1.0
            else:
                subset = self._rng.choice(m, size=min(self.n_compare, m), replace=False)
                sims = (self._vecs.index_select(0, torch.from_numpy(subset)) @ grads[row]).double().numpy()
                score = 1.0 + float(sims.max())
            if m < self.capacity:
                slot = m
                self._grow(m + 1, grads.shape[1])
                self._ids.append(c.id)
            else:
                live = self._scores[:m]
                total = live.sum()
                slot = int(self._rng.choice(m, p=live / total)) if total > 0 else int(self._rng.integers(m))
                if not score < live[slot]:
                    continue
                self._ids[slot] = c.id
            self._vecs[slot] = grads[row]
            self._scores[slot] = score
            others = subset != slot
            self._scores[subset[others]] = np.maximum(self._scores[subset[others]], 1.0 + sims[others])

    def _discard(self, ids: set[int]) -> None:
        keep = [n for n, i in enumerate(self._ids) if i not in ids]
        self._vecs[: len(keep)] = self._vecs.index_select(0, torch.tensor(keep, dtype=torch.int64))
        self._scores[: len(keep)] = self._scores[keep]
        self._ids = [self._ids[n] for n in keep]

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        m = len(self._ids)
        return {"ids": torch.tensor(self._ids, dtype=torch.int64), "vecs": self._vecs[:m].clone(),
                "scores": torch.from_numpy(self._scores[:m].copy())}, {}

    def _load_state(self, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
        ids, vecs, scores = tensors["ids"].tolist(), tensors["vecs"].to(torch.float32), tensors["scores"]
        if vecs.dim() != 2 or not len(ids) == vecs.shape[0] == scores.shape[0]:
            raise ValueError("gradient state: ids, vecs and scores disagree in length")
        self._ids = [int(i) for i in ids]
        self._vecs = vecs.clone()
        self._scores = scores.to(torch.float64).numpy().copy()
