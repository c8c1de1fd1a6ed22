"""`ExperienceStore`: experiences, feedback, labels and preference pairs in SQLite (WAL), sampled through a sum-tree.

Why a database and not a Python list: what `add` acknowledged must survive a crash of the serving process, readers
and writers run in different threads (serving vs learning) or processes, and the store is bounded (`buffer_size`)
however long it runs. All SQL is in this package, behind plain-Python methods, so a server database can replace
SQLite later without touching callers.

Why a sum-tree beside SQLite: proportional sampling by priority from a million rows must take milliseconds, which
no SQL query over a million rows does. Each experience owns a `slot` (a leaf of the tree, reused after eviction),
so the tree and its side arrays have a fixed size set by `buffer_size`. SQLite stays the truth: the tree is
rebuilt from it on open, after a failed transaction, and lazily whenever another connection (thread or process)
committed changes, which `PRAGMA data_version` reveals at the start of each transaction. Sampling runs inside
one read transaction, so the tree and the rows it points to come from the same snapshot.

Bounding: the newest `recent_size` experiences form a FIFO window that is never evicted by priority; the rest
("important" tier) is evicted lowest-priority-first, non-corrections before corrections, oldest first on ties.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cl_core.errors import InvalidInputError
from cl_core.prompting import check_text as _check_text
from cl_core.store.priorities import PriorityFunction, get_priority_function, uncertainty
from cl_core.store.schema import (
    KINDS,
    SCHEMA_VERSION,
    STATUSES,
    V1_SENTINEL_PRIORITY,
    ensure_schema,
    get_meta_int,
    set_meta,
)
from cl_core.store.sumtree import SumTree

__all__ = ["KINDS", "SAMPLING", "SCHEMA_VERSION", "STATUSES", "Experience", "ExperienceStore", "Label", "MixedBatch",
           "PreferencePair"]

SAMPLING = ("uniform", "priority", "top", "recent")
_CODE = {status: i for i, status in enumerate(STATUSES)}
_PENDING, _LEARNED, _FEEDBACK_ONLY = (_CODE[s] for s in STATUSES)
_COLUMNS = "id, prompt, response, reward, task, kind, priority, created_at, learned_rounds, last_loss, metadata, status"
_RECORD_FIELDS = ("prompt", "response", "reward", "task", "kind", "priority", "metadata", "token_logprobs",
                  "top_logprobs")
_RECORD_FIELD_SET = frozenset(_RECORD_FIELDS)
_MIN_SLACK = 64            # free slots beyond buffer_size: new rows land there before eviction makes room
_MAX_CHUNK = 4096          # rows inserted between two evictions (bounds the slack the tree must have)
_IN_CHUNK = 10_000         # ids per `IN (...)` list, well under SQLite's variable limit
_MAX_WEIGHT = 1e250        # weights are clipped here so a million of them still sum to a finite number
_REANCHOR_ABOVE = 1e150    # an anchored (recency) weight this large triggers re-anchoring all weights
_MAX_LABEL_CHARS = 200


@dataclass(frozen=True)
class Experience:
    id: int
    prompt: str
    response: str
    reward: float | None
    task: str
    kind: str
    priority: float
    created_at: float
    learned_rounds: int
    last_loss: float | None
    metadata: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"


@dataclass(frozen=True)
class PreferencePair:
    id: int
    prompt: str
    chosen: str
    rejected: str
    task: str
    created_at: float
    experience_id: int | None


@dataclass(frozen=True)
class Label:
    """A free-form feedback signal on an experience ("topic"="maths", "toxicity"=0.1, "flagged"=None)."""

    id: int
    experience_id: int
    label: str
    value: str | float | None
    task: str
    created_at: float


@dataclass(frozen=True)
class MixedBatch:
    """A training batch: `new` (pending, oldest first) plus `replay` (past, learned experiences)."""

    new: list[Experience]
    replay: list[Experience]

    @property
    def experiences(self) -> list[Experience]:
        return self.new + self.replay

    def __len__(self) -> int:
        return len(self.new) + len(self.replay)

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)


class _NewRow(NamedTuple):
    prompt: str
    response: str
    reward: float | None
    task: str
    kind: str
    priority: float | None
    uncertainty: float | None
    metadata: str
    status: int


@dataclass
class _State:
    """The in-memory mirror of the `experiences` table that sampling and eviction need (one entry per slot)."""

    tree: SumTree
    ids: np.ndarray           # experience id per slot (0 when free)
    raw: np.ndarray           # raw priority per slot
    group: np.ndarray         # status code per slot, -1 when the slot is free
    free: np.ndarray          # stack of free slots (the smallest on top, so slots stay dense)
    n_free: int
    counts: np.ndarray        # experiences per status
    n_recent: int             # experiences in the FIFO window (id > recent_after)
    recent_after: int
    max_raw: float | None     # highest raw priority seen: the priority of unmeasured experiences
    anchor: float             # reference of anchored weights (recency)

    def pop_slots(self, k: int) -> np.ndarray:
        if k > self.n_free:
            raise RuntimeError(f"experience store: {k} slots needed, {self.n_free} free (eviction did not run)")
        self.n_free -= k
        return self.free[self.n_free:self.n_free + k][::-1].copy()

    def push_slots(self, slots: np.ndarray) -> None:
        self.free[self.n_free:self.n_free + len(slots)] = slots[::-1]
        self.n_free += len(slots)


class ExperienceStore:
    """A bounded, durable store of experiences (SQLite WAL). Thread-safe; processes may share the file.

    `buffer_size` bounds the number of experiences; the newest `recent_size` (default 10% of it) are never
    evicted by priority. `priority_function` is a registered name (`loss`, `uncertainty`, `recency`, `reward`)
    or a `PriorityFunction`; `sample(..., "priority")` draws proportionally to weight ** `alpha` (0: uniform).
    `seed` makes sampling reproducible. All processes sharing a file should use the same settings.
    """

    def __init__(self, path: str | Path, buffer_size: int = 10_000,
                 priority_function: str | PriorityFunction = "reward", *, recent_size: int | None = None,
                 alpha: float = 1.0, seed: int | None = None) -> None:
        if not _is_int(buffer_size) or buffer_size < 1:
            raise InvalidInputError(f"buffer_size must be a positive integer, got {buffer_size!r}")
        if recent_size is None:
            recent_size = max(1, buffer_size // 10)
        if not _is_int(recent_size) or not 0 <= recent_size <= buffer_size:
            raise InvalidInputError(f"recent_size must be an integer from 0 to buffer_size ({buffer_size}), "
                                    f"got {recent_size!r}")
        if not _finite(alpha) or alpha < 0:
            raise InvalidInputError(f"alpha must be a finite number ≥ 0 (1: proportional, 0: uniform), got {alpha!r}")
        self._fn = get_priority_function(priority_function)
        self.path = Path(path)
        self.buffer_size = int(buffer_size)
        self.recent_size = int(recent_size)
        self.alpha = float(alpha)
        self.priority_function = self._fn.name
        self._rng = np.random.default_rng(seed)
        self._lock = threading.RLock()
        self._state: _State | None = None
        self._seen_version: int | None = None
        self._touched = False
        self._last_created = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a transaction acknowledged to the caller is on disk even if the machine loses power.
        self._db.execute("PRAGMA synchronous=FULL")
        # Throughput without weakening durability: an evicting batch of 1000 dirties thousands of B-tree pages
        # (victims and priorities are spread over the table), so checkpointing the WAL only every 8192 pages
        # (32 MiB; default 1000) writes each hot page back once per several commits instead of once per commit,
        # and a 16 MiB page cache (default 2 MiB) keeps the upper index levels in memory. Both are bounded, so
        # memory and disk stay flat; measured +60% adds/s when evicting (tests/benchmarks/bench_store.py).
        self._db.execute("PRAGMA cache_size=-16384")
        self._db.execute("PRAGMA wal_autocheckpoint=8192")
        self._db.execute("PRAGMA journal_size_limit=67108864")
        try:
            with self._write(sync=False):
                if ensure_schema(self._db, self.recent_size):
                    self._rederive_v1_priorities()
            with self._write():
                self._bound()  # a smaller buffer_size than the file was written with takes effect now
        except BaseException:
            self._db.close()
            raise

    # --- writing --------------------------------------------------------------------------------------------
    def add(self, prompt: str, response: str, reward: float | None = None, task: str = "default",
            kind: str = "experience", priority: float | None = None, metadata: dict[str, Any] | None = None, *,
            token_logprobs: Sequence[float] | None = None,
            top_logprobs: Sequence[Mapping[Any, Any] | Sequence[float]] | None = None) -> int:
        """Store one experience durably; returns its id. Evicts beyond `buffer_size`.

        Reward ≤ 0 (not a correction) makes it `feedback_only`. `token_logprobs` / `top_logprobs` (from the
        engine that served the response) give the `uncertainty` priority when `priority` is not given.
        """
        row = self._validate(dict(prompt=prompt, response=response, reward=reward, task=task, kind=kind,
                                  priority=priority, metadata=metadata, token_logprobs=token_logprobs,
                                  top_logprobs=top_logprobs), where="")
        with self._write():
            return self._insert([row])[0]

    def add_many(self, records: Iterable[Mapping[str, Any]]) -> list[int]:
        """Store many experiences in one transaction (all or none); returns their ids in order.

        Each record is a dict with the arguments of `add`. Every record is checked before anything is written.
        An id is returned even if its experience was evicted within the same call (a full buffer and a low
        priority); `get` then returns None for it.
        """
        if isinstance(records, (Mapping, str, bytes)) or not isinstance(records, Iterable):
            raise InvalidInputError(f"records must be a list of dicts (one per experience), got "
                                    f"{type(records).__name__}")
        rows = [self._validate(record, where=f"record {i}: ") for i, record in enumerate(records)]
        if not rows:
            return []
        with self._write():
            return self._insert(rows)

    def add_preference(self, prompt: str, chosen: str, rejected: str, task: str = "default",
                       experience_id: int | None = None) -> int:
        """Store a preference pair (a correction: `chosen` is the good response, `rejected` the bad one)."""
        for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected), ("task", task)):
            _check_text(name, value)
        if experience_id is not None and not _is_int(experience_id):
            raise InvalidInputError(f"experience_id must be an int id from add() or None, got {experience_id!r}")
        with self._write(sync=False):
            cursor = self._db.execute(
                "INSERT INTO preferences (prompt, chosen, rejected, task, created_at, experience_id)"
                " VALUES (?, ?, ?, ?, ?, ?)", (prompt, chosen, rejected, task, time.time(), experience_id))
        return int(cursor.lastrowid)

    def add_label(self, experience_id: int, label: str, value: str | float | None = None,
                  task: str | None = None) -> int:
        """Attach a free-form feedback signal to a stored experience; returns the label's id.

        `value` is text, a finite number (stored as float) or None (a bare tag). `task` defaults to the
        experience's task. Labels are deleted with their experience when it is evicted.
        """
        if not _is_int(experience_id):
            raise InvalidInputError(f"experience_id must be an int id returned by add(), got {experience_id!r}")
        _check_text("label", label)
        if len(label) > _MAX_LABEL_CHARS:
            raise InvalidInputError(f"label is {len(label)} characters long; use a short name (≤ {_MAX_LABEL_CHARS}) "
                                    "and put long text in value")
        if value is not None and not isinstance(value, str) and not _finite(value):
            raise InvalidInputError(f"value must be text, a finite number or None, got {value!r} "
                                    f"({type(value).__name__}); for yes/no use 1.0/0.0 or 'yes'/'no'")
        if task is not None:
            _check_text("task", task)
        with self._write(sync=False):
            row = self._db.execute("SELECT task FROM experiences WHERE id = ?", (int(experience_id),)).fetchone()
            if row is None:
                raise InvalidInputError(f"experience_id {experience_id} is not in the store (never added, or "
                                        "evicted): label an id returned by add()")
            stored = value if value is None or isinstance(value, str) else float(value)
            cursor = self._db.execute(
                "INSERT INTO labels (experience_id, label, value, task, created_at) VALUES (?, ?, ?, ?, ?)",
                (int(experience_id), label, stored, task or row[0], time.time()))
        return int(cursor.lastrowid)

    def mark_learned(self, ids: Sequence[int], losses: Sequence[float | None] | None = None) -> None:
        """Record that experiences were trained on: `learned_rounds` + 1, status `learned` (feedback-only ones stay
        feedback-only), `last_loss` = the loss; with the `loss` priority function the priority becomes the loss.

        Ids no longer in the store (evicted) are skipped.
        """
        ids = _id_list("ids", ids)
        losses = [None] * len(ids) if losses is None else list(losses)
        if len(losses) != len(ids):
            raise InvalidInputError(f"losses has {len(losses)} values for {len(ids)} ids: give one loss per id")
        for i, loss in enumerate(losses):
            if loss is not None and not _finite(loss):
                raise InvalidInputError(f"losses[{i}] must be a finite number or None, got {loss!r}")
        with self._write():
            found = self._lookup(ids)
            self._db.executemany(
                "UPDATE experiences SET learned_rounds = learned_rounds + 1, last_loss = COALESCE(?, last_loss), "
                "status = CASE status WHEN 'feedback_only' THEN status ELSE 'learned' END, "
                "priority = COALESCE(?, priority) WHERE id = ?",
                [(loss, loss if self._fn.updated_by_loss else None, i) for i, loss in zip(ids, losses, strict=True)
                 if i in found])
            final: dict[int, float | None] = {}
            for exp_id, loss in zip(ids, losses, strict=True):
                if exp_id in found and (loss is not None or exp_id not in final):
                    final[exp_id] = None if loss is None else float(loss)
            self._update_memory(found, final, learned=True)

    def update_priorities(self, ids: Sequence[int], values: Sequence[float]) -> int:
        """Set the raw priority of many experiences in one transaction; returns how many were still stored."""
        ids = _id_list("ids", ids)
        values = list(values)
        if len(values) != len(ids):
            raise InvalidInputError(f"values has {len(values)} priorities for {len(ids)} ids: give one per id")
        for i, value in enumerate(values):
            if not _finite(value):
                raise InvalidInputError(f"values[{i}] must be a finite number, got {value!r}")
        with self._write():
            found = self._lookup(ids)
            self._db.executemany("UPDATE experiences SET priority = ? WHERE id = ?",
                                 [(float(v), i) for i, v in zip(ids, values, strict=True) if i in found])
            final = {i: float(v) for i, v in zip(ids, values, strict=True) if i in found}
            self._update_memory(found, final, learned=False)
        return len(found)

    def set_priority(self, exp_id: int, priority: float) -> None:
        if not _finite(priority):
            raise InvalidInputError(f"priority must be a finite number, got {priority!r}")
        self.update_priorities([exp_id], [priority])

    # --- reading --------------------------------------------------------------------------------------------
    def pending(self, limit: int | None = None) -> list[Experience]:
        """Experiences to learn from (status `pending`: not trained on yet, not feedback-only), oldest first."""
        return self._by_status("pending", limit)

    def feedback_only(self, limit: int | None = None) -> list[Experience]:
        """Experiences rated ≤ 0: kept as feedback (preference learning), never imitated; oldest first."""
        return self._by_status("feedback_only", limit)

    def sample(self, n: int, strategy: str = "uniform", learned_only: bool = True, exclude: Sequence[int] = (), *,
               status: str | Sequence[str] | None = None) -> list[Experience]:
        """Up to `n` distinct past experiences.

        - `uniform`: uniformly at random, without replacement.
        - `priority`: proportionally to weight ** alpha, without replacement (successive sampling: each next
          item is drawn proportionally among those not drawn yet); returned highest priority first.
        - `top`: the `n` highest priorities (ties: newest first).
        - `recent`: the newest first.

        Drawn from status `learned` (`learned_only=True`, the default) or `pending` + `learned`; never from
        feedback-only experiences unless `status` names them (`status` overrides `learned_only`).
        """
        if not _is_int(n) or n < 0:
            raise InvalidInputError(f"n must be an integer ≥ 0, got {n!r}")
        if strategy not in SAMPLING:
            raise InvalidInputError(f"unknown sampling strategy {strategy!r}; known: {', '.join(SAMPLING)}")
        codes = _status_codes(status, learned_only)
        exclude = _id_list("exclude", exclude)
        if n == 0:
            return []
        with self._read():
            return self._sample(n, strategy, codes, exclude)

    def sample_mixed(self, batch_size: int, replay_ratio: float, strategy: str = "priority",
                     exclude: Sequence[int] = ()) -> MixedBatch:
        """A training batch: `round(batch_size * replay_ratio)` learned experiences (by `strategy`) and the rest
        pending ones (oldest first), from one consistent snapshot.

        When one side runs short the other fills the batch (as a training loop would): too few pending
        experiences -> more replay; too few learned ones -> more pending. The batch is smaller than
        `batch_size` only when the store holds fewer eligible experiences; `new` is empty when nothing is
        pending (check it before training on replay alone).
        """
        if not _is_int(batch_size) or batch_size < 0:
            raise InvalidInputError(f"batch_size must be an integer ≥ 0, got {batch_size!r}")
        if not _finite(replay_ratio) or not 0 <= replay_ratio <= 1:
            raise InvalidInputError(f"replay_ratio must be a number from 0 to 1, got {replay_ratio!r}")
        if strategy not in SAMPLING:
            raise InvalidInputError(f"unknown sampling strategy {strategy!r}; known: {', '.join(SAMPLING)}")
        exclude = _id_list("exclude", exclude)
        n_replay = round(batch_size * replay_ratio)
        n_new = batch_size - n_replay
        with self._read():
            pending = self._query(f"SELECT {_COLUMNS} FROM experiences WHERE status = 'pending'{_not_in(exclude)} "
                                  "ORDER BY id LIMIT ?", (batch_size,))
            new = pending[:n_new]
            want = n_replay + (n_new - len(new))
            replay = self._sample(want, strategy, [_LEARNED], exclude) if want else []
            new += pending[n_new:n_new + want - len(replay)]
        return MixedBatch(new=new, replay=replay)

    def get(self, exp_id: int) -> Experience | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM experiences WHERE id = ?", (int(exp_id),))
        return rows[0] if rows else None

    def preferences(self) -> list[PreferencePair]:
        with self._lock:
            rows = self._db.execute("SELECT id, prompt, chosen, rejected, task, created_at, experience_id "
                                    "FROM preferences ORDER BY id").fetchall()
        return [PreferencePair(*row) for row in rows]

    def labels(self, experience_id: int | None = None, task: str | None = None,
               label: str | None = None) -> list[Label]:
        """Labels, oldest first, optionally only those of one experience, task and/or label name."""
        where, params = [], []
        for column, value in (("experience_id", experience_id), ("task", task), ("label", label)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT id, experience_id, label, value, task, created_at FROM labels"
        sql += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        with self._lock:
            return [Label(*row) for row in self._db.execute(sql, params).fetchall()]

    def metadata_values(self, key: str, values: Sequence[str]) -> set[str]:
        """Which of `values` some stored experience carries under metadata `key` (e.g. the ids of records already
        ingested from S3, so a re-run never adds them twice)."""
        if not isinstance(key, str) or not key.isidentifier():
            raise InvalidInputError(f"metadata key must be an identifier string, got {key!r}")
        wanted = [str(v) for v in values]
        found: set[str] = set()
        with self._read():
            for i in range(0, len(wanted), 500):  # SQLite's bound-parameter limit
                chunk = wanted[i:i + 500]
                rows = self._db.execute(
                    f"SELECT json_extract(metadata, '$.{key}') FROM experiences WHERE json_extract(metadata, "
                    f"'$.{key}') IN ({','.join('?' * len(chunk))})", chunk).fetchall()
                found.update(str(row[0]) for row in rows)
        return found

    def count(self, pending_only: bool = False, status: str | Sequence[str] | None = None) -> int:
        """Number of stored experiences (all, `pending_only`, or those with the given status(es))."""
        codes = _status_codes(status if status is not None or not pending_only else "pending", learned_only=False,
                              default=list(_CODE.values()))
        with self._read():
            return int(self._state.counts[codes].sum())

    def __len__(self) -> int:
        return self.count()

    def check_integrity(self) -> list[str]:
        """Problems found (empty: healthy): SQLite's integrity check, and the in-memory sum-tree, slots and counts
        compared with a fresh rebuild from the database. For tests and operators; reads everything."""
        problems: list[str] = []
        with self._read():
            result = [row[0] for row in self._db.execute("PRAGMA integrity_check").fetchall()]
            if result != ["ok"]:
                problems.append("sqlite integrity_check: " + "; ".join(result[:5]))
            state, fresh = self._state, self._load()
            size = min(len(state.group), len(fresh.group))
            slots = np.array([row[0] for row in self._db.execute("SELECT slot FROM experiences")], dtype=np.int64)
            if len(np.unique(slots)) != len(slots):
                problems.append(f"{len(slots) - len(np.unique(slots))} slots are used by more than one experience")
            for name, mine, truth in (("status", state.group, fresh.group), ("priority", state.raw, fresh.raw),
                                      ("id", state.ids, fresh.ids)):
                bad = np.flatnonzero(mine[:size] != truth[:size])
                if len(bad) or np.any(mine[size:] != (-1 if name == "status" else 0)):
                    problems.append(f"{name} of {len(bad)} slots differs from the database (e.g. slots {bad[:5]})")
            expected = SumTree(len(state.group), len(STATUSES))
            expected.build(state.group, self._weights(state.raw, state.anchor))
            if not np.allclose(state.tree.tree, expected.tree, rtol=1e-9, atol=0):
                problems.append("sum-tree nodes differ from the sums of their leaves")
            if not np.array_equal(state.counts, fresh.counts):
                problems.append(f"status counts {state.counts.tolist()} != database {fresh.counts.tolist()}")
            if (state.n_recent, state.recent_after) != (fresh.n_recent, fresh.recent_after):
                problems.append(f"recent window {state.n_recent} after id {state.recent_after} != database "
                                f"{fresh.n_recent} after id {fresh.recent_after}")
            free = np.sort(state.free[:state.n_free])
            if not np.array_equal(free, np.flatnonzero(state.group < 0)):
                problems.append("free-slot list differs from the empty slots")
            wrong_tier = self._db.execute("SELECT COUNT(*) FROM experiences WHERE (tier = 0) != (id > ?)",
                                          (fresh.recent_after,)).fetchone()[0]
            if wrong_tier:
                problems.append(f"{wrong_tier} experiences are in the wrong tier")
            if int(fresh.counts.sum()) > self.buffer_size:
                problems.append(f"{int(fresh.counts.sum())} experiences stored, over buffer_size {self.buffer_size}")
        return problems

    # --- lifecycle ------------------------------------------------------------------------------------------
    def backup_to(self, path: str | Path) -> None:
        """A consistent copy of the database (SQLite online backup), safe while others write."""
        target = sqlite3.connect(str(path))
        try:
            with self._lock:
                self._db.backup(target)
        finally:
            target.close()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._state = None

    def __enter__(self) -> ExperienceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transactions and the in-memory mirror ----------------------------------------------------------------
    @contextmanager
    def _write(self, sync: bool = True) -> Iterator[None]:
        """`BEGIN IMMEDIATE ... COMMIT` under the lock; on error rolls back, and rebuilds the mirror if it changed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._touched = False
            try:
                if sync:
                    self._sync()
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if self._touched:
                    self._state = None
                raise

    @contextmanager
    def _read(self) -> Iterator[None]:
        """One read snapshot under the lock, with the mirror brought up to date for that snapshot."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._sync()
                yield
            finally:
                self._db.execute("COMMIT")

    def _sync(self) -> None:
        # data_version changes when another connection committed; the first statement of a transaction also
        # opens its snapshot, so the version read here matches what the following statements see.
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if self._state is None or version != self._seen_version:
            self._state = self._load()
            self._seen_version = version

    def _load(self) -> _State:
        count, max_slot = self._db.execute("SELECT COUNT(*), COALESCE(MAX(slot), -1) FROM experiences").fetchone()
        tree = SumTree(max(self.buffer_size + _MIN_SLACK, max_slot + 1), len(STATUSES))
        cursor = self._db.execute("SELECT slot, id, priority, CASE status WHEN 'pending' THEN 0 WHEN 'learned' "
                                  "THEN 1 ELSE 2 END FROM experiences")
        data = np.fromiter(cursor, count=count, dtype=[("slot", np.int64), ("id", np.int64), ("raw", np.float64),
                                                       ("group", np.int8)])
        ids = np.zeros(tree.size, dtype=np.int64)
        raw = np.zeros(tree.size)
        group = np.full(tree.size, -1, dtype=np.int8)
        ids[data["slot"]] = data["id"]
        raw[data["slot"]] = data["raw"]
        group[data["slot"]] = data["group"]
        anchor = self._fn.anchor(data["raw"]) if self._fn.anchored else 0.0
        tree.build(group, self._weights(raw, anchor))
        empty = np.flatnonzero(group < 0)[::-1]
        free = np.zeros(tree.size, dtype=np.int64)
        free[:len(empty)] = empty
        recent_after = get_meta_int(self._db, "recent_after_id")
        n_recent = self._db.execute("SELECT COUNT(*) FROM experiences WHERE id > ?", (recent_after,)).fetchone()[0]
        return _State(tree=tree, ids=ids, raw=raw, group=group, free=free, n_free=len(empty),
                      counts=np.bincount(data["group"], minlength=len(STATUSES)).astype(np.int64),
                      n_recent=int(n_recent), recent_after=recent_after,
                      max_raw=float(data["raw"].max()) if count else None, anchor=anchor)

    def _weights(self, raw: np.ndarray, anchor: float) -> np.ndarray:
        weights = self._fn.weights(raw, anchor)
        if self.alpha != 1.0:
            with np.errstate(over="ignore"):
                weights = weights ** self.alpha
        return np.minimum(weights, _MAX_WEIGHT)

    def _set_slots(self, slots: np.ndarray, groups: np.ndarray, raws: np.ndarray,
                   ids: np.ndarray | None = None) -> None:
        """Slots now hold these statuses (-1: free), raw priorities and (if given) experience ids; updates the tree
        and the running max."""
        self._touched = True
        state = self._state
        if ids is not None:
            state.ids[slots] = ids
        state.raw[slots] = np.where(groups >= 0, raws, 0.0)
        state.group[slots] = groups
        live = raws[groups >= 0]
        if len(live):
            state.max_raw = float(max(live.max(), state.max_raw if state.max_raw is not None else -math.inf))
        weights = self._weights(raws, state.anchor)
        if self._fn.anchored and len(live) and float(weights[groups >= 0].max()) > _REANCHOR_ABOVE:
            state.anchor = self._fn.anchor(state.raw[state.group >= 0])
            state.tree.build(state.group, self._weights(state.raw, state.anchor))
        else:
            state.tree.set(slots, groups, weights)

    def _insert(self, rows: list[_NewRow]) -> list[int]:
        state = self._state
        now = max(time.time(), self._last_created)  # never backwards: recency order is insertion order
        self._last_created = now
        next_id = int(self._db.execute(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'experiences'), 0), "
            "COALESCE((SELECT MAX(id) FROM experiences), 0))").fetchone()[0]) + 1
        chunk_size = min(_MAX_CHUNK, len(state.group) - self.buffer_size)
        ids: list[int] = []
        for start in range(0, len(rows), chunk_size):
            self._bound()
            chunk = rows[start:start + chunk_size]
            self._touched = True
            slots = state.pop_slots(len(chunk))
            raws = np.empty(len(chunk))
            for i, row in enumerate(chunk):
                value = row.priority
                if value is None:
                    value = self._fn.initial(reward=row.reward, kind=row.kind, created_at=now,
                                             uncertainty=row.uncertainty)
                if value is None:  # not measured yet: as important as the most important known experience
                    value = state.max_raw if state.max_raw is not None else 1.0
                raws[i] = value
            chunk_ids = range(next_id + start, next_id + start + len(chunk))
            self._db.executemany(
                "INSERT INTO experiences (id, prompt, response, reward, task, kind, priority, created_at, metadata, "
                "status, slot) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(i, r.prompt, r.response, r.reward, r.task, r.kind, float(p), now, r.metadata, STATUSES[r.status],
                  int(s)) for i, r, p, s in zip(chunk_ids, chunk, raws, slots, strict=True)])
            groups = np.array([r.status for r in chunk], dtype=np.int8)
            self._set_slots(slots, groups, raws, np.array(chunk_ids, dtype=np.int64))
            state.counts += np.bincount(groups, minlength=len(STATUSES))
            state.n_recent += len(chunk)
            ids.extend(chunk_ids)
        self._bound()
        return ids

    def _bound(self) -> None:
        """Move experiences beyond the newest `recent_size` into the priority tier, then evict down to
        `buffer_size`: priority tier first (non-corrections, lowest priority, oldest), then the oldest recent."""
        state = self._state
        if state.n_recent > self.recent_size:
            k = state.n_recent - self.recent_size
            boundary = self._db.execute("SELECT id FROM experiences WHERE id > ? ORDER BY id LIMIT 1 OFFSET ?",
                                        (state.recent_after, k - 1)).fetchone()[0]
            self._touched = True
            self._db.execute("UPDATE experiences SET tier = 1 WHERE id > ? AND id <= ?", (state.recent_after, boundary))
            set_meta(self._db, "recent_after_id", boundary)
            state.recent_after, state.n_recent = int(boundary), self.recent_size
        excess = int(state.counts.sum()) - self.buffer_size
        if excess <= 0:
            return
        victims = self._db.execute("SELECT id, slot FROM experiences WHERE tier = 1 "
                                   "ORDER BY kind = 'correction', priority, id LIMIT ?", (excess,)).fetchall()
        if len(victims) < excess:  # the priority tier is empty: the FIFO window itself is over the bound
            recent = self._db.execute("SELECT id, slot FROM experiences WHERE id > ? ORDER BY id LIMIT ?",
                                      (state.recent_after, excess - len(victims))).fetchall()
            state.n_recent -= len(recent)
            victims += recent
        self._touched = True
        ids = [v[0] for v in victims]
        for start in range(0, len(ids), _IN_CHUNK):
            part = ids[start:start + _IN_CHUNK]
            marks = ",".join("?" * len(part))
            self._db.execute(f"DELETE FROM experiences WHERE id IN ({marks})", part)
            self._db.execute(f"DELETE FROM labels WHERE experience_id IN ({marks})", part)
        slots = np.array([v[1] for v in victims], dtype=np.int64)
        state.counts -= np.bincount(state.group[slots], minlength=len(STATUSES))
        self._set_slots(slots, np.full(len(slots), -1, dtype=np.int8), np.zeros(len(slots)),
                        np.zeros(len(slots), dtype=np.int64))
        state.push_slots(slots)

    def _lookup(self, ids: Sequence[int]) -> dict[int, int]:
        """id -> slot for the ids still stored."""
        found: dict[int, int] = {}
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), _IN_CHUNK):
            part = unique[start:start + _IN_CHUNK]
            found.update(self._db.execute(f"SELECT id, slot FROM experiences WHERE id IN "
                                          f"({','.join('?' * len(part))})", part).fetchall())
        return found

    def _update_memory(self, found: dict[int, int], raws: dict[int, float | None], learned: bool) -> None:
        """Mirror an UPDATE of status (when `learned`) and raw priority (None: unchanged) for stored ids."""
        if not raws:
            return
        state = self._state
        slots = np.array([found[i] for i in raws], dtype=np.int64)
        old = state.group[slots]
        new = old.copy()
        if learned:
            new[old != _FEEDBACK_ONLY] = _LEARNED
        values = np.array([state.raw[s] if v is None or (learned and not self._fn.updated_by_loss) else v
                           for s, v in zip(slots, raws.values(), strict=True)])
        state.counts += np.bincount(new, minlength=len(STATUSES)) - np.bincount(old, minlength=len(STATUSES))
        self._set_slots(slots, new, values)

    def _sample(self, n: int, strategy: str, codes: list[int], exclude: list[int]) -> list[Experience]:
        if strategy == "recent":
            # `+status` keeps SQLite off the partial status indexes: the rows come from a backward rowid scan.
            statuses = ",".join(f"'{STATUSES[c]}'" for c in codes)
            return self._query(f"SELECT {_COLUMNS} FROM experiences WHERE +status IN ({statuses}){_not_in(exclude)} "
                               "ORDER BY id DESC LIMIT ?", (n,))
        excluded = np.array(list(self._lookup(exclude).values()), dtype=np.int64)
        if strategy == "priority":
            slots = self._state.tree.sample(n, codes, self._rng, exclude=excluded)
        elif strategy == "top":
            slots = self._top_slots(n, codes, excluded)
        else:
            slots = self._uniform_slots(n, codes, excluded)
        rows = self._rows_at(slots, codes)
        if strategy != "uniform":
            rows.sort(key=lambda e: (-e.priority, -e.id))
        return rows

    def _top_slots(self, n: int, codes: list[int], excluded: np.ndarray) -> np.ndarray:
        """The `n` slots of highest raw priority (ties: highest id) among these statuses; one pass in numpy."""
        state = self._state
        candidates = self._candidates(codes, excluded)
        if len(candidates) <= n:
            return candidates
        values = state.raw[candidates]
        kth = np.partition(values, len(values) - n)[len(values) - n]  # the n-th largest value
        above = candidates[values > kth]
        ties = candidates[values == kth]
        need = n - len(above)
        ties = ties[np.argpartition(-state.ids[ties], need - 1)[:need]] if need < len(ties) else ties
        return np.concatenate([above, ties])

    def _uniform_slots(self, n: int, codes: list[int], excluded: np.ndarray) -> np.ndarray:
        """`n` distinct slots uniformly among those with these statuses: by rejection from random slots when they
        are common (no pass over the whole buffer), else by listing them."""
        state = self._state
        available = int(state.counts[codes].sum())
        fraction = available / len(state.group)
        if available >= 2 * (n + len(excluded)) and fraction >= 0.05:
            draws = self._rng.integers(0, len(state.group), int(2 * n / fraction) + 64)
            keep = _status_mask(codes)[state.group[draws]] & ~np.isin(draws, excluded)
            draws = draws[keep]
            _, first = np.unique(draws, return_index=True)
            if len(first) >= n:  # first occurrences of uniform draws are a uniform sample without replacement
                return draws[np.sort(first)][:n]
        candidates = self._candidates(codes, excluded)
        if len(candidates) <= n:
            return self._rng.permutation(candidates)
        return self._rng.choice(candidates, n, replace=False)

    def _candidates(self, codes: list[int], excluded: np.ndarray) -> np.ndarray:
        """All slots with these statuses, minus `excluded` (one pass over the buffer, no sorting)."""
        mask = _status_mask(codes)[self._state.group]
        mask[excluded] = False
        return np.flatnonzero(mask)

    def _rows_at(self, slots: np.ndarray, codes: list[int]) -> list[Experience]:
        """The experiences in these slots, in order; checks that the database snapshot agrees with the mirror."""
        ids = [int(i) for i in self._state.ids[np.asarray(slots, dtype=np.int64)]]
        found: dict[int, tuple[Experience, int]] = {}
        for start in range(0, len(ids), _IN_CHUNK):
            part = ids[start:start + _IN_CHUNK]
            for row in self._db.execute(f"SELECT {_COLUMNS}, slot FROM experiences WHERE id IN "
                                        f"({','.join('?' * len(part))})", part).fetchall():
                found[row[0]] = (_experience(row), row[-1])
        allowed = {STATUSES[c] for c in codes}
        for exp_id, slot in zip(ids, slots, strict=True):
            if exp_id not in found or found[exp_id][1] != slot or found[exp_id][0].status not in allowed:
                raise RuntimeError("experience store: the in-memory sum-tree disagrees with the database snapshot "
                                   f"(slot {slot}, id {exp_id}); this is a bug, please report it with the database")
        return [found[i][0] for i in ids]

    def _by_status(self, status: str, limit: int | None) -> list[Experience]:
        if limit is not None and (not _is_int(limit) or limit < 0):
            raise InvalidInputError(f"limit must be an integer ≥ 0 or None, got {limit!r}")
        # The status is inlined (one of STATUSES): SQLite only uses a partial index for a literal value.
        sql = f"SELECT {_COLUMNS} FROM experiences WHERE status = '{status}' ORDER BY id"
        return self._query(sql + (" LIMIT ?" if limit is not None else ""), () if limit is None else (limit,))

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Experience]:
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [_experience(row) for row in rows]

    def _rederive_v1_priorities(self) -> None:
        """Version-1 sentinel priorities (1e9 for corrections, 1e6 for unmeasured losses) would dominate
        proportional sampling; give those experiences what this priority function says instead."""
        rows = self._db.execute("SELECT id, reward, kind, created_at, last_loss FROM experiences WHERE priority >= ?",
                                (V1_SENTINEL_PRIORITY,)).fetchall()
        fallback = self._db.execute("SELECT MAX(priority) FROM experiences WHERE priority < ?",
                                    (V1_SENTINEL_PRIORITY,)).fetchone()[0]
        updates = []
        for exp_id, reward, kind, created_at, last_loss in rows:
            value = self._fn.initial(reward=reward, kind=kind, created_at=created_at, uncertainty=None)
            if value is None and self._fn.updated_by_loss:
                value = last_loss
            updates.append((value if value is not None else fallback if fallback is not None else 1.0, exp_id))
        self._db.executemany("UPDATE experiences SET priority = ? WHERE id = ?", updates)

    def _validate(self, record: Any, where: str) -> _NewRow:
        """One record checked completely, or an InvalidInputError that names the record, the field and the fix."""
        if not isinstance(record, Mapping):
            raise InvalidInputError(f"{where}each record must be a dict with prompt, response and optional "
                                    f"{', '.join(_RECORD_FIELDS[2:])}; got {type(record).__name__}")
        unknown = sorted(str(k) for k in record.keys() - _RECORD_FIELD_SET)
        if unknown:
            raise InvalidInputError(f"{where}unknown field(s) {', '.join(unknown)}; known: {', '.join(_RECORD_FIELDS)}")
        try:
            prompt = _check_text("prompt", record.get("prompt"))
            response = _check_text("response", record.get("response"))
            task = "default" if record.get("task") is None else _check_text("task", record.get("task"))
            reward = record.get("reward")
            if isinstance(reward, bool):
                raise InvalidInputError(f"reward must be a number or None, not a bool ({reward}): use 1.0 for good "
                                        "and -1.0 (or 0.0) for bad")
            if reward is not None and not _finite(reward):
                raise InvalidInputError(f"reward must be a finite number or None (unrated), got {reward!r}: pass a "
                                        "rating such as 1.0 or -1.0")
            kind = "experience" if record.get("kind") is None else record.get("kind")
            if kind not in KINDS:
                raise InvalidInputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
            priority = record.get("priority")
            if priority is not None and not _finite(priority):
                raise InvalidInputError(f"priority must be a finite number or None (computed), got {priority!r}")
            metadata = {} if record.get("metadata") is None else record.get("metadata")
            if not isinstance(metadata, Mapping):
                raise InvalidInputError(f"metadata must be a dict (or None), got {type(metadata).__name__}")
            try:
                metadata_json = json.dumps(dict(metadata), allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"metadata must be JSON-serializable (str keys; str, finite numbers, bool, "
                                        f"None, lists and dicts of them): {exc}") from None
            measured = None
            if record.get("token_logprobs") is not None or record.get("top_logprobs") is not None:
                measured = uncertainty(record.get("token_logprobs"), record.get("top_logprobs"))
        except InvalidInputError as exc:
            raise InvalidInputError(f"{where}{exc}") from None
        feedback = kind != "correction" and reward is not None and reward <= 0
        return _NewRow(prompt, response, None if reward is None else float(reward), task, kind,
                       None if priority is None else float(priority), measured, metadata_json,
                       _FEEDBACK_ONLY if feedback else _PENDING)


def _experience(row: Sequence[Any]) -> Experience:
    return Experience(*row[:10], metadata=json.loads(row[10]), status=row[11])


def _status_codes(status: str | Sequence[str] | None, learned_only: bool,
                  default: list[int] | None = None) -> list[int]:
    if status is None:
        if default is not None:
            return default
        return [_LEARNED] if learned_only else [_PENDING, _LEARNED]
    names = [status] if isinstance(status, str) else list(status)
    unknown = [s for s in names if s not in _CODE]
    if unknown or not names:
        raise InvalidInputError(f"status must be one or more of {', '.join(STATUSES)}, got {status!r}")
    return sorted({_CODE[s] for s in names})


def _status_mask(codes: list[int]) -> np.ndarray:
    """Lookup table: `_status_mask(codes)[group]` is True where a slot's status is in `codes` (index -1, a free
    slot, reads the extra last entry: False). Faster than `np.isin` over a million slots."""
    table = np.zeros(len(STATUSES) + 1, dtype=bool)
    table[codes] = True
    return table


def _not_in(ids: Sequence[int]) -> str:
    # Validated ints are inlined: no limit on how many (unlike bound parameters).
    return f" AND id NOT IN ({','.join(str(int(i)) for i in ids)})" if ids else ""


def _id_list(name: str, ids: Any) -> list[int]:
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
        raise InvalidInputError(f"{name} must be a list of experience ids (ints), got {type(ids).__name__}")
    out = list(ids)
    for i, value in enumerate(out):
        if not _is_int(value):
            raise InvalidInputError(f"{name}[{i}] must be an int experience id, got {value!r}")
    return [int(v) for v in out]


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    if type(value) is float:  # the common case first: validation runs once per stored experience
        return math.isfinite(value)
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)
