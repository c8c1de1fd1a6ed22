"""`SumTree`: proportional sampling over a fixed set of slots in O(log n), one tree per group, all in numpy.

Why: sampling 64 experiences by priority from a million must take milliseconds. SQL cannot do weighted
sampling without reading every row, and `numpy.random.choice(p=...)` over a million weights is itself ~10 ms
plus a normalization pass. A sum-tree answers "which slot holds the point u of the cumulative weight" in
log2(n) steps; drawing k points is k root-to-leaf walks done together, level by level, as vector operations.

Layout: a complete binary tree over `size` (a power of two) leaves, stored heap-style (node i has children 2i and
2i+1; leaves are size..2size-1). Each group (the store's statuses: pending, learned, feedback-only) has its own
row, so "sample only learned experiences" never has to reject anything. Parents are recomputed as the sum of
their children after every update (never adjusted by deltas), so rounding errors cannot accumulate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class SumTree:
    def __init__(self, capacity: int, groups: int) -> None:
        self.size = next_power_of_two(max(1, capacity))
        self.depth = self.size.bit_length() - 1
        self.groups = groups
        self.tree = np.zeros((groups, 2 * self.size), dtype=np.float64)

    @property
    def totals(self) -> np.ndarray:
        """Total weight per group."""
        return self.tree[:, 1]

    def leaves(self, slots: np.ndarray) -> np.ndarray:
        """(groups, len(slots)) copy of the leaf weights of `slots`."""
        return self.tree[:, self.size + np.asarray(slots, dtype=np.int64)].copy()

    def build(self, group: np.ndarray, weight: np.ndarray) -> None:
        """Replace everything: slot i gets `weight[i]` in group `group[i]` (group < 0: empty slot)."""
        self.tree[:] = 0.0
        used = np.flatnonzero(group >= 0)
        self.tree[group[used], self.size + used] = weight[used]
        half = self.size
        while half > 1:
            half //= 2
            self.tree[:, half:2 * half] = self.tree[:, 2 * half:4 * half:2] + self.tree[:, 2 * half + 1:4 * half:2]

    def set(self, slots: np.ndarray, group: np.ndarray, weight: np.ndarray) -> None:
        """Slot `slots[i]` now holds `weight[i]` in group `group[i]` (group < 0 empties it)."""
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) == 0:
            return
        rows = np.zeros((self.groups, len(slots)))
        group = np.asarray(group)
        used = np.flatnonzero(group >= 0)
        rows[group[used], used] = np.asarray(weight, dtype=np.float64)[used]
        self.set_rows(slots, rows)

    def set_rows(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """Write full leaf columns (as returned by `leaves`) and update their ancestors."""
        leaf = self.size + np.asarray(slots, dtype=np.int64)
        self.tree[:, leaf] = rows
        node = np.unique(leaf >> 1)
        for _ in range(self.depth):
            self.tree[:, node] = self.tree[:, 2 * node] + self.tree[:, 2 * node + 1]
            node = np.unique(node >> 1)

    def find(self, u: np.ndarray, group: int) -> np.ndarray:
        """The slot holding each point `u` (0 ≤ u < total of `group`) of the group's cumulative weight.

        Never returns a zero-weight slot: a walk goes right only into a positive subtree, and left only when
        u is below the (then positive) left sum, so rounding at most shifts a point to a neighbouring item.
        """
        t = self.tree[group]
        u = np.array(u, dtype=np.float64)
        node = np.ones(len(u), dtype=np.int64)
        for _ in range(self.depth):
            left = 2 * node
            left_weight = t[left]
            right = (u >= left_weight) & (t[left + 1] > 0)
            u -= np.where(right, left_weight, 0.0)
            node = left + right
        return node - self.size

    def draw(self, k: int, groups: Sequence[int], rng: np.random.Generator) -> np.ndarray:
        """`k` slots drawn independently, each with probability weight / total over `groups` (with replacement)."""
        totals = self.tree[list(groups), 1]
        cumulative = np.cumsum(totals)
        u = rng.random(k) * cumulative[-1]
        which = np.minimum(np.searchsorted(cumulative, u, side="right"), len(groups) - 1)
        u -= (cumulative - totals)[which]
        slots = np.empty(k, dtype=np.int64)
        for i, group in enumerate(groups):
            mask = which == i
            if mask.any():
                slots[mask] = self.find(u[mask], group)
        return slots

    def sample(self, n: int, groups: Sequence[int], rng: np.random.Generator,
               exclude: np.ndarray | None = None) -> np.ndarray:
        """Up to `n` distinct slots, by weight without replacement (successive sampling), never from `exclude`.

        Draws are independent; the first occurrences of a run of independent draws are exactly a successive
        (Plackett-Luce) sample, so duplicates are dropped, the chosen slots' weights are set to zero and the
        missing ones are drawn again. All zeroed weights are restored before returning. Fewer than `n` only when
        fewer than `n` slots of positive weight exist.
        """
        saved: list[tuple[np.ndarray, np.ndarray]] = []

        def hide(slots: np.ndarray) -> None:
            saved.append((slots, self.leaves(slots)))
            self.set_rows(slots, np.zeros((self.groups, len(slots))))

        chosen: list[np.ndarray] = []
        taken = 0
        try:
            if exclude is not None and len(exclude):
                hide(np.unique(exclude))
            while taken < n and self.tree[list(groups), 1].sum() > 0:
                slots = self.draw(n - taken, groups, rng)
                _, first = np.unique(slots, return_index=True)
                fresh = slots[np.sort(first)]
                chosen.append(fresh)
                taken += len(fresh)
                if taken < n:
                    hide(fresh)
        finally:
            for slots, rows in reversed(saved):
                self.set_rows(slots, rows)
        return np.concatenate(chosen)[:n] if chosen else np.empty(0, dtype=np.int64)
