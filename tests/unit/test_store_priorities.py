"""Priority functions, the sum-tree and proportional sampling: distributions are checked statistically with fixed
seeds and tolerances of ~5 standard deviations, so a wrong sampler fails and a right one passes every time."""

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from cl_core import InvalidInputError
from cl_core.store import ExperienceStore, Recency, get_priority_function, priority_names, uncertainty
from cl_core.store.priorities import EPSILON
from cl_core.store.sumtree import SumTree


def _store(tmp_path, name="p.sqlite", **kwargs):
    kwargs.setdefault("seed", 0)
    return ExperienceStore(tmp_path / name, **kwargs)


def _learned(store, rewards):
    ids = store.add_many([dict(prompt=f"q{i}", response=f"a{i}", reward=r) for i, r in enumerate(rewards)])
    store.mark_learned(ids)
    return ids


# --- the registry and the weight functions ----------------------------------------------------------------------
def test_registry_knows_the_four_functions_and_rejects_others(tmp_path):
    assert set(priority_names()) >= {"loss", "uncertainty", "recency", "reward"}
    with pytest.raises(InvalidInputError) as err:
        get_priority_function("surprise")
    assert all(name in str(err.value) for name in ("loss", "uncertainty", "recency", "reward"))
    with pytest.raises(InvalidInputError, match="known: .*reward"):
        ExperienceStore(tmp_path / "x.sqlite", priority_function="surprise")


@pytest.mark.parametrize("name", ["loss", "uncertainty", "recency", "reward"])
def test_weights_are_non_negative_and_non_decreasing(name):
    fn = get_priority_function(name)
    raw = np.sort(np.concatenate([np.linspace(-5, 5, 101), [0.0, 1e6]]))
    anchor = fn.anchor(raw) if fn.anchored else 0.0
    weights = fn.weights(raw, anchor)
    assert np.all(weights >= 0) and np.all(np.diff(weights) >= 0) and np.all(np.isfinite(weights))


def test_reward_weight_clamps_negative_ratings_and_treats_unrated_as_neutral(tmp_path):
    fn = get_priority_function("reward")
    assert fn.weights(np.array([-3.0, 0.0, 2.0])).tolist() == [EPSILON, EPSILON, 2.0 + EPSILON]
    store = _store(tmp_path)
    assert store.get(store.add("q", "a")).priority == 1.0
    assert store.get(store.add("q", "a", reward=-2.0)).priority == -2.0  # raw kept; the weight clamps
    store.close()


def test_uncertainty_is_mean_surprisal_or_mean_top_k_entropy():
    assert uncertainty([-0.1, -0.3]) == pytest.approx(0.2)
    uniform4 = {1: math.log(0.25), 2: math.log(0.25), 3: math.log(0.25), 4: math.log(0.25)}
    certain = [0.0, -math.inf]
    assert uncertainty(top_logprobs=[uniform4, certain]) == pytest.approx(math.log(4) / 2)

    class Logprob:  # the shape of vLLM's per-token logprob objects
        def __init__(self, logprob):
            self.logprob = logprob

    assert uncertainty(top_logprobs=[{7: Logprob(math.log(0.5)), 9: Logprob(math.log(0.5))}]) == \
        pytest.approx(math.log(2))
    # top-k entries that do not sum to 1 are renormalized: two equal logprobs are a fair coin
    assert uncertainty(top_logprobs=[[-3.0, -3.0]]) == pytest.approx(math.log(2))


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(token_logprobs=[]), "token_logprobs"), (dict(token_logprobs=[0.5]), "token_logprobs[0]"),
    (dict(token_logprobs=[-0.1, math.nan]), "token_logprobs[1]"), (dict(token_logprobs="abc"), "token_logprobs"),
    (dict(top_logprobs=[]), "top_logprobs"), (dict(top_logprobs=[[-math.inf]]), "top_logprobs[0]"),
    (dict(), "token_logprobs"),
])
def test_uncertainty_rejects_bad_logprobs_naming_the_field(kwargs, field):
    with pytest.raises(InvalidInputError, match=field.replace("[", r"\[").replace("]", r"\]")):
        uncertainty(**kwargs)


def test_uncertainty_priority_comes_from_token_logprobs(tmp_path):
    store = _store(tmp_path, priority_function="uncertainty")
    sure = store.add("q", "a", token_logprobs=[-0.01, -0.03])
    unsure = store.add("q", "b", top_logprobs=[[-0.7, -0.7]])
    unmeasured = store.add("q", "c")
    assert store.get(sure).priority == pytest.approx(0.02)
    assert store.get(unsure).priority == pytest.approx(math.log(2))
    assert store.get(unmeasured).priority == pytest.approx(math.log(2))  # as high as the highest measured
    with pytest.raises(InvalidInputError, match=r"token_logprobs\[0\]"):
        store.add("q", "d", token_logprobs=[1.5])
    store.close()


# --- updating priorities ----------------------------------------------------------------------------------------
def test_loss_priorities_start_at_the_highest_known_and_follow_each_learning_step(tmp_path):
    store = _store(tmp_path, priority_function="loss")
    a, b, c = store.add_many([dict(prompt=f"q{i}", response="a") for i in range(3)])
    assert [store.get(i).priority for i in (a, b, c)] == [1.0, 1.0, 1.0]  # nothing measured yet
    store.mark_learned([a, b, c], [0.2, 3.0, None])
    assert [store.get(i).priority for i in (a, b, c)] == [0.2, 3.0, 1.0]
    assert store.get(c).last_loss is None and store.get(a).last_loss == 0.2
    assert store.get(store.add("new", "x")).priority == 3.0
    assert [e.id for e in store.sample(3, "top")] == [b, c, a]
    store.mark_learned([b], [0.01])  # the next step: b became easy
    assert [e.id for e in store.sample(3, "top")] == [c, a, b]
    assert store.update_priorities([a, c, 10_000], [5.0, 0.5, 1.0]) == 2  # an evicted/unknown id is skipped
    assert [e.id for e in store.sample(3, "top")] == [a, c, b]
    store.set_priority(b, 9.0)
    assert store.sample(1, "top")[0].id == b
    assert store.check_integrity() == []
    store.close()


def test_reward_priorities_are_not_overwritten_by_losses(tmp_path):
    store = _store(tmp_path)
    exp = store.add("q", "a", reward=2.0)
    store.mark_learned([exp], [7.5])
    assert store.get(exp).priority == 2.0 and store.get(exp).last_loss == 7.5
    store.close()


@pytest.mark.parametrize(("ids", "values", "field"), [
    ([1], [math.nan], r"values\[0\]"), ([1, 2], [1.0], "values has 1"), ([True], [1.0], r"ids\[0\]"),
    ("12", [1.0, 2.0], "ids must be a list"), ([1], [False], r"values\[0\]"),
])
def test_update_priorities_rejects_bad_input(tmp_path, ids, values, field):
    store = _store(tmp_path)
    store.add("q", "a")
    with pytest.raises(InvalidInputError, match=field):
        store.update_priorities(ids, values)
    store.close()


def test_recency_prefers_the_newest_and_evicts_fifo(tmp_path):
    store = _store(tmp_path, priority_function="recency", buffer_size=10, recent_size=3)
    ids = [store.add(f"q{i}", "a", reward=float(30 - i)) for i in range(25)]
    assert [e.id for e in store.pending()] == ids[-10:]  # FIFO whatever the rewards
    ids += store.add_many([dict(prompt=f"b{i}", response="a") for i in range(4)])
    assert [e.id for e in store.pending()] == ids[-10:]
    store.close()


def test_recency_reanchors_instead_of_overflowing(tmp_path, monkeypatch):
    clock = itertools.count(1_000_000.0, 1000.0)  # 1000 half-lives between adds: weights would overflow at once
    monkeypatch.setattr("cl_core.store.sqlite_store.time.time", lambda: next(clock))
    store = _store(tmp_path, priority_function=Recency(half_life_s=1.0), buffer_size=50)
    ids = [store.add(f"q{i}", "a") for i in range(6)]
    store.mark_learned(ids)
    assert np.isfinite(store._state.tree.totals).all()
    assert {store.sample(1, "priority")[0].id for _ in range(20)} == {ids[-1]}
    assert store.check_integrity() == []
    store.close()


# --- proportional sampling --------------------------------------------------------------------------------------
def test_priority_sampling_is_proportional_to_weight(tmp_path):
    store = _store(tmp_path)
    ids = _learned(store, [1.0, 2.0, 3.0, 4.0])
    draws = 4000
    counts = Counter(store.sample(1, "priority")[0].id for _ in range(draws))
    for exp_id, weight in zip(ids, [1, 2, 3, 4], strict=True):
        p = weight / 10
        assert abs(counts[exp_id] / draws - p) < 5 * math.sqrt(p * (1 - p) / draws)
    store.close()


@pytest.mark.parametrize(("alpha", "expected"), [(0.0, [1 / 3] * 3), (2.0, [1 / 14, 4 / 14, 9 / 14])])
def test_alpha_flattens_or_sharpens_the_distribution(tmp_path, alpha, expected):
    store = _store(tmp_path, alpha=alpha)
    ids = _learned(store, [1.0, 2.0, 3.0])
    draws = 3000
    counts = Counter(store.sample(1, "priority")[0].id for _ in range(draws))
    for exp_id, p in zip(ids, expected, strict=True):
        assert abs(counts[exp_id] / draws - p) < 5 * math.sqrt(p * (1 - p) / draws)
    store.close()


def test_priority_sampling_is_successive_sampling_without_replacement(tmp_path):
    store = _store(tmp_path)
    a, b, c = _learned(store, [8.0, 1.0, 1.0])
    draws = 3000
    pairs = Counter(frozenset(e.id for e in store.sample(2, "priority")) for _ in range(draws))
    # P({b, c}) = P(b then c) + P(c then b) = 2 * (1/10 * 1/9); drawing with replacement or by top-k differs.
    p_bc = 2 * (1 / 10) * (1 / 9)
    assert abs(pairs[frozenset({b, c})] / draws - p_bc) < 5 * math.sqrt(p_bc * (1 - p_bc) / draws)
    assert sum(pairs.values()) == draws and all(len(pair) == 2 for pair in pairs)
    every = store.sample(10, "priority")
    assert sorted(e.id for e in every) == [a, b, c]  # all of them, once, highest priority first
    assert every[0].id == a
    store.close()


def test_zero_weight_items_are_reachable_and_feedback_is_not_sampled_by_default(tmp_path):
    store = _store(tmp_path)
    zero = _learned(store, [0.0])  # reward 0: feedback-only, weight EPSILON
    assert store.sample(5, "priority") == []
    assert [e.id for e in store.sample(5, "priority", status="feedback_only")] == zero
    store.close()


@pytest.mark.parametrize("strategy", ["priority", "uniform", "top", "recent"])
def test_every_strategy_respects_status_and_exclude(tmp_path, strategy):
    store = _store(tmp_path)
    learned = _learned(store, [1.0, 2.0, 3.0, 4.0])
    pending = store.add_many([dict(prompt="p", response="a", reward=5.0), dict(prompt="p", response="b")])
    store.add("f", "a", reward=-1.0)
    assert {e.id for e in store.sample(10, strategy)} == set(learned)
    assert {e.id for e in store.sample(10, strategy, exclude=learned[:2])} == set(learned[2:])
    assert {e.id for e in store.sample(10, strategy, learned_only=False)} == set(learned + pending)
    assert {e.id for e in store.sample(10, strategy, status=["pending"])} == set(pending)
    assert len(store.sample(2, strategy)) == 2
    store.close()


def test_uniform_sampling_is_uniform_and_distinct(tmp_path):
    store = _store(tmp_path, buffer_size=200)
    ids = _learned(store, [float(i + 1) for i in range(40)])
    store.add_many([dict(prompt="p", response="a")] * 20)  # pending: must not be drawn
    draws = 1000
    counts = Counter()
    for _ in range(draws):
        batch = [e.id for e in store.sample(8, "uniform")]
        assert len(set(batch)) == 8 and set(batch) <= set(ids)
        counts.update(batch)
    p = 8 / 40
    assert all(abs(counts[i] / draws - p) < 5 * math.sqrt(p * (1 - p) / draws) for i in ids)
    store.close()


def test_top_breaks_ties_by_newest(tmp_path):
    store = _store(tmp_path)
    ids = _learned(store, [1.0, 2.0, 2.0, 2.0, 0.5])
    assert [e.id for e in store.sample(2, "top")] == [ids[3], ids[2]]
    store.close()


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(n=-1), "n must"), (dict(n=1.5), "n must"), (dict(n=2, strategy="random"), "strategy"),
    (dict(n=2, status="done"), "status"), (dict(n=2, exclude=[1.0]), r"exclude\[0\]"),
])
def test_sample_rejects_bad_arguments(tmp_path, kwargs, field):
    store = _store(tmp_path)
    with pytest.raises(InvalidInputError, match=field):
        store.sample(**kwargs)
    store.close()


# --- the sum-tree itself ----------------------------------------------------------------------------------------
def test_sumtree_find_matches_the_cumulative_sum_and_skips_empty_slots():
    rng = np.random.default_rng(1)
    tree = SumTree(1000, groups=2)
    weights = rng.random(tree.size) * (rng.random(tree.size) > 0.3)  # ~30% empty
    group = np.where(weights > 0, rng.integers(0, 2, tree.size), -1)
    tree.build(group, weights)
    for g in (0, 1):
        w = np.where(group == g, weights, 0.0)
        assert tree.totals[g] == pytest.approx(w.sum())
        u = rng.random(500) * w.sum()
        assert np.array_equal(tree.find(u, g), np.searchsorted(np.cumsum(w), u, side="right"))
    # incremental updates equal a rebuild
    slots = rng.choice(tree.size, 50, replace=False)
    new_group, new_weight = rng.integers(-1, 2, 50), rng.random(50)
    tree.set(slots, new_group, new_weight)
    group[slots], weights[slots] = new_group, np.where(new_group >= 0, new_weight, 0.0)
    rebuilt = SumTree(1000, groups=2)
    rebuilt.build(group, weights)
    assert np.allclose(tree.tree, rebuilt.tree, rtol=1e-12, atol=0)
    before = tree.tree.copy()
    drawn = tree.sample(200, [0, 1], rng, exclude=slots)
    assert len(set(drawn.tolist())) == 200 and not set(drawn.tolist()) & set(slots.tolist())
    assert np.all(group[drawn] >= 0)
    assert np.array_equal(tree.tree, before)  # hidden weights restored exactly


def test_sumtree_sample_returns_everything_when_asked_for_more():
    tree = SumTree(8, groups=1)
    tree.set(np.array([1, 4, 6]), np.array([0, 0, 0]), np.array([1e-6, 5.0, 1e6]))
    assert sorted(tree.sample(10, [0], np.random.default_rng(0)).tolist()) == [1, 4, 6]
    assert tree.sample(3, [0], np.random.default_rng(0), exclude=np.array([1, 4, 6])).tolist() == []
