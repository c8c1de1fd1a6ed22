"""Continual-learning metrics as pure functions of an accuracy matrix.

Convention (the one `ForgettingExperiment` returns): `matrix[i][j]` is the score on task i after training on task
j, for T tasks in training order, so column j is one evaluation round and the diagonal is "just learned".

Definitions follow the papers that introduced them:
- average accuracy (AA) and backward/forward transfer (BWT/FWT): Lopez-Paz & Ranzato, "Gradient Episodic Memory
  for Continual Learning", NeurIPS 2017, section 4;
- forgetting and intransigence: Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018, 4.1-4.2.
Negative BWT is forgetting; positive FWT means earlier tasks helped later ones before they were trained.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _check(matrix: Matrix) -> list[list[float]]:
    rows = [list(map(float, row)) for row in matrix]
    size = len(rows)
    if size == 0 or any(len(row) != size for row in rows):
        raise ValueError(f"the accuracy matrix must be square T x T with T ≥ 1 (score on task i after training "
                         f"task j); got row lengths {[len(r) for r in rows]}")
    if any(math.isnan(x) or math.isinf(x) for row in rows for x in row):
        raise ValueError("the accuracy matrix contains NaN or inf: evaluate every task after every training stage")
    return rows


def _check_vector(name: str, values: Sequence[float], size: int) -> list[float]:
    out = list(map(float, values))
    if len(out) != size or any(math.isnan(x) or math.isinf(x) for x in out):
        raise ValueError(f"{name} must hold {size} finite scores (one per task), got {values!r}")
    return out


def average_accuracy(matrix: Matrix, after: int | None = None) -> float:
    """AA: mean score over the tasks seen so far, after training task `after` (default: the last one)."""
    a = _check(matrix)
    k = len(a) - 1 if after is None else after
    if not 0 <= k < len(a):
        raise ValueError(f"after={after} is out of range for {len(a)} tasks")
    return sum(a[i][k] for i in range(k + 1)) / (k + 1)


def backward_transfer(matrix: Matrix) -> float:
    """BWT = 1/(T-1) Σ_{i<T} (a[i][T] - a[i][i]): how learning later tasks changed earlier ones (0 for T=1)."""
    a = _check(matrix)
    t = len(a)
    if t == 1:
        return 0.0
    return sum(a[i][t - 1] - a[i][i] for i in range(t - 1)) / (t - 1)


def forward_transfer(matrix: Matrix, initial_scores: Sequence[float]) -> float:
    """FWT = 1/(T-1) Σ_{i>1} (a[i][i-1] - b_i): the zero-shot gain on task i from the tasks before it, where b_i
    is the score of the model before any training (0 for T=1)."""
    a = _check(matrix)
    t = len(a)
    b = _check_vector("initial_scores", initial_scores, t)
    if t == 1:
        return 0.0
    return sum(a[i][i - 1] - b[i] for i in range(1, t)) / (t - 1)


def forgetting(matrix: Matrix) -> float:
    """Average forgetting: for each earlier task, its best score at any stage before the last minus its final
    score, averaged over tasks 1..T-1 (0 for T=1). Unlike BWT it counts a peak that came after the diagonal."""
    return sum(forgetting_per_task(matrix)) / max(1, len(matrix) - 1)


def forgetting_per_task(matrix: Matrix) -> list[float]:
    """Forgetting of each task 1..T-1: max_{l<T} a[i][l] (over stages l ≥ i) minus a[i][T]."""
    a = _check(matrix)
    t = len(a)
    return [max(a[i][i:t - 1]) - a[i][t - 1] for i in range(t - 1)]


def intransigence(matrix: Matrix, reference_scores: Sequence[float]) -> float:
    """Average intransigence: mean over tasks of a*_k - a[k][k], where a*_k is the score of a reference model
    trained jointly (multitask) on tasks 1..k. High values mean the method fails to learn new tasks."""
    a = _check(matrix)
    ref = _check_vector("reference_scores", reference_scores, len(a))
    return sum(ref[k] - a[k][k] for k in range(len(a))) / len(a)


def summarize(matrix: Matrix, initial_scores: Sequence[float] | None = None,
              reference_scores: Sequence[float] | None = None) -> dict[str, float]:
    """Every metric the inputs allow, by name (AA, BWT, forgetting; FWT and intransigence when given baselines)."""
    out = {"average_accuracy": average_accuracy(matrix), "backward_transfer": backward_transfer(matrix),
           "forgetting": forgetting(matrix)}
    if initial_scores is not None:
        out["forward_transfer"] = forward_transfer(matrix, initial_scores)
    if reference_scores is not None:
        out["intransigence"] = intransigence(matrix, reference_scores)
    return out
