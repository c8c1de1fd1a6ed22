"""`herding`: iCaRL exemplar selection, balanced across tasks.

Why: a memory that is small compared with a task should still represent the task's distribution, not whatever
happened to arrive last. iCaRL (Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR
2017, Alg. 4-5) picks exemplars by herding (Welling, "Herding Dynamical Weights to Learn", ICML 2009): greedily
add the item that brings the mean of the chosen exemplars closest to the task's mean embedding, so every prefix
of the chosen order is a good summary. Memory is split equally over the tasks seen so far (K/t each); when a new
task arrives each old task's exemplars are cut from the end of its herding order, which is iCaRL's
ReduceExemplarSet.

Streaming adaptation: the task mean is a running mean over every embedding ever observed for the task (kept as
a d-vector per task, so no per-item vector outlives its item's stay in memory), and herding re-runs over the
task's exemplars plus its newly observed items whenever the task receives new items. Embeddings are
L2-normalised first (`normalize=True`), as in iCaRL. A task whose items are fewer than its equal share leaves the
spare slots to the others until it grows ("water-filling"), so memory is not wasted on a small task.
`select` picks balanced across tasks (counts differ by at most one among tasks with enough eligible items),
uniformly within each task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cl_core.replay.base import Candidate, FeatureSource, ReplayStrategy, check_vectors, register_replay_strategy


@dataclass
class _Task:
    total: torch.Tensor  # [d] float64: sum of every (normalised) embedding observed for the task
    count: int  # how many embeddings went into `total`
    ids: list[int]  # exemplars, in herding order
    vecs: torch.Tensor  # [len(ids), d] float32, rows aligned with `ids`

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)


def herding_order(vectors: torch.Tensor, target: torch.Tensor, k: int) -> list[int]:
    """Indices of `k` rows of `vectors` chosen greedily so that the running mean of the chosen rows stays as close
    as possible to `target` (iCaRL Alg. 4). Ties go to the lowest index.

    Step t picks argmin_i ||mu - (S + x_i)/t||², which up to terms constant in i is
    (2 S·x_i + ||x_i||²)/t² - 2 mu·x_i/t; keeping S·x for all rows (one matrix-vector product per step) makes a
    step O(n d) instead of materialising the n x d differences."""
    x = vectors.detach().cpu().to(torch.float64).numpy()  # numpy: this loop is dominated by per-op overhead
    mu_x = x @ target.detach().cpu().to(torch.float64).numpy()
    sq = np.einsum("ij,ij->i", x, x)
    s_x = np.zeros_like(sq)
    chosen: list[int] = []
    taken = np.zeros(x.shape[0], dtype=bool)
    for t in range(1, min(k, x.shape[0]) + 1):
        score = (2 * s_x + sq) / (t * t) - 2 * mu_x / t
        score[taken] = np.inf
        i = int(np.argmin(score))
        chosen.append(i)
        taken[i] = True
        s_x += x @ x[i]
    return chosen


def balanced_quotas(capacity: int, demand: dict[str, int]) -> dict[str, int]:
    """Split `capacity` equally over the tasks (earlier tasks take the remainder), never giving a task more than
    its `demand`; what a small task leaves is shared equally among the others."""
    quota = dict.fromkeys(demand, 0)
    open_tasks = [t for t in demand if demand[t] > 0]
    left = capacity
    while open_tasks and left > 0:
        share, extra = divmod(left, len(open_tasks))
        given = 0
        for n, t in enumerate(open_tasks):
            add = min(share + (1 if n < extra else 0), demand[t] - quota[t])
            quota[t] += add
            given += add
        left -= given
        open_tasks = [t for t in open_tasks if quota[t] < demand[t]]
        if given == 0:
            break
    return quota


@register_replay_strategy("herding")
class HerdingReplay(ReplayStrategy):
    """Per-task herding exemplars (iCaRL), memory balanced across tasks; needs `FeatureSource.embeddings`."""

    needs_features = "embeddings"

    def __init__(self, capacity: int, seed: int = 0, *, normalize: bool = True) -> None:
        super().__init__(capacity, seed)
        self.normalize = bool(normalize)
        self._tasks: dict[str, _Task] = {}  # in order of first appearance
        self._dim: int | None = None

    @property
    def memory(self) -> list[int]:
        return [i for task in self._tasks.values() for i in task.ids]

    def memory_by_task(self) -> dict[str, list[int]]:
        """Exemplar ids per task, each in herding order (best summary first)."""
        return {name: list(task.ids) for name, task in self._tasks.items()}

    def task_mean(self, task: str) -> torch.Tensor:
        """The running mean embedding of everything observed for `task` (normalised space when `normalize`)."""
        return self._tasks[task].mean.clone()

    def _observe(self, fresh: list[Candidate], features: FeatureSource | None) -> None:
        ids = [c.id for c in fresh]
        vecs = check_vectors(self._features(features).embeddings(ids), ids, "embeddings", self._dim)
        if self.normalize:
            vecs = F.normalize(vecs, dim=1)
        self._dim = vecs.shape[1]
        pools: dict[str, tuple[list[int], list[torch.Tensor]]] = {}
        for row, c in enumerate(fresh):
            pool_ids, pool_rows = pools.setdefault(c.task, ([], []))
            pool_ids.append(c.id)
            pool_rows.append(vecs[row])
        for name, (new_ids, rows) in pools.items():
            task = self._tasks.get(name)
            if task is None:
                task = self._tasks[name] = _Task(torch.zeros(self._dim, dtype=torch.float64), 0, [],
                                                 torch.zeros(0, self._dim))
            new_vecs = torch.stack(rows)
            task.total += new_vecs.sum(dim=0, dtype=torch.float64)
            task.count += len(new_ids)
            task.ids = task.ids + new_ids  # the pool herding chooses from; cut back to the quota below
            task.vecs = torch.cat([task.vecs, new_vecs])
        quotas = balanced_quotas(self.capacity, {name: len(task.ids) for name, task in self._tasks.items()})
        for name, task in self._tasks.items():
            if name in pools:
                order = herding_order(task.vecs, task.mean, quotas[name])
            else:
                order = list(range(min(quotas[name], len(task.ids))))  # ReduceExemplarSet: keep the prefix
            task.ids = [task.ids[i] for i in order]
            task.vecs = task.vecs.index_select(0, torch.tensor(order, dtype=torch.int64))

    def _select(self, eligible: list[int], k: int) -> list[int]:
        allowed = set(eligible)
        groups = [[i for i in task.ids if i in allowed] for task in self._tasks.values()]
        groups = [[g[int(j)] for j in self._rng.permutation(len(g))] for g in groups if g]
        picked: list[int] = []
        for depth in range(max(len(g) for g in groups)):
            row = [g[depth] for g in groups if depth < len(g)]
            for j in self._rng.permutation(len(row)):
                picked.append(row[int(j)])
                if len(picked) == k:
                    return picked
        return picked

    def _discard(self, ids: set[int]) -> None:
        for task in self._tasks.values():
            keep = [n for n, i in enumerate(task.ids) if i not in ids]
            if len(keep) < len(task.ids):
                task.ids = [task.ids[n] for n in keep]
                task.vecs = task.vecs.index_select(0, torch.tensor(keep, dtype=torch.int64))

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        dim = self._dim or 0
        tasks = list(self._tasks.values())
        tensors = {
            "ids": torch.tensor(self.memory, dtype=torch.int64),
            "vecs": torch.cat([t.vecs for t in tasks]) if tasks else torch.zeros(0, dim),
            "totals": torch.stack([t.total for t in tasks]) if tasks else torch.zeros(0, dim, dtype=torch.float64),
        }
        data = {"dim": self._dim, "tasks": list(self._tasks), "counts": [t.count for t in tasks],
                "sizes": [len(t.ids) for t in tasks]}
        return tensors, data

    def _load_state(self, tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
        ids, vecs, totals = tensors["ids"].tolist(), tensors["vecs"].to(torch.float32), tensors["totals"]
        names, counts, sizes = list(data["tasks"]), list(data["counts"]), list(data["sizes"])
        tables_agree = len(names) == len(counts) == len(sizes) == totals.shape[0]
        if not tables_agree or not sum(sizes) == len(ids) == vecs.shape[0]:
            raise ValueError("herding state tensors do not match its task table")
        tasks: dict[str, _Task] = {}
        start = 0
        for row, (name, count, size) in enumerate(zip(names, counts, sizes, strict=True)):
            tasks[str(name)] = _Task(totals[row].to(torch.float64).clone(), int(count),
                                     [int(i) for i in ids[start:start + size]], vecs[start:start + size].clone())
            start += size
        self._tasks, self._dim = tasks, (None if data["dim"] is None else int(data["dim"]))
