"""`ExperienceStore`: experiences, feedback and preference pairs in a real database (SQLite, WAL mode).

Why a database and not a Python list: what `add` acknowledged must survive a crash of the serving process, readers
and writers run in different threads (serving vs learning), and the store is bounded (`buffer_size`) however long
it runs. All SQL is in this module, behind plain-Python methods, so a server database can replace SQLite later
without touching callers.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cl_core.errors import InvalidInputError
from cl_core.prompting import check_text as _check_text

SCHEMA_VERSION = 1
KINDS = ("experience", "correction")
SAMPLING = ("uniform", "priority", "recent")
CORRECTION_PRIORITY = 1e9

_SCHEMA = """
CREATE TABLE IF NOT EXISTS experiences (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt TEXT NOT NULL CHECK (length(trim(prompt)) > 0),
    response TEXT NOT NULL CHECK (length(trim(response)) > 0),
    reward REAL,
    task TEXT NOT NULL DEFAULT 'default',
    kind TEXT NOT NULL DEFAULT 'experience',
    priority REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    learned_rounds INTEGER NOT NULL DEFAULT 0,
    last_loss REAL,
    metadata TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS experiences_pending ON experiences (learned_rounds, id);
CREATE INDEX IF NOT EXISTS experiences_priority ON experiences (priority, id);
CREATE TABLE IF NOT EXISTS preferences (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt TEXT NOT NULL,
    chosen TEXT NOT NULL,
    rejected TEXT NOT NULL,
    task TEXT NOT NULL DEFAULT 'default',
    created_at REAL NOT NULL,
    experience_id INTEGER
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


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


@dataclass(frozen=True)
class PreferencePair:
    id: int
    prompt: str
    chosen: str
    rejected: str
    task: str
    created_at: float
    experience_id: int | None


class ExperienceStore:
    """A bounded, durable store of experiences (SQLite WAL). Thread-safe; one instance per database file."""

    def __init__(self, path: str | Path, buffer_size: int = 10_000, priority_function: str = "reward") -> None:
        self.path = Path(path)
        self.buffer_size = buffer_size
        self.priority_function = priority_function
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a transaction acknowledged to the caller is on disk even if the machine loses power.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        with self._tx():
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # --- writing --------------------------------------------------------------------------------------------
    def add(self, prompt: str, response: str, reward: float | None = None, task: str = "default",
            kind: str = "experience", priority: float | None = None,
            metadata: dict[str, Any] | None = None) -> int:
        """Store one experience durably; returns its id. Evicts beyond `buffer_size`."""
        return self.add_many([dict(prompt=prompt, response=response, reward=reward, task=task, kind=kind,
                                   priority=priority, metadata=metadata)])[0]

    def add_many(self, records: Iterable[dict[str, Any]]) -> list[int]:
        """Store many experiences in one transaction (all or none); returns their ids."""
        rows = [self._row(record) for record in records]
        ids = []
        with self._tx():
            for row in rows:
                cursor = self._db.execute(
                    "INSERT INTO experiences (prompt, response, reward, task, kind, priority, created_at, metadata)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
                ids.append(int(cursor.lastrowid))
            self._evict()
        return ids

    def add_preference(self, prompt: str, chosen: str, rejected: str, task: str = "default",
                       experience_id: int | None = None) -> int:
        """Store a preference pair (a correction: `chosen` is the good response, `rejected` the bad one)."""
        for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected), ("task", task)):
            _check_text(name, value)
        with self._tx():
            cursor = self._db.execute(
                "INSERT INTO preferences (prompt, chosen, rejected, task, created_at, experience_id)"
                " VALUES (?, ?, ?, ?, ?, ?)", (prompt, chosen, rejected, task, time.time(), experience_id))
        return int(cursor.lastrowid)

    def mark_learned(self, ids: Sequence[int], losses: Sequence[float] | None = None) -> None:
        """Record that experiences were trained on; with `loss` priorities, their priority becomes the loss."""
        losses = list(losses) if losses is not None else [None] * len(ids)
        with self._tx():
            for exp_id, loss in zip(ids, losses, strict=True):
                self._db.execute("UPDATE experiences SET learned_rounds = learned_rounds + 1, "
                                 "last_loss = COALESCE(?, last_loss) WHERE id = ?", (loss, exp_id))
                if loss is not None and self.priority_function == "loss":
                    self._db.execute("UPDATE experiences SET priority = ? WHERE id = ? AND kind != 'correction'",
                                     (float(loss), exp_id))

    def set_priority(self, exp_id: int, priority: float) -> None:
        if not _finite(priority):
            raise InvalidInputError(f"priority must be a finite number, got {priority!r}")
        with self._tx():
            self._db.execute("UPDATE experiences SET priority = ? WHERE id = ?", (float(priority), exp_id))

    # --- reading --------------------------------------------------------------------------------------------
    def pending(self, limit: int | None = None) -> list[Experience]:
        """Experiences not trained on yet, oldest first."""
        sql = "SELECT * FROM experiences WHERE learned_rounds = 0 ORDER BY id"
        return self._query(sql + (f" LIMIT {int(limit)}" if limit else ""))

    def sample(self, n: int, strategy: str = "uniform", learned_only: bool = True,
               exclude: Sequence[int] = ()) -> list[Experience]:
        """Up to `n` past experiences: `uniform`, by `priority` (highest first) or most `recent`."""
        if strategy not in SAMPLING:
            raise InvalidInputError(f"unknown sampling strategy {strategy!r}; known: {', '.join(SAMPLING)}")
        where = "WHERE learned_rounds > 0" if learned_only else "WHERE 1"
        if exclude:
            where += f" AND id NOT IN ({','.join(str(int(i)) for i in exclude)})"
        order = {"uniform": "RANDOM()", "priority": "priority DESC, id DESC", "recent": "id DESC"}[strategy]
        return self._query(f"SELECT * FROM experiences {where} ORDER BY {order} LIMIT ?", (int(n),))

    def get(self, exp_id: int) -> Experience | None:
        rows = self._query("SELECT * FROM experiences WHERE id = ?", (exp_id,))
        return rows[0] if rows else None

    def preferences(self) -> list[PreferencePair]:
        with self._lock:
            rows = self._db.execute("SELECT id, prompt, chosen, rejected, task, created_at, experience_id "
                                    "FROM preferences ORDER BY id").fetchall()
        return [PreferencePair(*row) for row in rows]

    def count(self, pending_only: bool = False) -> int:
        sql = "SELECT COUNT(*) FROM experiences" + (" WHERE learned_rounds = 0" if pending_only else "")
        with self._lock:
            return int(self._db.execute(sql).fetchone()[0])

    def __len__(self) -> int:
        return self.count()

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

    # --- internals ------------------------------------------------------------------------------------------
    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._lock)

    def _row(self, record: dict[str, Any]) -> tuple[Any, ...]:
        prompt = _check_text("prompt", record.get("prompt"))
        response = _check_text("response", record.get("response"))
        task = _check_text("task", record.get("task") or "default")
        reward = record.get("reward")
        if reward is not None and not _finite(reward):
            raise InvalidInputError(f"reward must be a finite number or None, got {reward!r}")
        kind = record.get("kind") or "experience"
        if kind not in KINDS:
            raise InvalidInputError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        priority = record.get("priority")
        if priority is None:
            priority = self._default_priority(reward, kind)
        elif not _finite(priority):
            raise InvalidInputError(f"priority must be a finite number, got {priority!r}")
        metadata = record.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InvalidInputError(f"metadata must be a dict, got {type(metadata).__name__}")
        return (prompt, response, None if reward is None else float(reward), task, kind, float(priority),
                time.time(), json.dumps(metadata))

    def _default_priority(self, reward: float | None, kind: str) -> float:
        if kind == "correction":
            return CORRECTION_PRIORITY
        if self.priority_function == "reward":
            return float(reward) if reward is not None else 0.0
        if self.priority_function == "recency":
            return time.time()
        # loss / uncertainty: unknown until measured; new experiences rank above measured easy ones.
        return 1e6

    def _evict(self) -> None:
        excess = self.count() - self.buffer_size
        if excess > 0:
            self._db.execute("DELETE FROM experiences WHERE id IN (SELECT id FROM experiences "
                             "ORDER BY priority ASC, id ASC LIMIT ?)", (excess,))

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Experience]:
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        return [Experience(*row[:10], metadata=json.loads(row[10])) for row in rows]


class _Transaction:
    """`BEGIN IMMEDIATE ... COMMIT` under the store's lock; rolls back on error so nothing half-written stays."""

    def __init__(self, db: sqlite3.Connection, lock: threading.RLock) -> None:
        self._db, self._lock = db, lock

    def __enter__(self) -> None:
        self._lock.acquire()
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._lock.release()


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

