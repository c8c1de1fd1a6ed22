import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest

from cl_core import ExperienceStore, InvalidInputError


@pytest.fixture
def store(tmp_path):
    s = ExperienceStore(tmp_path / "exp.sqlite", buffer_size=100)
    yield s
    s.close()


def test_add_pending_learned_and_sample(store):
    # Rewards > 0: a reward ≤ 0 makes an experience feedback-only, never pending (see test_store_states.py).
    ids = [store.add(f"q{i}", f"a{i}", reward=float(i + 1)) for i in range(5)]
    assert [e.id for e in store.pending()] == ids
    store.mark_learned(ids[:3], [0.5, 0.4, 0.3])
    assert [e.id for e in store.pending()] == ids[3:]
    assert {e.id for e in store.sample(10)} == set(ids[:3])
    assert [e.id for e in store.sample(2, "top")] == [ids[2], ids[1]]
    drawn = store.sample(2, "priority")  # proportional draw, returned highest priority first
    assert len({e.id for e in drawn}) == 2 and {e.id for e in drawn} <= set(ids[:3])
    assert drawn[0].priority > drawn[1].priority
    assert [e.id for e in store.sample(1, "recent")] == [ids[2]]
    assert store.get(ids[0]).last_loss == 0.5


@pytest.mark.parametrize("record", [
    dict(prompt="", response="a"), dict(prompt="q", response="   "), dict(prompt=3, response="a"),
    dict(prompt="q", response=None), dict(prompt="q", response="a", reward=math.nan),
    dict(prompt="q", response="a", reward=math.inf), dict(prompt="q", response="a", reward="high"),
    dict(prompt="q", response="a", kind="rumour"), dict(prompt="q", response="a", metadata=[1]),
])
def test_bad_records_are_rejected_and_nothing_is_stored(store, record):
    store.add("keep", "me")
    with pytest.raises(InvalidInputError):
        store.add_many([dict(prompt="fine", response="fine"), record])
    assert [e.prompt for e in store.pending()] == ["keep"]


def test_eviction_is_bounded_and_keeps_corrections(tmp_path):
    store = ExperienceStore(tmp_path / "e.sqlite", buffer_size=10)
    correction = store.add("q", "right", kind="correction")
    store.add_many([dict(prompt=f"q{i}", response="a", reward=float(i)) for i in range(50)])
    assert len(store) == 10
    kept = {e.prompt for e in store.pending()}
    assert store.get(correction) is not None
    assert "q49" in kept and "q0" not in kept
    store.close()


def test_preferences_and_wal_mode(store, tmp_path):
    pref = store.add_preference("q", chosen="good", rejected="bad")
    assert store.preferences()[0].id == pref
    assert store.preferences()[0].chosen == "good"
    mode = sqlite3.connect(tmp_path / "exp.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_loss_priority_is_refreshed_after_learning(tmp_path):
    store = ExperienceStore(tmp_path / "e.sqlite", priority_function="loss")
    a, b = store.add("q1", "a"), store.add("q2", "b")
    store.mark_learned([a, b], [0.1, 2.0])
    assert [e.id for e in store.sample(2, "priority")] == [b, a]
    store.close()


def test_concurrent_writers_and_readers(store):
    errors = []

    def writer(n):
        try:
            for i in range(30):
                store.add(f"w{n}-{i}", "a")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader():
        for _ in range(30):
            store.pending()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.count() == 90


CHILD = """
import sys
from cl_core.store import ExperienceStore
store = ExperienceStore(sys.argv[1], buffer_size=100000)
i = 0
while True:
    store.add(f"q{i}", f"a{i}")
    print(i, flush=True)   # acknowledged
    i += 1
"""


def test_acknowledged_adds_survive_kill_9(tmp_path):
    db = tmp_path / "crash.sqlite"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db)], stdout=subprocess.PIPE, text=True)
    acked = -1
    for line in child.stdout:
        acked = int(line)
        if acked >= 200:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    store = ExperienceStore(db)
    prompts = {e.prompt for e in store.pending()}
    assert all(f"q{i}" in prompts for i in range(acked + 1))
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.close()


def test_metadata_values_finds_already_ingested_records(store):
    store.add("p1", "r1", metadata={"record_id": "a1"})
    store.add_many([{"prompt": f"p{i}", "response": "r", "metadata": {"record_id": f"b{i}"}} for i in range(3)])
    asked = [f"missing{i}" for i in range(1200)] + ["a1", "b0", "b2"]  # more than one SQL chunk
    assert store.metadata_values("record_id", asked) == {"a1", "b0", "b2"}
    assert store.metadata_values("record_id", []) == set()
    with pytest.raises(InvalidInputError, match="identifier"):
        store.metadata_values("x') OR 1=1 --", ["a"])
