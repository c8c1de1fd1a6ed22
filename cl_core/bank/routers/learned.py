"""`learned`: a small classifier over the frozen base's prompt embeddings picks the adapter, or the base model.

Classes are the bank's adapters plus one "base" class. It learns from three kinds of evidence, all kept as labelled
embeddings (bounded per class by `max_examples`, chosen by the same farthest-point selection as the `embedding`
router's prototypes, so old regions of a class are not forgotten):
- assignments: `observe(adapter, prompts, embeddings)`: these prompts belong to that adapter;
- out-of-scope prompts: `fit(out_of_scope)`: these must reach the base (they replace the previous fit's
  out-of-scope set; `fit()` without them keeps it);
- loss feedback: `observe_losses(prompts, embeddings, losses, base_losses)`: each prompt is (re)labelled with the
  adapter that gives it the lowest loss, or with the base when no adapter beats the base's loss by `margin`. A prompt
  already known (same text) moves to its new class: the latest evidence wins. That is the whole rule; it keeps
  routing honest when an adapter turns out to serve prompts of another one better.

Why multinomial logistic regression (softmax over a linear map of standardised embeddings) and not an MLP: the
classes are few and the embeddings already separate tasks (the `embedding` router's nearest-prototype accuracy is
high), so a convex model suffices, trains in about a second on a CPU (300 full-batch steps over a few hundred
examples of dimension 576; bench_routing.py reports it), has one optimum (zero initialisation + full-batch
Adam is deterministic: the same data give the same weights in every process, no seed needed) and its probabilities
make a usable "none fits" signal. Features are standardised (per-dimension mean and scale of the training data)
because mean-pooled hidden states are anisotropic: the class differences live in small components.

Routing: softmax over the trained classes; the argmax adapter answers when its probability is at least
`min_probability` (default 0.5) and the request passes the novelty gate, else the base. Without any out-of-scope
data the base class has no examples and only those two checks can send a request to the base.

The novelty gate: a linear classifier is closed-set. A prompt unlike anything it was trained on (neither an
adapter's nor the out-of-scope set's) lands in whatever class its direction extrapolates to, often with high
probability (tests/unit/test_routers.py shows it on an unseen synthetic cluster; on the default model, without the
gate, all prompts of two unseen tasks, sports_understanding and navigate, and 22% of object_counting went to
adapters: tests/benchmarks/bench_routing.py). So the chosen adapter must also be near its own training prompts: its
score for the request must reach that adapter's in-scope floor of the `embedding` router (cosine distance at most
`novelty_slack`, default 1.5, times the distance that 99% of its training prompts reach to their nearest other
one, leave-one-out), computed on the classifier's examples in the same centred space (centre: the mean of all
training examples, base class included; see `cl_core/bank/routers/embedding.py`). Out-of-scope data do not set
the gate: they are the classifier's job. Why a slack: a leave-one-out distance is exactly a new in-distribution
prompt's nearest-neighbour distance, so the bare 99th percentile turns away about 1% of good prompts, more with
few examples (--quick embeddings: slack 1.0 kept 0.90 of letter_counting, 1.5 kept all; both rejected every unseen
prompt). `novelty_slack=None` switches the gate off.

Online: `fit()` can be called again after more observations. It warm-starts from the previous weights, converted to
the new standardisation so the starting function is exactly the previous one; classes of new adapters start at
zero, classes of removed adapters are dropped (at once, by `remove_adapter`, so they get no traffic).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cl_core.bank.router import ROUTERS, Route, Router, RouteRequest
from cl_core.bank.routers.embedding import (
    DUPLICATE_SIMILARITY,
    EmbeddingRouter,
    EmbeddingSpaceMixin,
    as_embedding_matrix,
    check_fraction,
    check_positive_int,
    farthest_point_subset,
    request_matrix,
)
from cl_core.errors import CheckpointError, ConfigError, InvalidInputError

BASE = None
"""The label of the base class (adapter names are strings, so None can never collide with one)."""


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    return float(value)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


@ROUTERS.register("learned")
class LearnedRouter(EmbeddingSpaceMixin, Router):
    """Softmax regression over embeddings, classes = adapters + base (see the module docstring).

    Options: `min_probability` (0.5), `novelty_slack` (1.5, None: no novelty gate), `max_examples` (per class,
    512), `epochs` (full-batch Adam steps per fit, 300), `learning_rate` (0.05), `l2` (weight decay on the
    standardised weights, 1e-3), `balanced` (weight classes by inverse frequency, True: a large out-of-scope set
    must not drown a small adapter), `embedder_identity`.
    """

    needs_embeddings = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.min_probability = check_fraction(self.options.get("min_probability", 0.5), "min_probability", False)
        self.max_examples = check_positive_int(self.options.get("max_examples", 512), "max_examples")
        self.epochs = check_positive_int(self.options.get("epochs", 300), "epochs")
        self.learning_rate = _number(self.options.get("learning_rate", 0.05), "learning_rate")
        self.l2 = _number(self.options.get("l2", 1e-3), "l2")
        self.balanced = self.options.get("balanced", True)
        slack = self.options.get("novelty_slack", 1.5)
        if slack is not None and (isinstance(slack, bool) or not isinstance(slack, (int, float))
                                  or not 1.0 <= slack < math.inf):
            raise ConfigError(f"novelty_slack must be a number ≥ 1 or None (no novelty gate), got {slack!r}")
        self.novelty_slack = None if slack is None else float(slack)
        if not self.learning_rate > 0 or not math.isfinite(self.learning_rate):
            raise ConfigError(f"learning_rate must be a positive number, got {self.options.get('learning_rate')!r}")
        if not self.l2 >= 0 or not math.isfinite(self.l2):
            raise ConfigError(f"l2 must be a number ≥ 0, got {self.options.get('l2')!r}")
        if not isinstance(self.balanced, bool):
            raise ConfigError(f"balanced must be true or false, got {self.balanced!r}")
        self._init_space()
        # labelled evidence: per class (adapter name, or BASE) the embeddings and their prompts (None: no text)
        self.examples: dict[str | None, np.ndarray] = {}
        self.example_prompts: dict[str | None, list[str | None]] = {}
        # the trained model: classes in column order (BASE first), standardisation and weights
        self.classes: list[str | None] = []
        self.weights: np.ndarray | None = None
        self.bias: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.stats: dict[str, float] = {}
        self.novelty_thresholds: dict[str, float] | None = None  # per adapter, set by fit (None: no gate)
        self.novelty_center: np.ndarray | None = None
        self._gate_cache: EmbeddingRouter | None = None

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("min_probability", "novelty_slack", "max_examples", "epochs", "learning_rate", "l2", "balanced",
                "embedder_identity")

    # --- evidence --------------------------------------------------------------------------------------------
    def _add(self, label: str | None, prompts: Sequence[str | None], matrix: np.ndarray) -> None:
        """Add labelled rows; a prompt text already known under another class moves here (latest evidence wins)."""
        texts = {p for p in prompts if p is not None}
        if texts:
            for other in list(self.examples):
                keep = [i for i, p in enumerate(self.example_prompts[other]) if p not in texts]
                if len(keep) != len(self.example_prompts[other]):
                    self._set(other, self.examples[other][keep], [self.example_prompts[other][i] for i in keep])
        old = self.examples.get(label, np.zeros((0, matrix.shape[1]), dtype=np.float32))
        rows = np.concatenate([old, matrix])
        names = self.example_prompts.get(label, []) + list(prompts)
        if rows.shape[0] > self.max_examples:
            keep_idx = farthest_point_subset(rows, self.max_examples)
            rows, names = rows[keep_idx], [names[i] for i in keep_idx]
        self._set(label, rows, names)

    def _set(self, label: str | None, rows: np.ndarray, prompts: list[str | None]) -> None:
        self._gate_cache = None
        if len(rows):
            self.examples[label] = np.ascontiguousarray(rows, dtype=np.float32)
            self.example_prompts[label] = prompts
        else:
            self.examples.pop(label, None)
            self.example_prompts.pop(label, None)

    def _check_prompts(self, prompts: Any) -> None:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise InvalidInputError(f"prompts must be a list of str, got {type(prompts).__name__}")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise InvalidInputError(f"prompts[{i}] must be a string, got {type(prompt).__name__}")

    def observe(self, adapter: str, prompts: Sequence[str], embeddings: np.ndarray | None = None) -> None:
        if not isinstance(adapter, str) or not adapter:
            raise InvalidInputError(f"adapter must be a non-empty string, got {adapter!r}")
        self._check_prompts(prompts)
        matrix = as_embedding_matrix(embeddings, len(prompts), self.dim, "embeddings")
        self.add_adapter(adapter)
        if len(prompts):
            self._check_dim(matrix)
            self._add(adapter, list(prompts), matrix)

    def observe_losses(self, prompts: Sequence[str], embeddings: np.ndarray,
                       losses: Mapping[str, Sequence[float]], base_losses: Sequence[float] | None = None,
                       margin: float = 0.0) -> list[str | None]:
        """Relabel each prompt with the adapter of lowest loss (`losses[adapter][i]`), or the base when
        `base_losses[i]` is not beaten by more than `margin`. Returns the label given to each prompt (None: base).
        Takes effect at the next `fit()`."""
        self._check_prompts(prompts)
        matrix = as_embedding_matrix(embeddings, len(prompts), self.dim, "embeddings")
        if not isinstance(losses, Mapping) or not losses:
            raise InvalidInputError("losses must map at least one adapter name to one loss per prompt")
        unknown = sorted(set(losses) - set(self.adapters))
        if unknown:
            raise InvalidInputError(f"losses name unknown adapter(s) {unknown}; known: {self.adapters}")
        names = list(losses)
        columns = {f"losses[{a!r}]": losses[a] for a in names}
        if base_losses is not None:
            columns["base_losses"] = base_losses
        table = []
        for what, values in columns.items():
            try:
                column = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError):
                column = np.zeros(0)
            if column.shape != (len(prompts),) or not np.isfinite(column).all():
                raise InvalidInputError(f"{what} must be {len(prompts)} finite numbers, one per prompt")
            table.append(column)
        if not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            raise InvalidInputError(f"margin must be a finite number ≥ 0, got {margin!r}")
        adapter_losses = np.stack(table[:len(names)], axis=1)
        best = adapter_losses.argmin(axis=1)  # ties: the first adapter named
        labels: list[str | None] = []
        for i, b in enumerate(best.tolist()):
            wins = base_losses is None or adapter_losses[i, b] < table[-1][i] - margin
            labels.append(names[b] if wins else BASE)
        if len(prompts):
            self._check_dim(matrix)
            for label in dict.fromkeys(labels):
                idx = [i for i, lab in enumerate(labels) if lab == label]
                self._add(label, [prompts[i] for i in idx], matrix[idx])
        return labels

    def remove_adapter(self, adapter: str) -> None:
        super().remove_adapter(adapter)
        self.examples.pop(adapter, None)
        self.example_prompts.pop(adapter, None)
        self._gate_cache = None
        if adapter in self.classes and self.weights is not None and self.bias is not None:
            col = self.classes.index(adapter)
            self.weights = np.delete(self.weights, col, axis=1)
            self.bias = np.delete(self.bias, col)
            self.classes.pop(col)

    # --- training --------------------------------------------------------------------------------------------
    def fit(self, out_of_scope: np.ndarray | None = None) -> dict[str, float]:
        """Train (warm start) on every labelled example; returns n_examples, n_out, train_accuracy,
        in_scope_recall and out_of_scope_rejection on the training data (with `min_probability`), loss."""
        if out_of_scope is not None:
            matrix = as_embedding_matrix(out_of_scope, None, self.dim, "out_of_scope")
            self._check_dim(matrix)
            keep = [i for i, p in enumerate(self.example_prompts.get(BASE, [])) if p is not None]  # loss feedback
            if BASE in self.examples:
                self._set(BASE, self.examples[BASE][keep], [self.example_prompts[BASE][i] for i in keep])
            if len(matrix):
                self._add(BASE, [None] * len(matrix), matrix)
        classes: list[str | None] = [BASE] + [a for a in self.adapters if a in self.examples]
        if len(classes) == 1:  # nothing learned by any adapter: nothing to choose between
            self.classes, self.weights, self.bias = [], None, None
            self.stats = {"n_examples": 0.0, "n_out": float(len(self.examples.get(BASE, ()))),
                          "train_accuracy": math.nan, "in_scope_recall": math.nan,
                          "out_of_scope_rejection": math.nan, "loss": math.nan}
            return dict(self.stats)
        x = np.concatenate([self.examples[c] for c in classes if c in self.examples]).astype(np.float64)
        y = np.concatenate([np.full(len(self.examples[c]), j) for j, c in enumerate(classes) if c in self.examples])
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale = np.maximum(scale, 1e-6)
        weights, bias = self._warm_start(classes, mean, scale, x.shape[1])
        counts = np.bincount(y, minlength=len(classes)).astype(np.float64)
        sample_w = (len(y) / (np.count_nonzero(counts) * counts[y])) if self.balanced else np.ones(len(y))
        sample_w /= sample_w.sum()
        weights, bias, loss = self._train((x - mean) / scale, y, sample_w, weights, bias)
        self.classes, self.weights, self.bias, self.mean, self.scale = classes, weights, bias, mean, scale
        probs = self._probabilities(x)
        pred = probs.argmax(axis=1)
        self.novelty_thresholds = None
        if self.novelty_slack is not None:
            # the gate's space is centred like the embedding router's (its docstring), when there is a base class
            self.novelty_center = None if BASE not in self.examples else x.mean(axis=0).astype(np.float32)
            self._gate_cache = None
            gate = self._gate()
            gate.fit()  # no out-of-scope data: each adapter's threshold is its in-scope floor
            self.novelty_thresholds = dict(gate.thresholds)
        routed = np.where((pred != 0) & (probs.max(axis=1) >= self.min_probability) & self._novel_ok(x, pred),
                          pred, 0)
        inside, outside = y != 0, y == 0
        self.stats = {"n_examples": float(len(y)), "n_out": float(outside.sum()),
                      "train_accuracy": float((routed == y).mean()),
                      "in_scope_recall": float((routed[inside] == y[inside]).mean()) if inside.any() else math.nan,
                      "out_of_scope_rejection": float((routed[outside] == 0).mean()) if outside.any() else math.nan,
                      "loss": loss, "novelty_threshold": min(self.novelty_thresholds.values())
                      if self.novelty_thresholds else math.nan}
        return dict(self.stats)

    def _gate(self) -> EmbeddingRouter:
        """The adapters' current training examples as `embedding`-router prototypes (for the novelty gate)."""
        if self._gate_cache is None:
            gate = EmbeddingRouter(max_prototypes=self.max_examples, novelty_slack=self.novelty_slack or 1.0)
            gate.set_center(self.novelty_center)
            for adapter in self.adapters:
                if adapter in self.examples:
                    gate.add_adapter(adapter)
                    gate.prototypes[adapter] = self.examples[adapter]
            self._gate_cache = gate
        return self._gate_cache

    def _novelty_scores(self, x: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """Per row, the cosine to the nearest training example of the predicted class (NaN for the base class)."""
        table, names = self._gate().scores(x.astype(np.float32))
        out = np.full(len(pred), np.nan)
        for i, j in enumerate(pred.tolist()):
            adapter = self.classes[j]
            if adapter is not BASE and adapter in names:
                out[i] = table[i, names.index(adapter)]
        return out

    def _novelty_limits(self, pred: np.ndarray) -> np.ndarray:
        """Per row, the gate threshold of the predicted adapter (an adapter without one: only near-duplicates)."""
        limits = self.novelty_thresholds or {}
        return np.array([limits.get(self.classes[j], DUPLICATE_SIMILARITY) if self.classes[j] is not BASE
                         else np.inf for j in pred.tolist()])

    def _novel_ok(self, x: np.ndarray, pred: np.ndarray) -> np.ndarray:
        if self.novelty_thresholds is None:
            return np.ones(len(pred), dtype=bool)
        scores = self._novelty_scores(x, pred)
        return np.nan_to_num(scores, nan=-np.inf) >= self._novelty_limits(pred)

    def _warm_start(self, classes: list[str | None], mean: np.ndarray, scale: np.ndarray,
                    dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Previous weights re-expressed for the new standardisation (same logits), zeros for new classes."""
        weights, bias = np.zeros((dim, len(classes))), np.zeros(len(classes))
        if self.weights is None or self.bias is None or self.mean is None or self.scale is None:
            return weights, bias
        for j, c in enumerate(classes):
            if c in self.classes:
                old = self.classes.index(c)
                w = self.weights[:, old]
                weights[:, j] = w * scale / self.scale
                bias[j] = self.bias[old] + ((mean - self.mean) / self.scale) @ w
        return weights, bias

    def _train(self, z: np.ndarray, y: np.ndarray, sample_w: np.ndarray, weights: np.ndarray,
               bias: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Full-batch Adam on the weighted cross-entropy + l2/2 |W|²; returns weights, bias and the final loss."""
        onehot = np.eye(weights.shape[1])[y]
        params = [weights, bias]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        b1, b2, eps = 0.9, 0.999, 1e-8
        for step in range(1, self.epochs + 1):
            probs = _softmax(z @ weights + bias)
            delta = (probs - onehot) * sample_w[:, None]
            grads = [z.T @ delta + self.l2 * weights, delta.sum(axis=0)]
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                p -= self.learning_rate * (m[i] / (1 - b1 ** step)) / (np.sqrt(v[i] / (1 - b2 ** step)) + eps)
        probs = _softmax(z @ weights + bias)
        loss = float(-(sample_w * np.log(probs[np.arange(len(y)), y] + 1e-12)).sum()
                     + 0.5 * self.l2 * (weights ** 2).sum())
        return weights, bias, loss

    def _probabilities(self, x: np.ndarray) -> np.ndarray:
        if self.weights is None or self.bias is None or self.mean is None or self.scale is None:
            raise ConfigError("the learned router is not trained: call fit() first")
        return _softmax(((x - self.mean) / self.scale) @ self.weights + self.bias)

    # --- routing ---------------------------------------------------------------------------------------------
    def route(self, requests: Sequence[RouteRequest]) -> list[Route]:
        matrix = request_matrix(requests, self.dim)
        if not len(requests):
            return []
        if self.weights is None or len(self.classes) < 2:
            return [Route(None, math.nan, self.name, "classifier not trained (observe, then fit()): base model")
                    ] * len(requests)
        probs = self._probabilities(matrix.astype(np.float64))
        pred = probs.argmax(axis=1)
        gated = self.novelty_thresholds is not None
        novelty = self._novelty_scores(matrix, pred) if gated else None
        limits = self._novelty_limits(pred) if gated else None
        routes = []
        for i, row in enumerate(probs):
            j = int(pred[i])
            p = float(row[j])
            adapter = self.classes[j]
            if adapter is BASE:
                routes.append(Route(None, p, self.name, f"classifier: base class, p={p:.3f}"))
            elif p < self.min_probability:
                routes.append(Route(None, p, self.name, f"classifier: {adapter} p={p:.3f} < min_probability "
                                                        f"{self.min_probability}: base model"))
            elif novelty is not None and limits is not None and not novelty[i] >= limits[i]:
                routes.append(Route(None, p, self.name, f"classifier: {adapter} p={p:.3f}, but the prompt is unlike "
                                                        f"its training prompts (cosine {novelty[i]:.4f} < "
                                                        f"{limits[i]:.4f}): base model"))
            else:
                routes.append(Route(adapter, p, self.name, f"classifier: p={p:.3f}"))
        return routes

    # --- state -----------------------------------------------------------------------------------------------
    def _has_state(self) -> bool:
        return bool(self.examples) or self.weights is not None

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        labels = list(self.examples)
        tensors: dict[str, np.ndarray] = {}
        if labels:
            tensors["examples"] = np.concatenate([self.examples[c] for c in labels]).astype(np.float32)
        if self.weights is not None and self.bias is not None and self.mean is not None and self.scale is not None:
            tensors |= {"weights": self.weights, "bias": self.bias, "mean": self.mean, "scale": self.scale}
        if self.novelty_center is not None:
            tensors["novelty_center"] = self.novelty_center
        return tensors, {"adapters": list(self.adapters), "example_classes": labels,
                         "example_counts": [len(self.examples[c]) for c in labels],
                         "example_prompts": [p for c in labels for p in self.example_prompts[c]],
                         "classes": list(self.classes), "dim": self.dim, "stats": self.stats,
                         "novelty_thresholds": self.novelty_thresholds,
                         "embedder_identity": self.embedder_identity}

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        super().load_state_dict(tensors, meta)
        labels, counts = list(meta.get("example_classes", [])), list(meta.get("example_counts", []))
        prompts = list(meta.get("example_prompts", []))
        rows = tensors.get("examples", np.zeros((0, meta.get("dim") or 0), dtype=np.float32))
        if len(labels) != len(counts) or sum(counts) != rows.shape[0] or len(prompts) != rows.shape[0]:
            raise CheckpointError(f"router state is inconsistent: {sum(counts)} examples listed, {rows.shape[0]} "
                                  f"stored, {len(prompts)} prompts; the files are damaged or from another version")
        offsets = np.cumsum([0, *counts])
        self.examples = {c: np.ascontiguousarray(rows[offsets[i]:offsets[i + 1]]) for i, c in enumerate(labels)}
        self.example_prompts = {c: prompts[offsets[i]:offsets[i + 1]] for i, c in enumerate(labels)}
        self.classes = list(meta.get("classes", []))
        trained = all(k in tensors for k in ("weights", "bias", "mean", "scale"))
        self.weights = np.asarray(tensors["weights"], dtype=np.float64) if trained else None
        self.bias = np.asarray(tensors["bias"], dtype=np.float64) if trained else None
        self.mean = np.asarray(tensors["mean"], dtype=np.float64) if trained else None
        self.scale = np.asarray(tensors["scale"], dtype=np.float64) if trained else None
        if trained and self.weights is not None and self.weights.shape[1] != len(self.classes):
            raise CheckpointError(f"router state is inconsistent: {self.weights.shape[1]} weight columns for "
                                  f"classes {self.classes}")
        self.dim = meta.get("dim")
        self.stats = dict(meta.get("stats", {}))
        limits = meta.get("novelty_thresholds")
        self.novelty_thresholds = None if limits is None else {str(k): float(v) for k, v in limits.items()}
        self.novelty_center = tensors.get("novelty_center")
        self._gate_cache = None
        self.embedder_identity = meta.get("embedder_identity")
        self.options["embedder_identity"] = self.embedder_identity


__all__ = ["BASE", "LearnedRouter"]
