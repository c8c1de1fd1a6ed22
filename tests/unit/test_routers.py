"""Routers: one contract suite run against every registered router, then what each router promises on its own.

The contract data are synthetic unit vectors (fast and exactly reproducible): three adapters, each a cluster around
its own direction, and out-of-scope prompts around a fourth; all share a strong common component, like the
anisotropic hidden states of a real base model (unrelated prompts still have cosine ≈ 0.8). Every request also
carries the task id, so the `task_id` router sees the same batches. One test embeds real text with `BaseEmbedder`
on the tiny random model, end to end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cl_core.bank.router import ROUTERS, Route, RouteRequest, load_router, make_router, save_router
from cl_core.bank.routers.embedding import DUPLICATE_SIMILARITY, EmbeddingRouter, farthest_point_subset
from cl_core.bank.routers.learned import LearnedRouter
from cl_core.errors import CheckpointError, ConfigError, InvalidInputError

DIM = 48
ADAPTERS = ("maths", "poems", "code")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class Synthetic:
    """Clusters of unit vectors: `sample(k, n)` draws n prompts of cluster k (k = len(ADAPTERS): out of scope)."""

    def __init__(self, seed: int = 0, spread: float = 0.45) -> None:
        self.rng = np.random.default_rng(seed)
        self.common = self.rng.normal(size=DIM)
        self.centers = self.rng.normal(size=(len(ADAPTERS) + 2, DIM))
        self.spread = spread

    def sample(self, k: int, n: int) -> np.ndarray:
        return _unit(2.0 * self.common + self.centers[k] + self.spread * self.rng.normal(size=(n, DIM)))


def _requests(data: Synthetic, per_adapter: int = 5, out: int = 5) -> tuple[list[RouteRequest], list[str | None]]:
    """Interleaved in-scope requests (task ids given) and out-of-scope ones, with the adapter each should reach."""
    requests, expected = [], []
    for i in range(per_adapter):
        for k, adapter in enumerate(ADAPTERS):
            requests.append(RouteRequest(f"{adapter} {i}", task=adapter, embedding=data.sample(k, 1)[0]))
            expected.append(adapter)
    for i in range(out):
        requests.append(RouteRequest(f"unrelated {i}", embedding=data.sample(len(ADAPTERS), 1)[0]))
        expected.append(None)
    order = np.random.default_rng(1).permutation(len(requests))
    return [requests[i] for i in order], [expected[i] for i in order]


def _fitted(name: str, data: Synthetic | None = None, **options: object):
    data = data or Synthetic()
    router = make_router(name, **options)
    for k, adapter in enumerate(ADAPTERS):
        x = data.sample(k, 40)
        router.observe(adapter, [f"{adapter} train {i}" for i in range(len(x))], x)
    router.fit(data.sample(len(ADAPTERS), 60))
    return router, data


def _dicts(routes: list[Route]) -> list[dict]:
    return [r.to_dict() for r in routes]


ROUTER_NAMES = ROUTERS.names()


def test_every_builtin_router_is_registered() -> None:
    assert {"task_id", "embedding", "learned"} <= set(ROUTER_NAMES)
    assert ROUTERS.get("embedding") is EmbeddingRouter and ROUTERS.get("learned") is LearnedRouter
    assert EmbeddingRouter.needs_embeddings and LearnedRouter.needs_embeddings
    with pytest.raises(InvalidInputError, match="known: .*embedding.*learned"):
        make_router("nearest")


# --- the contract, for every registered router ---------------------------------------------------------------
@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_routes_one_answer_per_request_in_order(name: str) -> None:
    router, data = _fitted(name)
    requests, expected = _requests(data)
    routes = router.route(requests)
    assert len(routes) == len(requests)
    assert all(isinstance(r, Route) and r.router == name and r.reason for r in routes)
    assert [r.adapter for r in routes] == expected
    assert router.route([]) == []
    assert router.resolve(requests[0]).adapter == expected[0]
    # the same batch reversed gets the same answers reversed: no request's route depends on its neighbours
    assert [r.adapter for r in router.route(requests[::-1])] == expected[::-1]


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_unknown_and_out_of_scope_requests_reach_the_base(name: str) -> None:
    router, data = _fitted(name)
    out = data.sample(len(ADAPTERS), 20)  # fresh prompts of the out-of-scope kind fit() was shown
    routes = router.route([RouteRequest("?", task="translation", embedding=v) for v in out[:10]]
                          + [RouteRequest("?", embedding=v) for v in out[10:]])
    assert all(r.adapter is None and r.is_base for r in routes)
    assert all("base" in r.reason for r in routes)
    if router.needs_embeddings:  # a kind of prompt no fit has seen: the hard case (bench_routing measures it)
        unseen = router.route([RouteRequest("?", embedding=v) for v in data.sample(len(ADAPTERS) + 1, 20)])
        assert sum(r.is_base for r in unseen) >= 16


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_a_removed_adapter_gets_no_more_traffic(name: str) -> None:
    router, data = _fitted(name)
    requests, expected = _requests(data)
    assert "poems" in [r.adapter for r in router.route(requests)]
    router.remove_adapter("poems")
    assert "poems" not in router.adapters
    routes = router.route(requests)
    assert "poems" not in [r.adapter for r in routes]
    for route, want in zip(routes, expected, strict=True):  # the others keep their traffic
        if want in ("maths", "code"):
            assert route.adapter == want
    router.fit(data.sample(len(ADAPTERS), 60))  # and a refit does not bring it back
    assert "poems" not in [r.adapter for r in router.route(requests)]


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_saved_and_loaded_router_routes_identically(name: str, tmp_path: Path) -> None:
    router, data = _fitted(name)
    requests, _ = _requests(data, per_adapter=8, out=8)
    saved = save_router(router, tmp_path / "router")
    assert sorted(p.name for p in saved.iterdir()) == ["router.json", "router.safetensors"]
    meta = json.loads((saved / "router.json").read_text())
    assert meta["router"] == name and meta["state"]["adapters"] == list(ADAPTERS)
    loaded = load_router(saved)
    assert type(loaded) is type(router) and loaded.adapters == router.adapters
    assert _dicts(loaded.route(requests)) == _dicts(router.route(requests))
    save_router(loaded, saved)  # overwriting in place works and changes nothing
    assert _dicts(load_router(saved).route(requests)) == _dicts(router.route(requests))


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_malformed_batches_are_refused_clearly(name: str) -> None:
    router, data = _fitted(name)
    good = RouteRequest("hi", task="maths", embedding=data.sample(0, 1)[0])
    with pytest.raises(InvalidInputError, match="list of RouteRequest"):
        router.route(good)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="list of RouteRequest"):
        router.route("hello")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"requests\[1\] must be a RouteRequest"):
        router.route([good, "hello"])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="no option bogus"):
        make_router(name, bogus=1)


@pytest.mark.parametrize("name", [n for n in ROUTER_NAMES if ROUTERS.get(n).needs_embeddings])
def test_bad_embeddings_are_refused_clearly(name: str) -> None:
    router, data = _fitted(name)
    vector = data.sample(0, 1)[0]
    with pytest.raises(InvalidInputError, match=r"requests\[1\] has no embedding"):
        router.route([RouteRequest("a", embedding=vector), RouteRequest("b")])
    with pytest.raises(InvalidInputError, match="dimension 12.*dimension 48"):
        router.route([RouteRequest("a", embedding=np.ones(12, dtype=np.float32))])
    with pytest.raises(InvalidInputError, match="1-D"):
        router.route([RouteRequest("a", embedding=np.ones((2, DIM), dtype=np.float32))])
    nan = vector.copy()
    nan[3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        router.route([RouteRequest("a", embedding=vector), RouteRequest("b", embedding=nan)])
    with pytest.raises(InvalidInputError, match="zero vector"):
        router.route([RouteRequest("a", embedding=np.zeros(DIM, dtype=np.float32))])
    with pytest.raises(InvalidInputError, match="3 rows for 2 prompts"):
        router.observe("maths", ["x", "y"], data.sample(0, 3))
    with pytest.raises(InvalidInputError, match="missing"):
        router.observe("maths", ["x"], None)
    with pytest.raises(InvalidInputError, match="list of"):
        router.observe("maths", "x", data.sample(0, 1))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="out_of_scope has dimension 5"):
        router.fit(np.ones((2, 5), dtype=np.float32))
    nan_rows = data.sample(3, 4)
    nan_rows[2, 0] = np.inf
    with pytest.raises(InvalidInputError, match=r"out_of_scope\[2\] contains NaN"):
        router.fit(nan_rows)


@pytest.mark.parametrize("name", ROUTER_NAMES)
def test_a_router_that_has_learned_nothing_sends_everything_to_the_base(name: str) -> None:
    router = make_router(name)
    router.add_adapter("maths")
    vector = Synthetic().sample(0, 1)[0]
    routes = router.route([RouteRequest("a", task=None, embedding=vector)])
    assert [r.adapter for r in routes] == [None]


# --- embedding router ----------------------------------------------------------------------------------------
def test_embedding_threshold_calibration_separates_two_clusters_from_out_of_scope() -> None:
    data = Synthetic(seed=3)
    router = EmbeddingRouter()
    router.observe("a", [f"a{i}" for i in range(50)], data.sample(0, 50))
    router.observe("b", [f"b{i}" for i in range(50)], data.sample(1, 50))
    out_fit = data.sample(2, 200)
    stats = router.fit(out_fit)
    assert set(stats) >= {"threshold", "in_scope_recall", "out_of_scope_rejection", "n_in", "n_out"}
    assert stats["n_in"] == 100 and stats["n_out"] == 200
    assert stats["out_of_scope_rejection"] >= 0.99 and stats["in_scope_recall"] == 1.0
    # the threshold lies between what must be rejected and what must be kept
    inside, _ = router.in_scope_scores()
    outside = router.scores(out_fit)[0].max(axis=1)
    assert np.sort(outside)[math.ceil(0.99 * 200) - 1] < stats["threshold"] <= inside.min()
    # raw cosines cannot tell them apart with a constant: unrelated clusters have raw cosine > 0.7 here; the
    # router compares them after removing the common part (the centre fitted from all the rows it knows)
    raw = router.prototypes["a"] @ out_fit.T
    assert raw.mean() > 0.7 and router.center is not None and outside.mean() < 0.0
    test_a, test_b, test_out = data.sample(0, 40), data.sample(1, 40), data.sample(2, 100)
    routed = [r.adapter for r in router.route([RouteRequest("x", embedding=v) for v in
                                               np.concatenate([test_a, test_b, test_out])])]
    assert np.mean([a == "a" for a in routed[:40]]) >= 0.95
    assert np.mean([a == "b" for a in routed[40:80]]) >= 0.95
    assert np.mean([a is None for a in routed[80:]]) >= 0.95


def test_embedding_calibration_honours_the_rejection_target_when_clusters_overlap() -> None:
    data = Synthetic(seed=4)
    inside = data.sample(0, 60)
    outside = _unit(data.sample(0, 100) + 0.4 * data.sample(1, 100))  # out-of-scope prompts that come close
    recalls = []
    for target in (0.5, 0.9, 0.99):
        router = EmbeddingRouter(target_rejection=target, center=False)
        router.observe("a", [f"a{i}" for i in range(60)], inside)
        stats = router.fit(outside)
        assert stats["out_of_scope_rejection"] >= target
        recalls.append(stats["in_scope_recall"])
    assert recalls == sorted(recalls, reverse=True) and recalls[0] > recalls[-1]  # rejection is bought with recall
    assert recalls[-1] < 1.0


def test_embedding_fallbacks_without_out_of_scope_data() -> None:
    data = Synthetic(seed=5)
    router = EmbeddingRouter()
    router.observe("a", [f"a{i}" for i in range(100)], data.sample(0, 100))
    stats = router.fit()
    assert router.calibration == "in_scope_floor" and math.isnan(stats["out_of_scope_rejection"])
    own, _ = router.in_scope_scores()
    q = np.quantile(own, 0.01, method="lower")
    assert stats["threshold"] == pytest.approx(1 - 1.5 * (1 - q)) and stats["in_scope_recall"] == 1.0
    fresh = [r.adapter for r in router.route([RouteRequest("x", embedding=v) for v in data.sample(0, 50)])]
    assert fresh.count("a") >= 49
    other = [r.adapter for r in router.route([RouteRequest("x", embedding=v) for v in data.sample(1, 50)])]
    assert other.count(None) == 50
    strict = EmbeddingRouter(novelty_slack=1.0)
    strict.observe("a", [f"a{i}" for i in range(100)], router.prototypes["a"])
    assert strict.fit()["threshold"] == pytest.approx(q) and strict.fit()["in_scope_recall"] >= 0.99
    # every adapter with a single prompt: nothing to calibrate from, only near-duplicates are routed
    single = EmbeddingRouter()
    one = data.sample(0, 1)
    single.observe("a", ["only"], one)
    assert single.fit()["threshold"] == DUPLICATE_SIMILARITY
    assert single.resolve(RouteRequest("only", embedding=one[0])).adapter == "a"
    assert single.resolve(RouteRequest("other", embedding=data.sample(0, 1)[0])).adapter is None
    # a fixed threshold is used as given, and fit still measures at it
    fixed = EmbeddingRouter(threshold=0.25)
    fixed.observe("a", [f"a{i}" for i in range(10)], data.sample(0, 10))
    assert fixed.fit(data.sample(1, 20))["threshold"] == 0.25 and fixed.calibration == "fixed"
    fixed.observe("b", [f"b{i}" for i in range(10)], data.sample(2, 10))  # after the fit: fixed too
    assert fixed.resolve(RouteRequest("b", embedding=data.sample(2, 1)[0])).adapter == "b"
    assert fixed.thresholds == {"a": 0.25, "b": 0.25}


def test_embedding_thresholds_are_per_adapter_and_floored() -> None:
    data = Synthetic(seed=14)
    tight, diffuse = data.sample(0, 60), Synthetic(seed=14, spread=1.2).sample(1, 60)
    near_tight = _unit(data.sample(0, 100) + 0.5 * data.sample(2, 100))  # out of scope, close to "tight" only
    router = EmbeddingRouter()  # (the names: "tight" has out-of-scope prompts close by, "diffuse" is spread out)
    router.observe("tight", [f"t{i}" for i in range(60)], tight)
    router.observe("diffuse", [f"d{i}" for i in range(60)], diffuse)
    stats = router.fit(near_tight)
    assert stats["out_of_scope_rejection"] >= 0.99
    thresholds = router.thresholds
    assert set(thresholds) == {"tight", "diffuse"} and thresholds["tight"] > thresholds["diffuse"]
    # one shared threshold would have to be the tight adapter's, and would cut the diffuse adapter's recall too
    own, _ = router.in_scope_scores()
    assert (own[60:] >= thresholds["diffuse"]).all() and (own[60:] >= thresholds["tight"]).mean() < 0.5
    assert stats["in_scope_recall"] > (own >= thresholds["tight"]).mean() + 0.1
    # no out-of-scope prompt is nearest to "diffuse": its threshold is its in-scope floor, not "anything goes"
    assert thresholds["diffuse"] == pytest.approx(router._floor(router._loo(1)[0])) and thresholds["diffuse"] > 0


def test_embedding_centre_comes_only_with_out_of_scope_data() -> None:
    data = Synthetic(seed=13)
    x = data.sample(0, 40)
    router = EmbeddingRouter()
    router.observe("a", [f"a{i}" for i in range(40)], x)
    # never fitted: the first route calibrates in-scope only, in raw cosine (a centre made of the adapter's own
    # prompts would make a prompt at the adapter's centre look like nothing)
    middle = _unit(x.mean(axis=0, keepdims=True))[0]
    assert router.resolve(RouteRequest("typical", embedding=middle)).adapter == "a"
    assert router.fitted and router.calibration == "in_scope_floor" and router.center is None
    out = data.sample(3, 40)
    router.fit(out)
    center = router.center
    assert center is not None and np.allclose(center, np.concatenate([x, out]).mean(axis=0), atol=1e-6)
    router.fit()  # recalibrating without out-of-scope data keeps the centre
    assert router.center is center and router.calibration == "in_scope_floor"
    assert router.resolve(RouteRequest("typical", embedding=middle)).adapter == "a"
    assert EmbeddingRouter(center=False).center is None
    plain = EmbeddingRouter(center=False)
    plain.observe("a", [f"a{i}" for i in range(40)], x)
    plain.fit(data.sample(3, 40))
    assert plain.center is None


def test_embedding_prototypes_stay_bounded_and_cover_everything_learned() -> None:
    data = Synthetic(seed=6, spread=0.2)
    router = EmbeddingRouter(max_prototypes=6)
    for k in range(3):  # three sub-topics learned one after the other
        router.observe("a", [f"t{k}-{i}" for i in range(30)], data.sample(k, 30))
    kept = router.prototypes["a"]
    assert kept.shape == (6, DIM)
    nearest_topic = np.argmax(kept @ _unit(data.centers[:3] + 2.0 * data.common).T, axis=1)
    assert set(nearest_topic.tolist()) == {0, 1, 2}  # the first topic was not dropped for the most recent
    router.fit(data.sample(4, 50))
    first_topic = [r.adapter for r in router.route([RouteRequest("x", embedding=v) for v in data.sample(0, 20)])]
    assert first_topic.count("a") >= 19
    router.remove_adapter("a")
    assert "a" not in router.prototypes and "prototypes" not in router.state_dict()[0]


def test_farthest_point_subset_is_deterministic_and_keeps_outliers() -> None:
    data = Synthetic(seed=7, spread=0.1)
    vectors = np.concatenate([data.sample(0, 20), data.sample(1, 1)])  # one outlier at index 20
    chosen = farthest_point_subset(vectors, 3)
    assert 20 in chosen.tolist() and list(chosen) == sorted(chosen)
    assert np.array_equal(chosen, farthest_point_subset(vectors, 3))
    assert np.array_equal(farthest_point_subset(vectors, 50), np.arange(21))


def test_embedding_top_k_scores_are_means_of_the_nearest() -> None:
    router = EmbeddingRouter(top_k=2, threshold=0.0)
    basis = np.eye(4, dtype=np.float32)
    router.observe("a", ["x", "y", "z"], np.stack([basis[0], basis[1], basis[2]]))
    query = _unit(np.array([[1.0, 0.5, 0.0, 0.0]]))
    score = router.scores(query)[0][0, 0]
    assert score == pytest.approx((query[0, 0] + query[0, 1]) / 2, abs=1e-6)


def test_embedding_options_are_checked() -> None:
    for bad in ({"max_prototypes": 0}, {"top_k": 1.5}, {"target_rejection": 2.0}, {"novelty_slack": 0.5},
                {"threshold": 3.0}, {"center": "yes"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            EmbeddingRouter(**bad)
    with pytest.raises(InvalidInputError, match="embedder_identity"):
        EmbeddingRouter(embedder_identity="model-x")


def test_damaged_router_state_is_refused(tmp_path: Path) -> None:
    router, _ = _fitted("embedding")
    saved = save_router(router, tmp_path / "r")
    meta = json.loads((saved / "router.json").read_text())
    meta["state"]["prototype_counts"][0] += 1
    (saved / "router.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="inconsistent"):
        load_router(saved)


# --- learned router --------------------------------------------------------------------------------------------
def test_learned_router_learns_a_separable_problem_and_its_base_class() -> None:
    data = Synthetic(seed=8)
    router = LearnedRouter()
    train = [data.sample(k, 30) for k in range(len(ADAPTERS))]
    out = data.sample(3, 60)
    for adapter, x in zip(ADAPTERS, train, strict=True):
        router.observe(adapter, [f"{adapter}{i}" for i in range(30)], x)
    stats = router.fit(out)
    assert stats["train_accuracy"] == 1.0 and stats["n_examples"] == 150 and stats["n_out"] == 60
    assert router.classes == [None, *ADAPTERS]
    for k, adapter in enumerate(ADAPTERS):
        routes = router.route([RouteRequest("x", embedding=v) for v in data.sample(k, 30)])
        assert sum(r.adapter == adapter for r in routes) >= 29
        assert all(0.0 <= r.score <= 1.0 for r in routes)
    routes = router.route([RouteRequest("x", embedding=v) for v in data.sample(3, 30)])
    assert sum(r.is_base for r in routes) >= 29
    # deterministic: the same evidence gives the same weights
    again = LearnedRouter()
    for adapter, x in zip(ADAPTERS, train, strict=True):
        again.observe(adapter, [f"{adapter}{i}" for i in range(30)], x)
    again.fit(out)
    assert np.array_equal(again.weights, router.weights) and again.novelty_thresholds == router.novelty_thresholds
    # and prompts of a cluster no fit has seen are caught by the novelty gate, not sent to an adapter
    unseen = router.route([RouteRequest("x", embedding=v) for v in data.sample(4, 30)])
    assert sum(r.is_base for r in unseen) >= 29 and any("unlike" in r.reason for r in unseen)
    ungated = LearnedRouter(novelty_slack=None)
    for adapter, x in zip(ADAPTERS, train, strict=True):
        ungated.observe(adapter, [f"{adapter}{i}" for i in range(30)], x)
    ungated.fit(out)
    leaked = ungated.route([RouteRequest("x", embedding=v) for v in data.sample(4, 30)])
    assert sum(not r.is_base for r in leaked) > 0  # what the gate is for


def test_learned_router_warm_starts_and_learns_a_new_adapter_online() -> None:
    data = Synthetic(seed=9)
    router = LearnedRouter(epochs=100)
    router.observe("maths", [f"m{i}" for i in range(30)], data.sample(0, 30))
    router.fit(data.sample(3, 40))
    before = router.route([RouteRequest("x", embedding=v) for v in data.sample(0, 10)])
    router.observe("poems", [f"p{i}" for i in range(30)], data.sample(1, 30))
    routes_before_refit = router.route([RouteRequest("x", embedding=v) for v in data.sample(1, 10)])
    assert "poems" not in [r.adapter for r in routes_before_refit]  # not a class until the next fit
    router.fit()  # the out-of-scope set of the last fit is kept
    assert router.stats["n_out"] == 40
    assert all(r.adapter == "poems" for r in router.route([RouteRequest("x", embedding=v)
                                                            for v in data.sample(1, 10)]))
    assert [r.adapter for r in before] == ["maths"] * 10
    assert all(r.adapter == "maths" for r in router.route([RouteRequest("x", embedding=v)
                                                            for v in data.sample(0, 10)]))


def test_learned_warm_start_preserves_the_function_under_new_standardisation() -> None:
    data = Synthetic(seed=10)
    router = LearnedRouter(epochs=50)
    router.observe("maths", [f"m{i}" for i in range(20)], data.sample(0, 20))
    router.fit(data.sample(3, 20))
    probe = data.sample(0, 5).astype(np.float64)
    old = router._probabilities(probe)
    x = np.concatenate([router.examples["maths"], data.sample(0, 30)]).astype(np.float64)
    weights, bias = router._warm_start(router.classes, x.mean(0), np.maximum(x.std(0), 1e-6), DIM)
    new_logits = ((probe - x.mean(0)) / np.maximum(x.std(0), 1e-6)) @ weights + bias
    new = np.exp(new_logits - new_logits.max(1, keepdims=True))
    assert np.allclose(new / new.sum(1, keepdims=True), old, atol=1e-9)


def test_learned_router_relabels_prompts_by_loss_feedback() -> None:
    data = Synthetic(seed=11)
    router = LearnedRouter()
    for k, adapter in enumerate(ADAPTERS):
        router.observe(adapter, [f"{adapter}{i}" for i in range(30)], data.sample(k, 30))
    router.fit(data.sample(3, 40))
    # the "code" prompts turn out to be answered best by "maths", a fourth-cluster group best by the base
    code_prompts, code_x = router.example_prompts["code"], router.examples["code"]
    n = len(code_prompts)
    labels = router.observe_losses(code_prompts, code_x, {"maths": [0.5] * n, "code": [1.5] * n},
                                   base_losses=[2.0] * n)
    assert labels == ["maths"] * n and "code" not in router.examples  # moved, not duplicated
    held = data.sample(4, 20)
    labels = router.observe_losses([f"h{i}" for i in range(20)], held, {"maths": [1.0] * 20},
                                   base_losses=[0.95] * 20, margin=0.0)
    assert labels == [None] * 20
    router.fit()
    assert all(r.adapter == "maths" for r in router.route([RouteRequest("x", embedding=v) for v in code_x]))
    assert sum(r.is_base for r in router.route([RouteRequest("x", embedding=v) for v in data.sample(4, 20)])) >= 19
    with pytest.raises(InvalidInputError, match="unknown adapter"):
        router.observe_losses(["q"], held[:1], {"translation": [1.0]})
    with pytest.raises(InvalidInputError, match="1 finite numbers"):
        router.observe_losses(["q"], held[:1], {"maths": [float("nan")]})
    with pytest.raises(InvalidInputError, match="base_losses must be 1 finite"):
        router.observe_losses(["q"], held[:1], {"maths": [1.0]}, base_losses=["low"])
    # without base losses the lowest adapter loss decides (ties: the first adapter named)
    assert router.observe_losses(["q1", "q2"], held[:2], {"poems": [2.0, 1.0], "maths": [1.0, 1.0]}) == \
        ["maths", "poems"]


def test_learned_router_options_are_checked() -> None:
    for bad in ({"min_probability": 1.5}, {"epochs": 0}, {"learning_rate": -1.0}, {"l2": float("nan")},
                {"balanced": "yes"}, {"max_examples": -3}, {"learning_rate": "fast"}, {"novelty_slack": 0.5}):
        with pytest.raises(ConfigError):
            LearnedRouter(**bad)


def test_learned_min_probability_sends_uncertain_requests_to_the_base() -> None:
    data = Synthetic(seed=12, spread=1.5)  # heavily overlapping adapters: probabilities stay low between them
    strict = LearnedRouter(min_probability=0.999)
    for k, adapter in enumerate(ADAPTERS[:2]):
        strict.observe(adapter, [f"{adapter}{i}" for i in range(40)], data.sample(k, 40))
    strict.fit()
    mid = _unit(0.5 * (data.sample(0, 10) + data.sample(1, 10)))
    routes = strict.route([RouteRequest("x", embedding=v) for v in mid])
    assert all(r.is_base and "min_probability" in r.reason for r in routes)


# --- real embeddings and embedder identity -------------------------------------------------------------------------
# A random model carries no meaning, only token identity: the two "topics" are two prompt templates, which its
# hidden states do tell apart (measured: within a template cosine ≥ 0.87, across ≤ 0.76, unrelated ≤ 0.85).
TOPICS = {
    "capitals": [f"What is the capital of {c}?" for c in
                 ("France", "Japan", "Peru", "Spain", "Egypt", "Chile", "Norway", "Italy")],
    "counting": [f"Numbers: {a} {b} {c} {d}" for a, b, c, d in
                 ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 100), (3, 2, 1, 0), (7, 7, 8, 8), (1, 10, 100, 0),
                  (5, 4, 3, 2), (9, 0, 9, 0))],
}
UNRELATED = ["The quick brown fox jumps over the lazy dog.", "Hello world, how are you today?",
             "Colors: red green blue yellow.", "A correction: the answer was wrong.",
             "How are you? Hello there, world.", "The lazy dog sleeps and the brown fox jumps."]


def test_embedding_router_end_to_end_with_the_base_embedder(tiny_model_dir: Path, tmp_path: Path) -> None:
    from cl_core.bank.embedder import BaseEmbedder

    embedder = BaseEmbedder(str(tiny_model_dir))
    router = EmbeddingRouter(embedder_identity=embedder.identity)
    for adapter, prompts in TOPICS.items():
        router.observe(adapter, prompts[:6], embedder.embed(prompts[:6]))
    stats = router.fit(embedder.embed(UNRELATED[:4]))
    assert stats["out_of_scope_rejection"] == 1.0 and stats["n_in"] == 12 and stats["n_out"] == 4
    held = [(p, adapter) for adapter, prompts in TOPICS.items() for p in prompts[6:]]
    held += [(p, None) for p in UNRELATED[4:]]
    vectors = embedder.embed([p for p, _ in held])
    routes = router.route([RouteRequest(p, embedding=v) for (p, _), v in zip(held, vectors, strict=True)])
    correct = sum(r.adapter == want for r, (_, want) in zip(routes, held, strict=True))
    assert correct == len(held), [(r.adapter, w, round(r.score, 4)) for r, (_, w) in zip(routes, held,
                                                                                             strict=True)]
    # the identity travels with the state, and an embedder of another space (here: another layer of the same
    # model; another base model has another fingerprint) is refused
    loaded = load_router(save_router(router, tmp_path / "r"))
    assert loaded.embedder_identity == embedder.identity.to_dict()
    loaded.check_embedder(embedder)
    other = BaseEmbedder(str(tiny_model_dir), layer=2)
    assert other.identity.dim == embedder.identity.dim  # same shapes: only the identity can tell them apart
    with pytest.raises(ConfigError, match="another space"):
        loaded.check_embedder(other)
    with pytest.raises(ConfigError, match="cannot switch"):
        loaded.set_embedder_identity(other.identity)
    # a learned router records it the same way
    learned = LearnedRouter()
    learned.set_embedder_identity(embedder.identity)
    learned.observe("capitals", TOPICS["capitals"], embedder.embed(TOPICS["capitals"]))
    with pytest.raises(ConfigError, match="another space"):
        load_router(save_router(learned, tmp_path / "l")).check_embedder(other)
    with pytest.raises(InvalidInputError, match="dimension 128"):
        learned.observe("capitals", ["x"], np.ones((1, 64), dtype=np.float32))
