"""The store's SQLite schema, created or migrated in place when a database is opened.

Why versioned: experience databases outlive the code that wrote them (they are the system's memory). Each
schema change gets a version number in `meta` and a migration that runs inside one transaction, so an old file is
either fully migrated or untouched, and several processes opening the same old file migrate it once.

Version 2 (over 1) adds:
- `status`: pending / learned / feedback_only. Version 1 left experiences rated ≤ 0 "pending" forever (the
  caller filtered them out of training); now they are `feedback_only`: kept for preference learning, never
  imitated, never returned by `pending()`.
- `slot`: the experience's leaf in the in-memory sum-tree (unique among stored rows, reused after eviction, so
  the tree is sized by the buffer, not by how many experiences ever arrived).
- `tier`: 0 for the most recent experiences (a FIFO window that is never evicted by priority), 1 for the rest,
  evicted lowest-priority-first. `meta.recent_after_id` is the boundary: tier 0 ⟺ id > recent_after_id.
- `labels`: free-form feedback (name, value, task, time) attached to an experience.
- `kind` is constrained to the known kinds.
"""

from __future__ import annotations

import sqlite3

from cl_core.errors import ContinualError

SCHEMA_VERSION = 2
KINDS = ("experience", "correction")
STATUSES = ("pending", "learned", "feedback_only")
#: Version-1 stores gave corrections this priority (to keep them from eviction) and unmeasured losses 1e6; as
#: sampling weights such values would crowd out everything else, so the migration re-derives them.
V1_SENTINEL_PRIORITY = 1e6

_EXPERIENCES = """
CREATE TABLE {name} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt TEXT NOT NULL CHECK (length(trim(prompt)) > 0),
    response TEXT NOT NULL CHECK (length(trim(response)) > 0),
    reward REAL,
    task TEXT NOT NULL DEFAULT 'default',
    kind TEXT NOT NULL DEFAULT 'experience' CHECK (kind IN ('experience', 'correction')),
    priority REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    learned_rounds INTEGER NOT NULL DEFAULT 0,
    last_loss REAL,
    metadata TEXT NOT NULL DEFAULT '{{}}',
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'learned', 'feedback_only')),
    slot INTEGER NOT NULL CHECK (slot >= 0),
    tier INTEGER NOT NULL DEFAULT 0 CHECK (tier IN (0, 1))
)"""

_INDEXES = (
    # Partial indexes: only the (few) rows of that status are in them, so the bulk of the table (learned
    # experiences) costs no index writes when it is inserted, learned or evicted. pending() / feedback_only()
    # read them oldest first.
    "CREATE INDEX experiences_pending ON experiences (id) WHERE status = 'pending'",
    "CREATE INDEX experiences_feedback_only ON experiences (id) WHERE status = 'feedback_only'",
    # Eviction order within the priority tier: non-corrections first, lowest priority first, oldest first. Rows
    # enter it when they leave the recent FIFO window. (Slots and top-k are served from memory, not indexes.)
    "CREATE INDEX experiences_evict ON experiences (kind = 'correction', priority, id) WHERE tier = 1",
)

_OTHER_TABLES = (
    """CREATE TABLE IF NOT EXISTS preferences (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        prompt TEXT NOT NULL,
        chosen TEXT NOT NULL,
        rejected TEXT NOT NULL,
        task TEXT NOT NULL DEFAULT 'default',
        created_at REAL NOT NULL,
        experience_id INTEGER
    )""",
    # `value` has no declared type on purpose: SQLite then keeps TEXT as text and REAL as real (or NULL).
    """CREATE TABLE IF NOT EXISTS labels (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        experience_id INTEGER NOT NULL,
        label TEXT NOT NULL CHECK (length(trim(label)) > 0),
        value,
        task TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS labels_experience ON labels (experience_id, id)",
    "CREATE INDEX IF NOT EXISTS labels_task ON labels (task, id)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


def ensure_schema(db: sqlite3.Connection, recent_size: int) -> bool:
    """Create a fresh schema or migrate an old one; returns True when a version-1 database was migrated.

    Must run inside a write transaction (`BEGIN IMMEDIATE`), so that concurrent openers serialize: the second
    one finds the work done.
    """
    has_meta = _table_exists(db, "meta")
    version = None
    if has_meta:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        version = int(row[0]) if row else None
    if version is None and _table_exists(db, "experiences"):
        version = 1  # written before the version was recorded
    if version is not None and version > SCHEMA_VERSION:
        raise ContinualError(f"the experience database has schema version {version}, newer than this cl_core "
                             f"understands ({SCHEMA_VERSION}); upgrade cl_core to open it")
    for statement in _OTHER_TABLES:
        db.execute(statement)
    if version == SCHEMA_VERSION:
        return False
    if version is None:
        db.execute(_EXPERIENCES.format(name="experiences"))
        for statement in _INDEXES:
            db.execute(statement)
        set_meta(db, "recent_after_id", 0)
        set_meta(db, "schema_version", SCHEMA_VERSION)
        return False
    _migrate_v1(db, recent_size)
    return True


def _migrate_v1(db: sqlite3.Connection, recent_size: int) -> None:
    """Rebuild `experiences` with the version-2 columns (the SQLite way: new table, copy, drop, rename)."""
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'experiences'").fetchone()
    sequence = int(row[0]) if row else 0
    db.execute(_EXPERIENCES.format(name="experiences_v2"))
    db.execute(f"""
        INSERT INTO experiences_v2 (id, prompt, response, reward, task, kind, priority, created_at, learned_rounds,
                                    last_loss, metadata, status, slot, tier)
        SELECT id, prompt, response, reward, task, kind, priority, created_at, learned_rounds, last_loss, metadata,
               CASE WHEN kind != 'correction' AND reward IS NOT NULL AND reward <= 0 THEN 'feedback_only'
                    WHEN learned_rounds > 0 THEN 'learned' ELSE 'pending' END,
               ROW_NUMBER() OVER (ORDER BY id) - 1,
               CASE WHEN ROW_NUMBER() OVER (ORDER BY id DESC) <= {int(recent_size)} THEN 0 ELSE 1 END
        FROM experiences""")
    db.execute("DROP TABLE experiences")
    db.execute("ALTER TABLE experiences_v2 RENAME TO experiences")
    for statement in _INDEXES:
        db.execute(statement)
    # Keep AUTOINCREMENT's high-water mark: ids of evicted experiences (which preferences may still name) must
    # never be handed out again.
    max_id = db.execute("SELECT COALESCE(MAX(id), 0) FROM experiences").fetchone()[0]
    db.execute("DELETE FROM sqlite_sequence WHERE name = 'experiences'")
    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('experiences', ?)", (max(sequence, max_id),))
    boundary = db.execute("SELECT COALESCE(MAX(id), 0) FROM experiences WHERE tier = 1").fetchone()[0]
    set_meta(db, "recent_after_id", boundary)
    set_meta(db, "schema_version", SCHEMA_VERSION)


def get_meta_int(db: sqlite3.Connection, key: str, default: int = 0) -> int:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else default


def set_meta(db: sqlite3.Connection, key: str, value: int) -> None:
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))



def _table_exists(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None
