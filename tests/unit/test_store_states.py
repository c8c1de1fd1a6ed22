"""Statuses, mixed batches, labels, eviction tiers, validation and the version-1 -> 2 schema migration."""

import json
import math
import sqlite3

import pytest

from cl_core import ContinualError, InvalidInputError
from cl_core.store import SCHEMA_VERSION, ExperienceStore


@pytest.fixture
def store(tmp_path):
    s = ExperienceStore(tmp_path / "s.sqlite", buffer_size=100, seed=0)
    yield s
    s.close()


def _rows(path):
    return sqlite3.connect(path).execute("SELECT COUNT(*) FROM experiences").fetchone()[0]


# --- statuses ---------------------------------------------------------------------------------------------------
def test_reward_at_most_zero_is_feedback_only_never_pending(store):
    good, unrated, zero, bad = (store.add("q", "a", reward=r) for r in (1.0, None, 0.0, -1.0))
    correction = store.add("q", "fixed", reward=-1.0, kind="correction")  # corrections are always learned
    assert [e.id for e in store.pending()] == [good, unrated, correction]
    assert [e.id for e in store.feedback_only()] == [zero, bad]
    assert store.get(bad).status == "feedback_only" and store.get(good).status == "pending"
    assert store.count(pending_only=True) == 3
    assert store.count(status="feedback_only") == 2 and store.count() == 5
    store.mark_learned([good, bad], [0.5, 0.5])
    assert store.get(good).status == "learned" and store.get(good).learned_rounds == 1
    assert store.get(bad).status == "feedback_only" and store.get(bad).learned_rounds == 1
    assert store.count(status=["learned", "pending"]) == 3
    assert [e.id for e in store.pending(limit=1)] == [unrated]
    assert store.check_integrity() == []


# --- mixed batches ----------------------------------------------------------------------------------------------
def _fill(store, learned, pending):
    old = store.add_many([dict(prompt=f"old{i}", response="a", reward=1.0 + i) for i in range(learned)])
    store.mark_learned(old)
    new = store.add_many([dict(prompt=f"new{i}", response="a") for i in range(pending)])
    return old, new


def test_mixed_batch_takes_oldest_pending_and_replays_the_rest(store):
    old, new = _fill(store, learned=10, pending=8)
    batch = store.sample_mixed(8, replay_ratio=0.25)
    assert [e.id for e in batch.new] == new[:6]
    assert len(batch.replay) == 2 and {e.id for e in batch.replay} <= set(old)
    assert len(batch) == 8 and [e.id for e in batch] == [e.id for e in batch.new + batch.replay]
    excluded = store.sample_mixed(8, 0.25, strategy="uniform", exclude=new[:2] + old[:9])
    assert [e.id for e in excluded.new] == new[2:8] and [e.id for e in excluded.replay] == [old[9]]


def test_mixed_batch_fills_from_the_other_side_when_one_runs_short(store):
    _, new = _fill(store, learned=10, pending=2)
    batch = store.sample_mixed(8, 0.25)  # 2 pending only: replay fills the batch
    assert [e.id for e in batch.new] == new and len(batch.replay) == 6
    fresh = ExperienceStore(store.path.parent / "few.sqlite", seed=0)
    few_old, few_new = _fill(fresh, learned=1, pending=12)
    batch = fresh.sample_mixed(8, 0.5)  # 1 learned: pending fills the batch
    assert [e.id for e in batch.replay] == few_old and [e.id for e in batch.new] == few_new[:7]
    small = fresh.sample_mixed(100, 0.5)  # fewer eligible than batch_size: everything, no more
    assert len(small) == 13
    fresh.close()


def test_mixed_batch_without_pending_is_all_replay_and_says_so(store):
    _fill(store, learned=5, pending=0)
    batch = store.sample_mixed(4, 0.5)
    assert batch.new == [] and len(batch.replay) == 4
    assert store.sample_mixed(0, 0.5).experiences == []
    assert len(store.sample_mixed(4, 0.0).replay) == 4  # ratio 0 but nothing new: replay fills


@pytest.mark.parametrize(("args", "field"), [((8, 1.5), "replay_ratio"), ((8, math.nan), "replay_ratio"),
                                             ((-1, 0.5), "batch_size"), ((8, 0.5, "best"), "strategy")])
def test_mixed_batch_rejects_bad_arguments(store, args, field):
    with pytest.raises(InvalidInputError, match=field):
        store.sample_mixed(*args)


# --- labels -----------------------------------------------------------------------------------------------------
def test_labels_store_text_numbers_and_tags_with_task_and_time(store):
    a = store.add("q", "a", task="maths")
    b = store.add("q", "b", task="poems")
    first = store.add_label(a, "topic", "algebra")
    store.add_label(a, "toxicity", 0.25)
    store.add_label(b, "flagged")
    store.add_label(b, "stars", 4, task="reviews")  # ints are stored as floats
    labels = store.labels()
    assert [(x.experience_id, x.label, x.value, x.task) for x in labels] == [
        (a, "topic", "algebra", "maths"), (a, "toxicity", 0.25, "maths"), (b, "flagged", None, "poems"),
        (b, "stars", 4.0, "reviews")]
    assert labels[0].id == first and labels[0].created_at > 0 and isinstance(labels[3].value, float)
    assert [x.label for x in store.labels(experience_id=a)] == ["topic", "toxicity"]
    assert [x.label for x in store.labels(task="reviews")] == ["stars"]
    assert [x.label for x in store.labels(experience_id=b, label="flagged")] == ["flagged"]


@pytest.mark.parametrize(("args", "field"), [
    ((True, "x"), "experience_id"), (("1", "x"), "experience_id"), ((999, "x"), "experience_id 999"),
    ((None, "x", 1.0), "experience_id"), ((1, ""), "label"), ((1, 3), "label"), ((1, "x" * 201), "label"),
    ((1, "x", True), "value"), ((1, "x", math.nan), "value"), ((1, "x", [1]), "value"),
    ((1, "x", 1.0, ""), "task"),
])
def test_bad_labels_are_rejected_naming_the_field(store, args, field):
    store.add("q", "a")
    with pytest.raises(InvalidInputError, match=field):
        store.add_label(*args)
    assert store.labels() == []


def test_labels_go_with_their_evicted_experience(tmp_path):
    store = ExperienceStore(tmp_path / "l.sqlite", buffer_size=3, recent_size=0)
    low = store.add("q", "a", reward=0.5)
    store.add_label(low, "note", "goes")
    keep = store.add("q", "b", reward=5.0)
    store.add_label(keep, "note", "stays")
    store.add_many([dict(prompt="q", response="c", reward=4.0), dict(prompt="q", response="d", reward=3.0)])
    assert store.get(low) is None
    assert [x.value for x in store.labels()] == ["stays"]
    store.close()


# --- eviction: recent FIFO + priority tier ---------------------------------------------------------------------
def test_recent_window_is_kept_and_the_rest_is_evicted_lowest_priority_first(tmp_path):
    store = ExperienceStore(tmp_path / "e.sqlite", buffer_size=10, recent_size=3)
    high = store.add_many([dict(prompt=f"h{i}", response="a", reward=10.0 + i) for i in range(10)])
    low = store.add_many([dict(prompt=f"l{i}", response="a", reward=0.5) for i in range(3)])
    kept = {e.id for e in store.pending()}
    assert set(low) <= kept and len(kept) == 10  # newest 3 kept although their priority is lowest
    assert kept == set(low) | set(high[3:])  # the 3 lowest of the priority tier went
    store.add_many([dict(prompt=f"m{i}", response="a", reward=1.0) for i in range(3)])
    kept = {e.id for e in store.pending()}
    assert not set(low) & kept  # out of the window, lowest priority: evicted first
    assert len(store) == 10 and store.check_integrity() == []
    store.close()


def test_corrections_are_kept_preferentially_but_the_bound_holds(tmp_path):
    store = ExperienceStore(tmp_path / "c.sqlite", buffer_size=4, recent_size=1)
    corrections = store.add_many([dict(prompt=f"c{i}", response="a", kind="correction", reward=0.1 * (i + 1))
                                  for i in range(3)])
    store.add_many([dict(prompt=f"e{i}", response="a", reward=100.0) for i in range(5)])
    assert set(corrections) <= {e.id for e in store.pending()}
    store.add_many([dict(prompt=f"c{i}", response="a", kind="correction", reward=5.0) for i in range(3)])
    kept = {e.id for e in store.pending()}
    assert len(kept) == 4 and corrections[0] not in kept  # only corrections left: the lowest one goes
    store.close()


def test_recent_size_equal_to_buffer_is_fifo_and_zero_is_pure_priority(tmp_path):
    fifo = ExperienceStore(tmp_path / "f.sqlite", buffer_size=5, recent_size=5)
    ids = fifo.add_many([dict(prompt=f"q{i}", response="a", reward=float(10 - i)) for i in range(8)])
    assert [e.id for e in fifo.pending()] == ids[3:]
    prio = ExperienceStore(tmp_path / "p.sqlite", buffer_size=5, recent_size=0)
    ids = prio.add_many([dict(prompt=f"q{i}", response="a", reward=float(10 - i)) for i in range(8)])
    assert [e.id for e in prio.pending()] == ids[:5]
    late = prio.add("late", "a", reward=0.5)  # lower than everything: evicted at once, its id still returned
    assert prio.get(late) is None and len(prio) == 5
    fifo.close()
    prio.close()


def test_memory_stays_flat_slots_are_reused(tmp_path):
    store = ExperienceStore(tmp_path / "m.sqlite", buffer_size=50, recent_size=5)
    size = store._state.tree.size
    for round_ in range(20):
        store.add_many([dict(prompt=f"q{round_}-{i}", response="a", reward=1.0 + i % 7) for i in range(30)])
        store.add(f"single{round_}", "a")
    slots = [r[0] for r in sqlite3.connect(store.path).execute("SELECT slot FROM experiences")]
    assert len(store) == 50 and len(set(slots)) == 50 and max(slots) < size
    assert store._state.tree.size == size and store._state.raw.shape == (size,)
    assert store.check_integrity() == []
    store.close()


def test_reopening_with_a_smaller_buffer_evicts_down_to_it(tmp_path):
    path = tmp_path / "shrink.sqlite"
    with ExperienceStore(path, buffer_size=100) as big:
        big.add_many([dict(prompt=f"q{i}", response="a", reward=1.0 + i) for i in range(60)])
    with ExperienceStore(path, buffer_size=20) as small:
        assert len(small) == 20 and small.check_integrity() == []
        assert {e.prompt for e in small.sample(20, "recent", learned_only=False)} >= {"q59", "q58"}


# --- validation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("record", "field"), [
    (dict(prompt="q", response="a", reward=True), "reward"),
    (dict(prompt="q", response="a", reward=[1]), "reward"),
    (dict(prompt="q", response="a", rewrd=1.0), "rewrd"),
    (dict(prompt="q", response="a", metadata={"x": object()}), "metadata"),
    (dict(prompt="q", response="a", metadata={"x": math.nan}), "metadata"),
    (dict(prompt="q", response="a", metadata="{}"), "metadata"),
    (dict(prompt="q", response="a", task=5), "task"),
    (dict(prompt="q", response="a", task=" "), "task"),
    (dict(prompt="q", response="a", kind="Correction"), "kind"),
    (dict(prompt="q", response="a", priority=math.inf), "priority"),
    (dict(prompt="q", response="a", priority=True), "priority"),
    (dict(prompt="q", response="a", token_logprobs=[0.3]), "token_logprobs"),
    (dict(response="a"), "prompt"),
    ("q,a", "dict"),
])
def test_bad_records_name_the_record_and_field_and_write_nothing(tmp_path, store, record, field):
    store.add("keep", "me")
    with pytest.raises(InvalidInputError, match=field) as err:
        store.add_many([dict(prompt="fine", response="fine"), record, dict(prompt="also", response="fine")])
    assert "record 1" in str(err.value)
    assert _rows(store.path) == 1 and len(store) == 1 and store.check_integrity() == []


def test_add_many_needs_a_list_of_records(store):
    with pytest.raises(InvalidInputError, match="list of dicts"):
        store.add_many(dict(prompt="q", response="a"))
    assert store.add_many([]) == []


@pytest.mark.parametrize(("call", "field"), [
    (lambda s: s.mark_learned([1], [math.nan]), r"losses\[0\]"), (lambda s: s.mark_learned([1, 2], [0.1]), "losses"),
    (lambda s: s.mark_learned(["1"]), r"ids\[0\]"), (lambda s: s.set_priority(1, math.nan), "priority"),
    (lambda s: s.pending(limit=-1), "limit"), (lambda s: s.count(status="done"), "status"),
])
def test_bad_arguments_are_rejected_before_writing(store, call, field):
    exp = store.add("q", "a")
    with pytest.raises(InvalidInputError, match=field):
        call(store)
    assert store.get(exp).learned_rounds == 0 and store.get(exp).priority == 1.0


@pytest.mark.parametrize(("kwargs", "field"), [(dict(buffer_size=0), "buffer_size"),
                                               (dict(buffer_size=10, recent_size=11), "recent_size"),
                                               (dict(alpha=-1.0), "alpha"), (dict(buffer_size=True), "buffer_size")])
def test_bad_settings_are_rejected(tmp_path, kwargs, field):
    with pytest.raises(InvalidInputError, match=field):
        ExperienceStore(tmp_path / "x.sqlite", **kwargs)


# --- schema migration -------------------------------------------------------------------------------------------
V1_SCHEMA = """
CREATE TABLE experiences (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt TEXT NOT NULL CHECK (length(trim(prompt)) > 0),
    response TEXT NOT NULL CHECK (length(trim(response)) > 0),
    reward REAL, task TEXT NOT NULL DEFAULT 'default', kind TEXT NOT NULL DEFAULT 'experience',
    priority REAL NOT NULL DEFAULT 0, created_at REAL NOT NULL, learned_rounds INTEGER NOT NULL DEFAULT 0,
    last_loss REAL, metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX experiences_pending ON experiences (learned_rounds, id);
CREATE INDEX experiences_priority ON experiences (priority, id);
CREATE TABLE preferences (id INTEGER PRIMARY KEY AUTOINCREMENT, prompt TEXT NOT NULL, chosen TEXT NOT NULL,
    rejected TEXT NOT NULL, task TEXT NOT NULL DEFAULT 'default', created_at REAL NOT NULL, experience_id INTEGER);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
"""


def _v1_database(path):
    """A file exactly as the version-1 store left it, with one evicted experience (id 7)."""
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    rows = [  # prompt, reward, kind, priority, learned_rounds, last_loss
        ("learned", 2.0, "experience", 2.0, 1, 0.3), ("pending", 1.0, "experience", 1.0, 0, None),
        ("disliked", -1.0, "experience", -1.0, 0, None), ("neutral", 0.0, "experience", 0.0, 0, None),
        ("unrated", None, "experience", 0.0, 0, None), ("fixed", 1.0, "correction", 1e9, 1, 0.1),
        ("evicted", 0.5, "experience", 0.5, 0, None),
    ]
    for prompt, reward, kind, priority, rounds, loss in rows:
        db.execute("INSERT INTO experiences (prompt, response, reward, kind, priority, created_at, learned_rounds, "
                   "last_loss, metadata) VALUES (?, 'answer', ?, ?, ?, 1.0, ?, ?, ?)",
                   (prompt, reward, kind, priority, rounds, loss, json.dumps({"p": prompt})))
    db.execute("DELETE FROM experiences WHERE prompt = 'evicted'")
    db.execute("INSERT INTO preferences (prompt, chosen, rejected, created_at, experience_id) "
               "VALUES ('q', 'fixed', 'wrong', 1.0, 6)")
    db.commit()
    db.close()


def test_version_1_database_is_migrated_in_place(tmp_path):
    path = tmp_path / "v1.sqlite"
    _v1_database(path)
    store = ExperienceStore(path, buffer_size=100, recent_size=2)
    by_prompt = {e.prompt: e for e in store.sample(10, "recent", status=["pending", "learned", "feedback_only"])}
    assert {p: e.status for p, e in by_prompt.items()} == {
        "learned": "learned", "pending": "pending", "disliked": "feedback_only", "neutral": "feedback_only",
        "unrated": "pending", "fixed": "learned"}
    assert [e.prompt for e in store.pending()] == ["pending", "unrated"]
    assert by_prompt["fixed"].priority == 1.0  # the 1e9 sentinel would crowd out every other replay
    assert by_prompt["learned"].last_loss == 0.3 and by_prompt["learned"].metadata == {"p": "learned"}
    assert store.preferences()[0].experience_id == 6
    assert store.add("new", "a") == 8  # id 7 was handed out before: never again
    assert store.check_integrity() == []
    db = sqlite3.connect(path)
    assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    tiers = dict(db.execute("SELECT prompt, tier FROM experiences"))  # recent window of 2: the newest two
    assert tiers == {"learned": 1, "pending": 1, "disliked": 1, "neutral": 1, "unrated": 1, "fixed": 0, "new": 0}
    store.close()
    fresh = ExperienceStore(tmp_path / "fresh.sqlite")
    fresh.close()
    def schema(conn):  # SQLite quotes a renamed table's name in its CREATE statement; otherwise identical
        rows = conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name LIKE 'experiences%' "
                            "OR name LIKE 'labels%' ORDER BY 2").fetchall()
        return [(kind, name, sql.replace('"experiences"', "experiences")) for kind, name, sql in rows]

    assert schema(db) == schema(sqlite3.connect(tmp_path / "fresh.sqlite"))
    again = ExperienceStore(path, buffer_size=100, recent_size=2)  # already migrated: opens as is
    assert len(again) == 7 and again.check_integrity() == []
    again.close()


def test_migration_rederives_unmeasured_loss_sentinels(tmp_path):
    path = tmp_path / "v1loss.sqlite"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.executemany("INSERT INTO experiences (prompt, response, priority, created_at, learned_rounds, last_loss) "
                   "VALUES (?, 'a', ?, 1.0, ?, ?)", [("measured", 2.5, 1, 2.5), ("unmeasured", 1e6, 0, None),
                                                     ("measured-then-1e6", 1e6, 1, 0.7)])
    db.commit()
    db.close()
    with ExperienceStore(path, priority_function="loss") as store:
        got = {e.prompt: e.priority for e in store.sample(5, "recent", learned_only=False)}
    assert got == {"measured": 2.5, "unmeasured": 2.5, "measured-then-1e6": 0.7}


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "future.sqlite"
    ExperienceStore(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(ContinualError, match="upgrade cl_core"):
        ExperienceStore(path)
