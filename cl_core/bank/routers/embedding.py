"""`embedding`: a request goes to the adapter whose learned prompts it is nearest to, or to the base model when it
is near none of them.

Each adapter keeps prototypes: the embeddings (`cl_core.bank.embedder.BaseEmbedder`) of prompts it learned. A
request's score for an adapter is its cosine similarity to that adapter's nearest prototype (or the mean of the
`top_k` nearest); the best-scoring adapter answers when its score reaches the threshold, else the base model does.

Each adapter has its own "none fits" threshold, calibrated from data by `fit(out_of_scope)`, never guessed: cosine
similarities of mean-pooled hidden states are anisotropic (unrelated prompts of a small causal LM often have cosine
> 0.8), so any fixed constant is either too loose or too strict depending on the model and layer.
- in-scope scores: for every kept prototype, its leave-one-out score against its own adapter's other prototypes
  (exactly the score a new, unseen prompt of that adapter gets: its nearest-neighbour similarity);
- out-of-scope scores: the score of each given out-of-scope embedding for the adapter nearest to it (the only one
  that could take it: a request goes to its nearest adapter or to the base, never to a second choice, because a
  wrong adapter is worse than none);
- objective: maximise in-scope recall subject to out-of-scope rejection ≥ `target_rejection` (default 0.99). Per
  adapter: the lowest threshold that rejects all but (1 - target_rejection) of the out-of-scope prompts nearest to
  it (so the overall rejection reaches the target too), put midway between the highest score that must be rejected
  and the next higher score seen, in or out of scope: the same empirical recall and rejection, with a margin,
  instead of sitting on a data point;
- in-scope floor: the threshold is never below 1 - `novelty_slack` x (1 - q), q the leave-one-out score that 99% of
  the adapter's prompts reach (default slack 1.5: a request may be at most 1.5x as far from the adapter's prompts
  as the least typical 1% of them are from each other). Out-of-scope data describe only the kinds of prompts they
  contain; the floor also turns away prompts of kinds nobody showed the router.
Why per adapter, and why the floor (measured on the default model, tests/benchmarks/bench_routing.py, 4 adapters of
100 prompts; in-scope accuracy / general questions rejected / 4 unseen tasks rejected): one global threshold 0.82 /
0.99 / 1.00, because a few general questions ("How many ...?") sit close to letter_counting and the single
threshold they force (0.92) cut off the diffuse review prompts (recall 0.48); per-adapter thresholds without the
floor 0.95 / 1.00 / 0.59 (adapters no general question comes near got thresholds below 0.3, and unseen tasks walked
in); per adapter with the floor 0.95 / 1.00 / 0.99.
Without out-of-scope data the floor alone is the threshold; an adapter with a single prompt (no leave-one-out score)
takes only near-duplicates of it (`DUPLICATE_SIMILARITY`). A router that was never fitted calibrates this way on
first use (so `route` changes state once: call `fit` before sharing a router between threads), and an adapter first
observed after the last fit gets its floor. A fixed `threshold` option replaces calibration for every adapter (fit
still reports recall and rejection at it).

Centring: every prompt's hidden states share a large common part (the chat template, the system prompt, the
model's own bias directions), so raw cosines of unrelated prompts are close to 1 (measured on the default model:
0.977-0.9997 to the mean direction; the calibrated raw threshold was 0.9993). With `center` (default),
`fit(out_of_scope)` sets a centre, the mean of every prompt it knows (all prototypes and the out-of-scope rows), and
similarities are cosines after subtracting it. Measured on the default model (bench_routing.py; in-scope accuracy
/ general questions rejected / 4 unseen tasks rejected, mean): raw cosine 1.00 / 0.99 / 0.59 (sports_understanding
and navigate prompts mostly went to adapters), centred 0.95 / 0.99 / 0.99. With one global threshold (an earlier
version, --quick embeddings) the measurements also chose the centre: all rows 1.00 / 1.00 / 0.90 (unseen:
object_counting only), the out-of-scope mean alone 1.00 / 0.99 / 0.00, the mean of per-adapter means and the
out-of-scope mean 0.78 / 0.99 / 1.00. Only out-of-scope data make a centre
safe: the mean of the adapters alone would be the adapter itself when there is one, and a prompt at its centre
would then look like nothing. So `fit()` without out-of-scope data keeps the centre it has (none at first: raw
cosine).

Bounded memory: at most `max_prototypes` per adapter. When an adapter has more, the kept set is chosen by greedy
farthest-point selection (k-center) over old and new prototypes together, starting from the prompt nearest the
adapter's mean. Why this rather than the alternatives: keeping the most recent would make the router forget what the
adapter learned first (the very forgetting the bank exists to prevent); k-means centroids are averages of prompts,
not prompts, so leave-one-out calibration would no longer describe a real prompt and centroids of a multi-modal
adapter land between its modes. Farthest-point selection keeps real prompts, covers every region the adapter learned
(every dropped prompt is within the covering radius of a kept one, a 2-approximation of the best radius), and drops
the prompts of the densest regions first, which changes nearest-prototype scores least. It is deterministic.

The router also records the embedder identity (`embedder_identity` option or `set_embedder_identity`): state fitted in
one embedding space must not route embeddings of another (`check_embedder`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cl_core.bank.embedder import EmbedderIdentity
from cl_core.bank.router import ROUTERS, Route, Router, RouteRequest, check_requests
from cl_core.errors import CheckpointError, ConfigError, InvalidInputError

DUPLICATE_SIMILARITY = 0.999
"""Threshold when nothing can be calibrated: only (near-)duplicates of learned prompts reach an adapter."""
NOVELTY_RECALL = 0.99
"""The in-scope floor starts from the leave-one-out score that this share of an adapter's prompts reach."""


# --- helpers shared with the `learned` router (same embedding space, same input checks) ---------------------------
def as_embedding_matrix(embeddings: Any, rows: int | None, dim: int | None, what: str) -> np.ndarray:
    """`embeddings` as float32 [rows, dim], every row finite and non-zero, L2-normalised (cosine = dot product).

    Routers renormalise instead of trusting the caller: a vector that is not unit length would silently change
    every similarity. Errors name the argument and the fix.
    """
    if embeddings is None:
        raise InvalidInputError(f"{what} is missing: give one embedding per prompt (BaseEmbedder.embed(prompts))")
    try:
        matrix = np.asarray(embeddings, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{what} must be a numeric array [n, dim]: {exc}") from exc
    if matrix.ndim != 2:
        raise InvalidInputError(f"{what} must be a 2-D array [n, dim], got shape {matrix.shape}")
    if rows is not None and matrix.shape[0] != rows:
        raise InvalidInputError(f"{what} has {matrix.shape[0]} rows for {rows} prompts: give one row per prompt")
    if dim is not None and matrix.shape[0] and matrix.shape[1] != dim:
        raise InvalidInputError(f"{what} has dimension {matrix.shape[1]}, but this router's embedding space has "
                                f"dimension {dim}: embed with the same base model and layer as the router's state")
    if not np.isfinite(matrix).all():
        bad = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise InvalidInputError(f"{what}[{bad}] contains NaN or infinity: re-embed that prompt")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if matrix.shape[0] and (norms == 0).any():
        bad = int(np.flatnonzero(norms[:, 0] == 0)[0])
        raise InvalidInputError(f"{what}[{bad}] is the zero vector, which has no direction: re-embed that prompt")
    return (matrix / np.where(norms == 0, 1.0, norms)).astype(np.float32)


def request_matrix(requests: Sequence[RouteRequest], dim: int | None) -> np.ndarray:
    """The requests' embeddings stacked as [n, dim] (validated like `as_embedding_matrix`)."""
    check_requests(requests, needs_embeddings=True)
    if dim is None and requests:
        dim = int(np.asarray(requests[0].embedding).reshape(-1).shape[0])
    for i, request in enumerate(requests):
        vector = np.asarray(request.embedding)
        if vector.ndim != 1:
            raise InvalidInputError(f"requests[{i}].embedding must be a 1-D vector, got shape {vector.shape}")
        if dim is not None and vector.shape[0] != dim:
            raise InvalidInputError(f"requests[{i}].embedding has dimension {vector.shape[0]}, but this router's "
                                    f"embedding space has dimension {dim}: embed with the same base model and layer")
    if not requests:
        return np.zeros((0, dim or 0), dtype=np.float32)
    stacked = np.stack([np.asarray(r.embedding) for r in requests])
    return as_embedding_matrix(stacked, None, None, "requests' embeddings")


def normalize_identity(identity: dict[str, Any] | EmbedderIdentity | None) -> dict[str, Any] | None:
    """An embedder identity as the JSON dict saved with router state (None: not recorded)."""
    if identity is None:
        return None
    if isinstance(identity, EmbedderIdentity):
        return identity.to_dict()
    if isinstance(identity, dict):
        try:
            return EmbedderIdentity.from_dict(identity).to_dict()
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError(f"embedder_identity must be BaseEmbedder(...).identity or its to_dict(), got "
                                    f"{identity!r}") from exc
    raise InvalidInputError(f"embedder_identity must be an EmbedderIdentity or a dict, got {type(identity).__name__}")


class EmbeddingSpaceMixin:
    """The embedding space a router was fitted in: its identity (saved with the state) and its dimension."""

    options: dict[str, Any]
    name: str

    def _init_space(self) -> None:
        self.options["embedder_identity"] = normalize_identity(self.options.get("embedder_identity"))
        self.embedder_identity: dict[str, Any] | None = self.options["embedder_identity"]
        self.dim: int | None = int(self.embedder_identity["dim"]) if self.embedder_identity and \
            self.embedder_identity.get("dim") else None

    def set_embedder_identity(self, identity: dict[str, Any] | EmbedderIdentity | None) -> None:
        """Record the space of the embeddings this router is given (`BaseEmbedder(...).identity`).

        Refused when the router already holds state of another space: refit a fresh router instead.
        """
        new = normalize_identity(identity)
        old = self.embedder_identity
        if old is not None and new is not None and _space(old) != _space(new) and self._has_state():
            raise ConfigError(f"router {self.name!r} holds state fitted in embedding space {old}; it cannot switch "
                              f"to {new}: make a new router and observe the prompts again")
        self.embedder_identity = new
        self.options["embedder_identity"] = new
        if new is not None and new.get("dim"):
            if self.dim is not None and self._has_state() and self.dim != int(new["dim"]):
                raise ConfigError(f"router {self.name!r} holds embeddings of dimension {self.dim}, the embedder "
                                  f"produces {new['dim']}")
            self.dim = int(new["dim"])

    def check_embedder(self, embedder: Any) -> None:
        """Refuse an embedder of another space than the one this router's state was fitted in (`ConfigError`)."""
        if self.embedder_identity is None:
            return
        embedder.check_identity(self.embedder_identity)

    def _check_dim(self, matrix: np.ndarray) -> None:
        if matrix.shape[0] and self.dim is None:
            self.dim = int(matrix.shape[1])

    def _has_state(self) -> bool:
        raise NotImplementedError


def _space(identity: dict[str, Any]) -> tuple[Any, ...]:
    return identity.get("fingerprint"), identity.get("layer"), identity.get("pooling")


def farthest_point_subset(vectors: np.ndarray, keep: int) -> np.ndarray:
    """Indices (sorted, so insertion order is kept) of `keep` rows chosen by greedy farthest-point selection.

    Distances are taken after removing the rows' own mean (see `centered`: raw hidden-state cosines are all close to
    1, dominated by what every prompt shares). Starts from the row nearest the mean, then repeatedly adds the row
    least similar to everything chosen. Deterministic: ties go to the lower index.
    """
    n = vectors.shape[0]
    if keep >= n:
        return np.arange(n)
    mean = vectors.mean(axis=0)
    first = int(np.argmin(np.linalg.norm(vectors - mean, axis=1)))
    vectors = centered(vectors, mean)
    chosen = [first]
    nearest = vectors @ vectors[first]  # similarity of every row to its most similar chosen row
    nearest[first] = np.inf
    for _ in range(keep - 1):
        nxt = int(np.argmin(nearest))
        chosen.append(nxt)
        nearest = np.maximum(nearest, vectors @ vectors[nxt])
        nearest[nxt] = np.inf
    return np.sort(np.asarray(chosen))


def centered(vectors: np.ndarray, center: np.ndarray | None) -> np.ndarray:
    """Rows minus `center`, L2-normalised again (None: unchanged). A row equal to the centre stays near zero and
    so is similar to nothing, which is the right answer for a prompt that carries nothing but the common part."""
    if center is None:
        return vectors
    dev = vectors - center
    return (dev / np.maximum(np.linalg.norm(dev, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def check_fraction(value: Any, what: str, open_low: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < value <= 1.0 if open_low
                                                                             else 0.0 <= value <= 1.0):
        raise ConfigError(f"{what} must be a number in {'(0' if open_low else '[0'}, 1], got {value!r}")
    return float(value)


@ROUTERS.register("embedding")
class EmbeddingRouter(EmbeddingSpaceMixin, Router):
    """Nearest learned prompt by cosine similarity, with a calibrated "none fits" threshold (module docstring).

    Options: `max_prototypes` (per adapter, default 512), `top_k` (score = mean of the k nearest prototypes of an
    adapter, default 1), `target_rejection` (out-of-scope share the calibrated threshold must reject, 0.99),
    `novelty_slack` (the in-scope floor's slack, 1.5), `threshold` (a fixed threshold
    instead of calibration, default None), `center` (compare embeddings after removing their mean, default True),
    `embedder_identity` (the embedder's identity, also settable later).
    """

    needs_embeddings = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.max_prototypes = check_positive_int(self.options.get("max_prototypes", 512), "max_prototypes")
        self.top_k = check_positive_int(self.options.get("top_k", 1), "top_k")
        self.target_rejection = check_fraction(self.options.get("target_rejection", 0.99), "target_rejection", False)
        slack = self.options.get("novelty_slack", 1.5)
        if isinstance(slack, bool) or not isinstance(slack, (int, float)) or not 1.0 <= slack < math.inf:
            raise ConfigError(f"novelty_slack must be a number ≥ 1, got {slack!r}")
        self.novelty_slack = float(slack)
        fixed = self.options.get("threshold")
        if fixed is not None and (isinstance(fixed, bool) or not isinstance(fixed, (int, float))
                                  or not -1.0 <= fixed <= 1.0):
            raise ConfigError(f"threshold must be a cosine similarity in [-1, 1] or None (calibrate), got {fixed!r}")
        self.use_center = self.options.get("center", True)
        if not isinstance(self.use_center, bool):
            raise ConfigError(f"center must be true or false, got {self.use_center!r}")
        self._init_space()
        self.prototypes: dict[str, np.ndarray] = {}  # raw (uncentred) unit rows, so a refit can move the centre
        self.center: np.ndarray | None = None
        self.fitted = False
        self.threshold: float | None = None if fixed is None else float(fixed)  # the lowest adapter threshold
        self.thresholds: dict[str, float] = {}
        self.calibration = "fixed" if fixed is not None else "none"
        self.stats: dict[str, float] = {}
        self._matrix: tuple[np.ndarray, np.ndarray, list[str]] | None = None

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("max_prototypes", "top_k", "target_rejection", "novelty_slack", "threshold", "center",
                "embedder_identity")

    # --- what the bank tells it ------------------------------------------------------------------------------
    def remove_adapter(self, adapter: str) -> None:
        super().remove_adapter(adapter)
        self.prototypes.pop(adapter, None)
        self.thresholds.pop(adapter, None)
        self._matrix = None

    def observe(self, adapter: str, prompts: Sequence[str], embeddings: np.ndarray | None = None) -> None:
        if not isinstance(adapter, str) or not adapter:
            raise InvalidInputError(f"adapter must be a non-empty string, got {adapter!r}")
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise InvalidInputError(f"observe() takes a list of prompts, got {type(prompts).__name__}")
        matrix = as_embedding_matrix(embeddings, len(prompts), self.dim, "embeddings")
        self.add_adapter(adapter)
        if not len(prompts):
            return
        self._check_dim(matrix)
        old = self.prototypes.get(adapter)
        merged = matrix if old is None else np.concatenate([old, matrix])
        if merged.shape[0] > self.max_prototypes:
            merged = merged[farthest_point_subset(merged, self.max_prototypes)]
        self.prototypes[adapter] = np.ascontiguousarray(merged)
        self._matrix = None

    # --- scoring ---------------------------------------------------------------------------------------------
    def _all(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """All prototypes [P, d] in adapter order (centred when a centre is set), the block start of each adapter,
        and the adapters with any."""
        if self._matrix is None:
            names = [a for a in self.adapters if a in self.prototypes and len(self.prototypes[a])]
            blocks = [centered(self.prototypes[a], self.center) for a in names]
            starts = np.cumsum([0] + [len(b) for b in blocks])[:-1]
            matrix = np.concatenate(blocks) if blocks else np.zeros((0, self.dim or 0), dtype=np.float32)
            self._matrix = (matrix, starts.astype(np.int64), names)
        return self._matrix

    def _block_score(self, sims: np.ndarray, k: int) -> np.ndarray:
        """Per row, the mean of the k largest values (k capped by the number of columns)."""
        k = min(k, sims.shape[1])
        if k == 1:
            return sims.max(axis=1)
        return np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:].mean(axis=1)

    def scores(self, embeddings: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """[n, adapters-with-prototypes] scores of unit-length embeddings, and those adapters' names."""
        matrix, starts, names = self._all()
        if not names:
            return np.zeros((embeddings.shape[0], 0), dtype=np.float32), names
        sims = centered(embeddings, self.center) @ matrix.T
        ends = [*list(starts[1:]), matrix.shape[0]]
        out = np.empty((embeddings.shape[0], len(names)), dtype=np.float32)
        for j, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
            out[:, j] = self._block_score(sims[:, lo:hi], self.top_k)
        return out, names

    def _best(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        table, names = self.scores(embeddings)
        if not names:
            return np.full(embeddings.shape[0], -np.inf), np.full(embeddings.shape[0], -1), names
        best = table.argmax(axis=1)
        return table[np.arange(len(best)), best], best, names

    # --- routing ---------------------------------------------------------------------------------------------
    def route(self, requests: Sequence[RouteRequest]) -> list[Route]:
        matrix = request_matrix(requests, self.dim)
        if not len(requests):
            return []
        score, best, names = self._best(matrix)
        if not names:
            return [Route(None, math.nan, self.name, "no adapter has learned prompts: base model")] * len(requests)
        thresholds = self._thresholds()
        routes = []
        for s, b in zip(score.tolist(), best.tolist(), strict=True):
            adapter = names[b]
            t = thresholds.get(adapter, DUPLICATE_SIMILARITY)
            if s >= t:
                routes.append(Route(adapter, s, self.name, f"nearest learned prompt, cosine {s:.4f} ≥ {t:.4f}"))
            else:
                routes.append(Route(None, s, self.name, f"nearest learned prompt ({adapter}) cosine {s:.4f} < "
                                                        f"{t:.4f}: base model"))
        return routes

    def _thresholds(self) -> dict[str, float]:
        """Every adapter's threshold; calibrates on first use when never fitted, and gives an adapter first
        observed after the last fit its in-scope floor (no out-of-scope data are kept to do more)."""
        if not self.fitted:
            self.fit(None)
        names = self._all()[2]
        missing = [a for a in names if a not in self.thresholds]
        if missing:
            fixed = self.options.get("threshold")
            for a in missing:
                self.thresholds[a] = float(fixed) if fixed is not None else self._floor(self._loo(names.index(a))[0])
            self.threshold = min(self.thresholds.values())
        return self.thresholds

    # --- calibration -----------------------------------------------------------------------------------------
    def _loo(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Adapter j's leave-one-out scores against its own other prototypes, and whether its nearest adapter
        (itself left out) is its own: the routing a new prompt like it would get. Empty for a single prototype."""
        matrix, starts, _names = self._all()
        ends = [*list(starts[1:]), matrix.shape[0]]
        lo, hi = int(starts[j]), int(ends[j])
        if hi - lo < 2:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool)
        sims = matrix[lo:hi] @ matrix.T
        sims[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf  # leave itself out
        per_adapter = np.stack([self._block_score(sims[:, a:b], self.top_k if a != lo else
                                                  min(self.top_k, hi - lo - 1))
                                for a, b in zip(starts, ends, strict=True)], axis=1)
        return per_adapter[:, j], per_adapter.argmax(axis=1) == j

    def in_scope_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """`_loo` of every adapter, concatenated in adapter order (adapters with one prompt are left out)."""
        parts = [self._loo(j) for j in range(len(self._all()[2]))]
        if not parts:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=bool)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _floor(self, own: np.ndarray) -> float:
        """The in-scope floor of an adapter from its leave-one-out scores (module docstring)."""
        if not len(own):
            return DUPLICATE_SIMILARITY
        q = float(np.quantile(own, 1.0 - NOVELTY_RECALL, method="lower"))
        return max(-1.0, 1.0 - self.novelty_slack * (1.0 - q))

    def _calibrate(self, out_of_scope: np.ndarray | None) -> tuple[dict[str, float], str, dict[str, float]]:
        names = self._all()[2]
        loo = [self._loo(j) for j in range(len(names))]
        has_out = out_of_scope is not None and len(out_of_scope) > 0 and bool(names)
        if has_out:
            table = self.scores(out_of_scope)[0]
            nearest, nearest_score = table.argmax(axis=1), table.max(axis=1)
        fixed = self.options.get("threshold")
        thresholds: dict[str, float] = {}
        for j, adapter in enumerate(names):
            own = loo[j][0]
            if fixed is not None:
                thresholds[adapter] = float(fixed)
                continue
            t = self._floor(own)
            if has_out:  # reject all but (1 - target_rejection) of the out-of-scope prompts nearest this adapter
                theirs = np.sort(nearest_score[nearest == j])[::-1]
                allowed = math.floor((1.0 - self.target_rejection) * len(theirs) + 1e-9)
                if allowed < len(theirs):
                    edge = float(theirs[allowed])
                    above = np.concatenate([own, theirs])
                    above = above[above > edge]
                    t_out = (edge + float(above.min())) / 2 if len(above) else float(np.nextafter(edge, np.inf))
                    t = max(t, t_out)
            thresholds[adapter] = t
        method = "fixed" if fixed is not None else "rejection_target" if has_out else "in_scope_floor"
        inside = np.concatenate([p[0] for p in loo]) if loo else np.zeros(0)
        correct = np.concatenate([p[1] for p in loo]) if loo else np.zeros(0, dtype=bool)
        owner_t = np.concatenate([np.full(len(p[0]), thresholds[a]) for p, a in zip(loo, names, strict=True)]) \
            if loo else np.zeros(0)
        if has_out:
            rejected = nearest_score < np.array([thresholds[names[j]] for j in nearest])
        stats = {
            "threshold": min(thresholds.values()) if thresholds else math.nan,
            "threshold_max": max(thresholds.values()) if thresholds else math.nan,
            "in_scope_recall": float((inside >= owner_t).mean()) if len(inside) else math.nan,
            "in_scope_accuracy": float(((inside >= owner_t) & correct).mean()) if len(inside) else math.nan,
            "out_of_scope_rejection": float(rejected.mean()) if has_out else math.nan,
            "n_in": float(len(inside)),
            "n_out": float(len(out_of_scope)) if has_out and out_of_scope is not None else 0.0,
        }
        return thresholds, method, stats

    def fit(self, out_of_scope: np.ndarray | None = None) -> dict[str, float]:
        """Calibrate every adapter's threshold (module docstring); returns threshold (the lowest adapter's),
        threshold_max, in_scope_recall (leave-one-out share at or above its adapter's threshold),
        in_scope_accuracy (the same, and routed to its own adapter), out_of_scope_rejection, n_in, n_out (NaN
        where there was nothing to measure)."""
        if out_of_scope is not None:
            out_of_scope = as_embedding_matrix(out_of_scope, None, self.dim, "out_of_scope")
        if self.use_center and out_of_scope is not None and len(out_of_scope):
            rows = [self.prototypes[a] for a in self.adapters if a in self.prototypes]
            self.set_center(np.concatenate([*rows, out_of_scope]).mean(axis=0))
        self.thresholds, self.calibration, self.stats = self._calibrate(out_of_scope)
        self.threshold = min(self.thresholds.values()) if self.thresholds else None
        self.fitted = True
        return dict(self.stats)

    def set_center(self, center: np.ndarray | None) -> None:
        """Compare embeddings after subtracting `center` (None: raw cosine). `fit(out_of_scope)` sets it; a caller
        with a better reference for the space may set it and then `fit()` to recalibrate in it."""
        if center is not None:
            center = np.asarray(center, dtype=np.float32).reshape(-1)
            if (self.dim is not None and center.shape[0] != self.dim) or not np.isfinite(center).all():
                raise InvalidInputError(f"center must be {self.dim} finite numbers, got shape {center.shape}")
        self.center = center
        self._matrix = None

    # --- state -----------------------------------------------------------------------------------------------
    def _has_state(self) -> bool:
        return bool(self.prototypes)

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        names = self._all()[2]
        counts = [len(self.prototypes[a]) for a in names]
        raw = [self.prototypes[a] for a in names]
        tensors = {"prototypes": np.concatenate(raw).astype(np.float32)} if raw else {}
        if self.center is not None:
            tensors["center"] = self.center
        return tensors, {"adapters": list(self.adapters), "prototype_adapters": names, "prototype_counts": counts,
                         "dim": self.dim, "threshold": self.threshold, "thresholds": self.thresholds,
                         "calibration": self.calibration,
                         "fitted": self.fitted,
                         "stats": self.stats, "embedder_identity": self.embedder_identity}

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        names, counts = list(meta.get("prototype_adapters", [])), list(meta.get("prototype_counts", []))
        matrix = tensors.get("prototypes", np.zeros((0, meta.get("dim") or 0), dtype=np.float32))
        if len(names) != len(counts) or sum(counts) != matrix.shape[0] or set(names) - set(self.adapters):
            raise CheckpointError(f"router state is inconsistent: {sum(counts)} prototypes listed for {names}, "
                                  f"{matrix.shape[0]} stored; the files are damaged or from another version")
        offsets = np.cumsum([0, *counts])
        self.prototypes = {a: np.ascontiguousarray(matrix[offsets[i]:offsets[i + 1]], dtype=np.float32)
                           for i, a in enumerate(names)}
        self.dim = meta.get("dim")
        self.threshold = meta.get("threshold")
        self.thresholds = {str(k): float(v) for k, v in meta.get("thresholds", {}).items()}
        self.fitted = bool(meta.get("fitted", self.threshold is not None))
        self.center = np.asarray(tensors["center"], dtype=np.float32) if "center" in tensors else None
        self.calibration = meta.get("calibration", "none")
        self.stats = dict(meta.get("stats", {}))
        self.embedder_identity = meta.get("embedder_identity")
        self.options["embedder_identity"] = self.embedder_identity
        self._matrix = None


__all__ = [
    "DUPLICATE_SIMILARITY",
    "EmbeddingRouter",
    "EmbeddingSpaceMixin",
    "as_embedding_matrix",
    "centered",
    "check_fraction",
    "check_positive_int",
    "farthest_point_subset",
    "normalize_identity",
    "request_matrix",
]
