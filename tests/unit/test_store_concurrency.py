"""Concurrency: threads sharing one store, several stores (connections, processes) sharing one file.

What must hold: no acknowledged write is lost (exact counts), SQLite stays intact, and every store's in-memory
sum-tree matches the database it samples from, including after other processes wrote, evicted and reused slots.
"""

import multiprocessing
import sqlite3
import threading

import pytest

from cl_core.store import ExperienceStore


def _run_threads(targets):
    errors = []

    def guard(fn, *args):
        try:
            fn(*args)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=guard, args=(fn, *args)) for fn, *args in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


@pytest.mark.parametrize("buffer_size", [10_000, 60])
def test_threads_adding_learning_and_sampling_at_once(tmp_path, buffer_size):
    store = ExperienceStore(tmp_path / "t.sqlite", buffer_size=buffer_size, recent_size=10,
                            priority_function="loss", seed=0)
    writers, per_writer = 4, 40
    sampled = []

    def writer(n):
        for i in range(0, per_writer, 4):
            if i % 8:
                store.add_many([dict(prompt=f"w{n}-{i + j}", response="a") for j in range(4)])
            else:
                for j in range(4):
                    store.add(f"w{n}-{i + j}", "a")

    def learner():
        for _ in range(30):
            batch = store.sample_mixed(6, 0.5)
            store.mark_learned([e.id for e in batch.new], [0.1 * (k + 1) for k in range(len(batch.new))])

    def sampler(strategy):
        for _ in range(40):
            for exp in store.sample(8, strategy, learned_only=False):
                assert exp.prompt.startswith("w") and exp.status in ("pending", "learned")
                sampled.append(exp.id)

    errors = _run_threads([(writer, n) for n in range(writers)] + [(learner,), (sampler, "priority"),
                                                                      (sampler, "uniform")])
    assert not errors, errors
    assert len(store) == min(writers * per_writer, buffer_size)
    rows = sqlite3.connect(store.path).execute("SELECT COUNT(*), COUNT(DISTINCT prompt) FROM experiences").fetchone()
    assert rows == (len(store), len(store))
    assert sampled and store.check_integrity() == []
    store.close()


def test_two_connections_see_each_others_writes(tmp_path):
    """Slot reuse by one store must not fool the other: its mirror is rebuilt when the file changed."""
    path = tmp_path / "two.sqlite"
    a = ExperienceStore(path, buffer_size=8, recent_size=2, seed=0)
    b = ExperienceStore(path, buffer_size=8, recent_size=2, seed=1)
    first = a.add_many([dict(prompt=f"a{i}", response="x", reward=1.0 + i) for i in range(8)])
    a.mark_learned(first)
    assert len(b) == 8 and {e.id for e in b.sample(8, "priority")} == set(first)
    b.add_many([dict(prompt=f"b{i}", response="x", reward=100.0) for i in range(5)])  # evicts 5 of a's, reuses slots
    kept = {e.id for e in a.sample(8, "priority", learned_only=False)}
    assert len(kept) == 8 and {e.prompt for e in a.pending()} == {f"b{i}" for i in range(5)}
    assert kept == {e.id for e in b.sample(8, "uniform", learned_only=False)}
    a.mark_learned([e.id for e in a.pending()], [0.5] * 5)
    assert b.count(status="learned") == 8 and b.pending() == []
    assert a.check_integrity() == [] and b.check_integrity() == []
    a.close()
    b.close()


def _writer_process(path: str, name: str, items: int, buffer_size: int) -> None:
    store = ExperienceStore(path, buffer_size=buffer_size, recent_size=20, seed=hash(name) % 1000)
    ids: list[int] = []
    for i in range(0, items, 5):
        ids += store.add_many([dict(prompt=f"{name}-{i + j}", response="x", reward=1.0 + (i + j) % 9)
                               for j in range(5)])
        if i % 20 == 15:
            store.mark_learned(ids[-10:], [0.3] * 10)
            store.update_priorities(ids[-10:-5], [50.0] * 5)
    problems = store.check_integrity()
    store.close()
    if problems:
        raise SystemExit(f"{name}: {problems}")


def test_two_processes_write_while_a_third_samples(tmp_path):
    path = str(tmp_path / "mp.sqlite")
    buffer_size, items = 150, 200
    reader = ExperienceStore(path, buffer_size=buffer_size, recent_size=20, seed=0)
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: nothing (connections, locks) inherited
    writers = [ctx.Process(target=_writer_process, args=(path, name, items, buffer_size)) for name in ("w0", "w1")]
    for p in writers:
        p.start()
    counts, seen = [], set()
    while any(p.is_alive() for p in writers):
        counts.append(len(reader))
        # Raises if the reader's sum-tree pointed at a slot the snapshot does not hold (or holds another row in).
        for exp in reader.sample(16, "priority", learned_only=False):
            assert exp.prompt.split("-")[0] in ("w0", "w1")
            seen.add(exp.prompt.split("-")[0])
    for p in writers:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert counts == sorted(counts) and max(counts, default=0) <= buffer_size  # grows, never past the bound
    assert len(reader) == buffer_size
    final = reader.sample(buffer_size, "priority", learned_only=False)
    assert len({e.id for e in final}) == buffer_size and {e.prompt[:2] for e in final} == {"w0", "w1"}
    assert reader.count(status="learned") == len(reader.sample(buffer_size, "uniform"))
    assert reader.check_integrity() == []
    reader.close()
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
