"""Replay strategies: one contract suite run on every registered strategy, then one behaviour test per strategy
that fails if its rule is wrong (reservoir uniformity, top-loss priority, herding balance and fidelity, GSS
diversity). Synthetic stream of 4 tasks; vectors come from a fake FeatureSource with a fixed table per id."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cl_core.errors import CheckpointError, InvalidInputError
from cl_core.replay import (
    Candidate,
    FeatureSource,
    HerdingReplay,
    PriorityReplay,
    ReplayStrategy,
    available_replay_strategies,
    load_replay_strategy,
    make_replay_strategy,
)
from cl_core.replay.herding import herding_order

TASKS = ("t0", "t1", "t2", "t3")
STRATEGIES = available_replay_strategies()


class FakeFeatures:
    """Fixed vectors per id. Embeddings: a task centre plus anisotropic noise. Gradients: most items are noisy
    copies of a few 'hot' directions (near-duplicates), the rest point anywhere."""

    def __init__(self, n: int, task_of: Sequence[int], *, emb_dim: int = 16, grad_dim: int = 32, hot: int = 3,
                 hot_share: float = 0.85, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        centres = 2.0 * torch.randn(len(TASKS), emb_dim, generator=g)
        scale = torch.linspace(0.2, 1.5, emb_dim)
        self.emb = centres[torch.tensor(task_of)] + scale * torch.randn(n, emb_dim, generator=g)
        directions = F.normalize(torch.randn(hot, grad_dim, generator=g), dim=1)
        is_hot = torch.rand(n, generator=g) < hot_share
        which = torch.randint(hot, (n,), generator=g)
        noisy_copies = directions[which] + 0.05 * torch.randn(n, grad_dim, generator=g)
        self.grad = torch.where(is_hot[:, None], noisy_copies, torch.randn(n, grad_dim, generator=g))
        self.calls: list[tuple[str, list[int]]] = []

    def embeddings(self, ids: Sequence[int]) -> torch.Tensor:
        self.calls.append(("embeddings", list(ids)))
        return self.emb[list(ids)]

    def gradients(self, ids: Sequence[int]) -> torch.Tensor:
        self.calls.append(("gradients", list(ids)))
        return self.grad[list(ids)]


def make_stream(per_task: int = 60, seed: int = 0) -> tuple[list[Candidate], FakeFeatures]:
    """Tasks one after another (t0's items, then t1's, ...), each item with a random loss."""
    rng = np.random.default_rng(seed)
    task_of = [k for k in range(len(TASKS)) for _ in range(per_task)]
    stream = [Candidate(i, TASKS[k], float(rng.exponential())) for i, k in enumerate(task_of)]
    return stream, FakeFeatures(len(stream), task_of, seed=seed)


def batches(stream: Sequence[Candidate], seed: int = 0) -> list[list[Candidate]]:
    """Chunks of 1..9 items: strategies must not depend on how the stream is cut."""
    rng = np.random.default_rng(seed)
    out, start = [], 0
    while start < len(stream):
        size = int(rng.integers(1, 10))
        out.append(list(stream[start:start + size]))
        start += size
    return out


def feed(strategy: ReplayStrategy, chunks: Sequence[Sequence[Candidate]], features: FeatureSource) -> list[list[int]]:
    return [strategy.observe(chunk, features) for chunk in chunks]


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    unit = F.normalize(vectors, dim=1)
    sims = unit @ unit.T
    n = unit.shape[0]
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


# -- the contract every strategy honours -------------------------------------------------------------------------


@pytest.mark.parametrize("name", STRATEGIES)
def test_memory_is_bounded_and_observe_returns_exactly_what_left(name: str) -> None:
    stream, features = make_stream()
    strategy = make_replay_strategy(name, capacity=24, seed=1)
    seen: set[int] = set()
    for chunk in batches(stream):
        before = strategy.memory
        # re-offer an id already in memory and repeat one inside the batch: neither may be counted twice
        offered = [*chunk, chunk[0], *(Candidate(before[0], "t0", 0.5) for _ in before[:1])]
        left = strategy.observe(offered, features)
        after = strategy.memory
        seen.update(c.id for c in chunk)
        assert len(after) <= 24
        assert len(set(after)) == len(after)
        assert set(after) <= seen
        assert left == [i for i in before if i not in set(after)]
    assert len(strategy.memory) == 24  # 240 items offered: every strategy fills its memory


@pytest.mark.parametrize("name", STRATEGIES)
def test_select_returns_distinct_memory_ids_and_respects_exclude(name: str) -> None:
    stream, features = make_stream()
    strategy = make_replay_strategy(name, capacity=24, seed=2)
    feed(strategy, batches(stream), features)
    memory = strategy.memory
    exclude = set(memory[::2]) | {10_000}
    eligible = set(memory) - exclude
    for n in (0, 1, 5, 12, 50):
        picked = strategy.select(n, exclude=exclude)
        assert len(picked) == len(set(picked)) == min(n, len(eligible))
        assert set(picked) <= eligible
    assert sorted(strategy.select(100)) == sorted(memory)
    assert strategy.select(3, exclude=memory) == []
    assert strategy.memory == memory  # selecting does not change the memory
    with pytest.raises(InvalidInputError):
        strategy.select(-1)


@pytest.mark.parametrize("name", STRATEGIES)
def test_state_round_trip_restores_memory_and_future_choices(name: str, tmp_path: Path) -> None:
    stream, features = make_stream()
    chunks = batches(stream)
    original = make_replay_strategy(name, capacity=20, seed=3)
    feed(original, chunks[:20], features)
    original.select(5)  # advance the RNG: the restore must carry its exact position
    original.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replay.json", "replay.safetensors"]
    json.loads((tmp_path / "replay.json").read_text())  # plain JSON, no pickle anywhere

    into_fresh = make_replay_strategy(name, capacity=20, seed=99)
    into_fresh.load(tmp_path)
    rebuilt = load_replay_strategy(tmp_path)
    for copy in (into_fresh, rebuilt):
        assert type(copy) is type(original)
        assert copy.memory == original.memory
        tensors, meta = copy.state()
        ref_tensors, ref_meta = original.state()
        assert meta == ref_meta
        assert tensors.keys() == ref_tensors.keys()
        assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)

    for _ in range(3):
        expected = original.select(7)
        assert into_fresh.select(7) == rebuilt.select(7) == expected
    for chunk in chunks[20:]:
        left = original.observe(chunk, features)
        assert into_fresh.observe(chunk, features) == rebuilt.observe(chunk, features) == left
    assert into_fresh.memory == rebuilt.memory == original.memory
    assert into_fresh.select(9) == rebuilt.select(9) == original.select(9)


@pytest.mark.parametrize("name", STRATEGIES)
def test_an_empty_memory_saves_and_loads(name: str, tmp_path: Path) -> None:
    make_replay_strategy(name, capacity=5, seed=8).save(tmp_path)
    restored = load_replay_strategy(tmp_path)
    assert restored.memory == [] and restored.select(3) == []
    stream, features = make_stream(per_task=4)
    restored.observe(stream, features)
    assert len(restored.memory) == 5


@pytest.mark.parametrize("name", STRATEGIES)
def test_discard_forgets_evicted_ids(name: str) -> None:
    stream, features = make_stream()
    chunks = batches(stream)
    strategy = make_replay_strategy(name, capacity=16, seed=4)
    feed(strategy, chunks[:25], features)
    memory = strategy.memory
    gone = set(memory[1::3])
    strategy.discard(gone | {123_456})  # unknown ids are ignored
    assert strategy.memory == [i for i in memory if i not in gone]
    tensors, _ = strategy.state()
    if "vecs" in tensors:  # per-item vectors are kept only for items in memory
        assert tensors["vecs"].shape[0] == len(strategy.memory)
    for _ in range(10):
        assert not gone & set(strategy.select(16))
    feed(strategy, chunks[25:], features)
    assert len(strategy.memory) <= 16


@pytest.mark.parametrize("name", STRATEGIES)
def test_features_are_asked_only_when_needed(name: str) -> None:
    stream, features = make_stream(per_task=5)
    strategy = make_replay_strategy(name, capacity=8)
    if strategy.needs_features is None:
        strategy.observe(stream, None)
        strategy.observe(stream, features)
        assert features.calls == []
    else:
        with pytest.raises(InvalidInputError, match="needs a FeatureSource"):
            strategy.observe(stream, None)
        strategy.observe(stream, features)
        # one call per observe, only for the new ids
        assert features.calls == [(strategy.needs_features, [c.id for c in stream])]


@pytest.mark.parametrize("name", STRATEGIES)
def test_bad_arguments_are_refused(name: str, tmp_path: Path) -> None:
    strategy = make_replay_strategy(name, capacity=4)
    with pytest.raises(InvalidInputError, match="one loss per id"):
        strategy.update([1, 2], [0.5])
    with pytest.raises(InvalidInputError):
        strategy.update([1], [float("nan")])
    strategy.update([424242], [1.0])  # ids not in memory are ignored
    with pytest.raises(InvalidInputError):
        strategy.observe([(1, "t0")])  # type: ignore[list-item]
    other = "random" if name != "random" else "priority"
    make_replay_strategy(other, capacity=4).save(tmp_path)
    with pytest.raises(CheckpointError, match="strategy"):
        strategy.load(tmp_path)
    with pytest.raises(CheckpointError, match="capacity"):
        make_replay_strategy(other, capacity=5).load(tmp_path)
    with pytest.raises(CheckpointError, match="no replay state"):
        strategy.load(tmp_path / "missing")


def test_registry_and_construction_errors() -> None:
    assert STRATEGIES == ["gradient", "herding", "priority", "random"]
    with pytest.raises(InvalidInputError, match="gradient, herding, priority, random"):
        make_replay_strategy("fifo", capacity=4)
    for capacity in (0, -3, 2.5, "8", True, None):
        with pytest.raises(InvalidInputError, match="capacity"):
            make_replay_strategy("random", capacity=capacity)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="alpha, eps"):
        make_replay_strategy("priority", capacity=4, temperature=2.0)
    with pytest.raises(InvalidInputError, match="alpha"):
        make_replay_strategy("priority", capacity=4, alpha=-1)
    with pytest.raises(InvalidInputError, match="n_compare"):
        make_replay_strategy("gradient", capacity=4, n_compare=0)
    for bad in ({"id": "7", "task": "t0"}, {"id": 7, "task": ""}, {"id": 7, "task": "t0", "loss": -1.0},
                {"id": 7, "task": "t0", "loss": float("inf")}):
        with pytest.raises(InvalidInputError):
            Candidate(**bad)


def test_feature_vectors_of_the_wrong_shape_are_refused() -> None:
    stream, features = make_stream(per_task=3)
    herding = make_replay_strategy("herding", capacity=8)
    herding.observe(stream[:3], features)

    class Wider(FakeFeatures):
        def embeddings(self, ids: Sequence[int]) -> torch.Tensor:
            return torch.zeros(len(ids), 17)

    with pytest.raises(InvalidInputError, match="dimension 17"):
        herding.observe(stream[3:6], Wider(len(stream), [0] * len(stream)))

    class Short(FakeFeatures):
        def gradients(self, ids: Sequence[int]) -> torch.Tensor:
            return torch.zeros(len(ids) - 1, 32)

    with pytest.raises(InvalidInputError, match="shape"):
        make_replay_strategy("gradient", capacity=8).observe(stream[:3], Short(len(stream), [0] * len(stream)))


# -- behaviour: each strategy does what it claims --------------------------------------------------------------


def test_reservoir_keeps_a_uniform_share_of_a_long_stream() -> None:
    parts, per_part, capacity = 4, 2500, 200
    stream = [Candidate(i, TASKS[i // per_part]) for i in range(parts * per_part)]
    shares = []
    for seed in range(3):
        strategy = make_replay_strategy("random", capacity=capacity, seed=seed)
        for start in range(0, len(stream), 50):
            strategy.observe(stream[start:start + 50])
        assert strategy.seen == len(stream)
        counts = Counter(i // per_part for i in strategy.memory)
        shares.append([counts[p] for p in range(parts)])
    # expected 50 per part (std ≈ 6); a FIFO or recency-biased memory would put nearly all 200 in the last part
    for share in shares:
        assert all(30 <= c <= 70 for c in share), share
    assert all(abs(np.mean([s[p] for s in shares]) - 50) <= 12 for p in range(parts)), shares


def test_priority_keeps_high_losses_picks_them_more_and_update_changes_that() -> None:
    rng = np.random.default_rng(0)
    losses = list(rng.uniform(0.0, 0.4, size=80)) + list(np.linspace(0.5, 10.0, 20))
    order = rng.permutation(100)
    stream = [Candidate(int(i), TASKS[int(i) % 4], float(losses[i])) for i in order]
    strategy = make_replay_strategy("priority", capacity=20, seed=0)
    assert isinstance(strategy, PriorityReplay)
    for start in range(0, 100, 7):
        strategy.observe(stream[start:start + 7])
    assert sorted(strategy.memory) == list(range(80, 100))  # exactly the 20 highest losses

    top, low = 99, 80  # loss 10.0 and 0.5
    counts = Counter(itertools.chain.from_iterable(strategy.select(1) for _ in range(3000)))
    assert counts[top] > 3 * counts[low], counts

    strategy.update([top], [0.0])  # replay showed it is learned now
    assert strategy.loss_of(top) == 0.0
    counts = Counter(itertools.chain.from_iterable(strategy.select(1) for _ in range(3000)))
    assert counts[top] < counts[low] / 3, counts
    assert strategy.observe([Candidate(500, "t0", 1.0)]) == [top]  # the stale-now-low item is evicted first
    assert strategy.observe([Candidate(501, "t0", 0.1)]) == []  # below every kept loss: not admitted
    # no loss yet: PER's rule, assume the largest known loss so it is replayed before its real loss is known
    assert strategy.observe([Candidate(502, "t1")]) == [low]
    assert strategy.loss_of(502) == 9.5  # the largest loss in memory now (id 98), since 99 was reset


def test_herding_balances_tasks_and_its_exemplars_summarise_each_task() -> None:
    per_task, capacity = 100, 40
    stream, features = make_stream(per_task=per_task, seed=5)
    strategy = make_replay_strategy("herding", capacity=capacity, seed=0)
    assert isinstance(strategy, HerdingReplay)
    task0 = stream[:per_task]
    for start in range(0, per_task, 10):
        strategy.observe(task0[start:start + 10], features)
    order0 = strategy.memory_by_task()["t0"]
    assert len(order0) == capacity

    task1 = stream[per_task:2 * per_task]
    strategy.observe(task1[:10], features)  # a new task with 10 items: t0 gives up its last 10 exemplars
    by_task = strategy.memory_by_task()
    assert by_task["t0"] == order0[:30]
    assert len(by_task["t1"]) == 10
    for start in range(10, per_task, 10):
        strategy.observe(task1[start:start + 10], features)
    assert strategy.memory_by_task()["t0"] == order0[:20]  # re-balancing cuts from the end of the herding order
    for start in range(2 * per_task, len(stream), 10):
        strategy.observe(stream[start:start + 10], features)

    by_task = strategy.memory_by_task()
    assert {t: len(ids) for t, ids in by_task.items()} == {t: 10 for t in TASKS}
    picks = Counter(stream[i].task for i in strategy.select(20))
    assert picks == {t: 5 for t in TASKS}  # balanced picks

    rng = np.random.default_rng(0)
    for k, task in enumerate(TASKS):
        vecs = F.normalize(features.emb[k * per_task:(k + 1) * per_task], dim=1).double()
        mean = vecs.mean(dim=0)
        assert torch.allclose(strategy.task_mean(task), mean)
        kept = F.normalize(features.emb[by_task[task]], dim=1).double()
        herded = float(torch.linalg.norm(kept.mean(dim=0) - mean))
        random_subsets = [float(torch.linalg.norm(vecs[rng.choice(per_task, 10, replace=False)].mean(dim=0) - mean))
                          for _ in range(500)]
        # 10 herded exemplars (chosen online, from memory + each new batch) beat nearly every random subset of 10;
        # over 10 stream seeds the worst case was the 0.2th percentile and 0.51 x the median
        assert herded < np.percentile(random_subsets, 5), (task, herded, np.percentile(random_subsets, [5, 50]))
        assert herded < 0.7 * np.median(random_subsets)


def test_herding_order_is_the_textbook_greedy() -> None:
    """The incremental form in `herding_order` must choose what the literal iCaRL loop chooses."""
    g = torch.Generator().manual_seed(7)
    vectors = F.normalize(torch.randn(60, 12, generator=g), dim=1).double()
    target = vectors[:25].mean(dim=0)
    expected, running, free = [], torch.zeros(12, dtype=torch.float64), torch.ones(60, dtype=torch.bool)
    for t in range(1, 41):
        dist = ((target - (running + vectors) / t) ** 2).sum(dim=1).masked_fill(~free, torch.inf)
        i = int(torch.argmin(dist))
        expected.append(i)
        free[i] = False
        running += vectors[i]
    assert herding_order(vectors, target, 40) == expected
    assert herding_order(vectors, target, 100) == herding_order(vectors, target, 60)  # k is capped at n rows


def test_gradient_keeps_more_diverse_gradients_than_reservoir() -> None:
    stream, features = make_stream(per_task=100, seed=6)  # 85% near-duplicates of 3 gradient directions
    chunks = batches(stream, seed=6)
    diversity = {}
    for name in ("gradient", "random"):
        values = []
        for seed in range(3):
            strategy = make_replay_strategy(name, capacity=40, seed=seed)
            feed(strategy, chunks, features)
            values.append(mean_pairwise_cosine(features.grad[strategy.memory]))
        diversity[name] = values
    assert max(diversity["gradient"]) < 0.5 * min(diversity["random"]), diversity
    gss = make_replay_strategy("gradient", capacity=40, seed=0)
    feed(gss, chunks, features)
    hot = F.normalize(features.grad[gss.memory], dim=1)
    near_duplicate_pairs = int(((hot @ hot.T) > 0.95).sum() - len(gss.memory)) // 2
    assert near_duplicate_pairs < 40, near_duplicate_pairs
