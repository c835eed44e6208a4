"""The disk tier's index: one SQLite database (WAL) beside the entry files.

    entries(key BLOB UNIQUE, size, raw, encoder, source, meta, atime)   one row per entry file
    state(name PRIMARY KEY, value)                                      "clean": "1" after a clean close

A restart reads two aggregates and is ready; it never lists or stats the entry files. The file path
is a function of the key (see disk.py), so it is not stored. `size` is the file's length, `raw` the
decoded length, `meta` the entry's meta as JSON (encoder and source are also columns, for `ls` and
for SQL when a caller wants it), `atime` the last hit (seconds since the epoch, written in batches).

Commits use synchronous=NORMAL: in WAL mode a commit then costs no fsync, and a crash of the process
loses nothing committed; a power loss may lose the last commits, which the next start repairs
(rows without files are dropped on read, files without rows are adopted by reconcile).
Not thread-safe: DiskTier serialises every call under its lock.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

__all__ = ["DiskIndex", "Row"]

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key BLOB NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    raw INTEGER NOT NULL,
    encoder TEXT NOT NULL,
    source TEXT NOT NULL,
    meta TEXT NOT NULL,
    atime REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_atime ON entries(atime);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# (key, size, raw, meta JSON, atime)
Row = tuple[bytes, int, int, str, float]


class DiskIndex:
    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 5000")
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise ValueError(f"{path!r}: SQLite refused WAL mode (got {mode!r}); is it on a network filesystem?")
        self._db.execute("PRAGMA synchronous = NORMAL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise ValueError(f"{path!r}: index schema version {version}, this build reads {SCHEMA_VERSION}")
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def totals(self) -> tuple[int, int, int]:
        """(entries, bytes, raw bytes)."""
        n, size, raw = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(SUM(raw), 0) FROM entries").fetchone()
        return n, size, raw

    def size_of(self, key: bytes) -> int | None:
        row = self._db.execute("SELECT size FROM entries WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def upsert(self, key: bytes, size: int, raw: int, meta: dict[str, str], atime: float) -> tuple[int, int] | None:
        """Adds or replaces the row of `key`; the (size, raw) it replaced, if any."""
        with self._tx() as db:
            old = db.execute("SELECT size, raw FROM entries WHERE key = ?", (key,)).fetchone()
            db.execute(
                "INSERT INTO entries (key, size, raw, encoder, source, meta, atime) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(key) DO UPDATE SET size = excluded.size, raw = excluded.raw, "
                "encoder = excluded.encoder, source = excluded.source, meta = excluded.meta, atime = excluded.atime",
                (key, size, raw, meta.get("encoder", ""), meta.get("source", ""),
                 json.dumps(meta, sort_keys=True), atime))
        return None if old is None else (old[0], old[1])

    def delete(self, keys: Iterable[bytes]) -> list[tuple[bytes, int, int]]:
        """Deletes these rows; (key, size, raw) of those that existed."""
        gone = []
        with self._tx() as db:
            for key in keys:
                row = db.execute("DELETE FROM entries WHERE key = ? RETURNING size, raw", (key,)).fetchone()
                if row is not None:
                    gone.append((key, row[0], row[1]))
        return gone

    def touch(self, atimes: dict[bytes, float]) -> None:
        with self._tx() as db:
            db.executemany("UPDATE entries SET atime = ? WHERE key = ?", [(t, k) for k, t in atimes.items()])

    def oldest(self, limit: int) -> list[tuple[bytes, int]]:
        """(key, size) of the `limit` least recently used rows."""
        return self._db.execute("SELECT key, size FROM entries ORDER BY atime LIMIT ?", (limit,)).fetchall()

    def rows(self) -> list[Row]:
        return self._db.execute("SELECT key, size, raw, meta, atime FROM entries ORDER BY atime").fetchall()

    def keys(self) -> set[bytes]:
        return {k for (k,) in self._db.execute("SELECT key FROM entries")}

    def get_state(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return None if row is None else row[0]

    def set_state(self, name: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO state (name, value) VALUES (?, ?)", (name, value))

    def checkpoint(self) -> None:
        """Folds the WAL into the database, so the next open replays nothing."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        self._db.close()
