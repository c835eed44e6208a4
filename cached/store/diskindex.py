"""The disk tier's index: one SQLite database (WAL) beside the entry files.

    entries(key BLOB UNIQUE, size, raw, encoder, source, meta, atime)   one row per entry file
    state(name PRIMARY KEY, value)                                      "clean": "1" after a clean close

A restart reads two aggregates and is ready; it never lists or stats the entry files. The file path
is a function of the key (see disk.py), so it is not stored. `size` is the file's length, `raw` the
decoded length, `meta` the entry's meta as JSON (encoder and source are also columns, for `ls` and
for SQL when a caller wants it), `atime` the last hit (seconds since the epoch, written in batches).

Commits use synchronous=NORMAL: in WAL mode a commit then costs no fsync, and a crash of the process
loses nothing committed; a power loss may lose the last commits, which the next start repairs
(rows without files are dropped on read, files without rows are adopted by reconcile). The WAL is
checkpointed every 256 pages and cut back to 1 MiB after each checkpoint, so it never holds more
than about 1 MiB of the disk (disk.py keeps that much free and more).

The database file is created 0640 before SQLite opens it: SQLite gives its -wal and -shm files the
mode of the database, so none of the three is readable by others whatever the umask.

A file that is not this index (garbage, a truncated copy, another schema or schema version) raises
DamagedIndex; `DiskIndex.in_memory` copies an index it may not write (a read-only disk) into memory.
Not thread-safe: DiskTier serialises every call under its lock.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from urllib.parse import quote

__all__ = ["DiskIndex", "DamagedIndex", "Row", "is_damage", "FAULTS"]

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
COLUMNS = {"entries": ["key", "size", "raw", "encoder", "source", "meta", "atime"], "state": ["name", "value"]}
WAL_PAGES = 256               # checkpoint the WAL every 256 pages (1 MiB) ...
WAL_LIMIT_BYTES = 1 << 20     # ... and truncate it back to 1 MiB after each checkpoint
DAMAGE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
SQLITE_HEADER = b"SQLite format 3\0"

# What the disk or the database can raise when storage fails (full, read-only, permissions, damage).
FAULTS = (OSError, sqlite3.DatabaseError)

# (key, size, raw, meta JSON, atime)
Row = tuple[bytes, int, int, str, float]


class DamagedIndex(ValueError):
    """The index file is not an index of this build, or SQLite found it damaged: rebuild it from the files."""


def is_damage(exc: BaseException) -> bool:
    """True when `exc` says the index file itself is damaged (as opposed to a full or read-only disk)."""
    if isinstance(exc, DamagedIndex):
        return True
    return isinstance(exc, sqlite3.DatabaseError) and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in DAMAGE_CODES


@contextmanager
def _damage_as_damaged_index(path: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.DatabaseError as exc:
        if is_damage(exc):
            raise DamagedIndex(f"{path!r}: {exc}") from exc
        raise


def _check_header(path: str, head: bytes) -> None:
    """A file that does not start as SQLite databases do is found before SQLite opens it: SQLite would
    delete the -wal and -shm beside it when closing, and they belong with it when it is moved aside."""
    if head and head != SQLITE_HEADER:
        raise DamagedIndex(f"{path!r}: file is not a database (it starts with {head[:8]!r})")


def _create_private(path: str) -> None:
    """Creates the database file 0640 when missing (takes the bits for others off one an older build
    created) and checks its header."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        mode = os.fstat(fd).st_mode & 0o777
        if mode & 0o007:
            with suppress(PermissionError):  # (another user's file: left as it is)
                os.fchmod(fd, mode & ~0o007)
        _check_header(path, os.pread(fd, len(SQLITE_HEADER), 0))
    finally:
        os.close(fd)


def _connect(target: str, uri: bool = False) -> sqlite3.Connection:
    return sqlite3.connect(target, isolation_level=None, check_same_thread=False, uri=uri)


class DiskIndex:
    def __init__(self, path: str) -> None:
        """Opens (creating it 0640) the index at `path` for reading and writing. DamagedIndex when the
        file is not an index of this build or SQLite finds it damaged on the way (a truncated or
        overwritten file is found here; damage deep inside only by verify())."""
        self.path = path
        _create_private(path)
        self._db = _connect(path)
        try:
            with _damage_as_damaged_index(path):
                self._db.execute("PRAGMA busy_timeout = 5000")
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise ValueError(f"{path!r}: SQLite refused WAL mode (got {mode!r}); "
                                     "is it on a network filesystem?")
                self._db.execute("PRAGMA synchronous = NORMAL")
                self._db.execute(f"PRAGMA wal_autocheckpoint = {WAL_PAGES}")
                self._db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
                self._prepare()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def in_memory(cls, source: str | None = None) -> DiskIndex:
        """A copy in memory of the index at `source`, read without writing anything beside it (empty
        when `source` is None): what a tier on a disk it may not write works on. Writes change only
        the copy. DamagedIndex as the constructor; OSError or sqlite3.OperationalError when it can't be read."""
        index = cls.__new__(cls)
        index.path = source or ":memory:"
        index._db = _connect(":memory:")
        try:
            with _damage_as_damaged_index(index.path):
                if source is not None:
                    _copy_read_only(source, index._db)
                index._prepare()
                index.verify()
        except BaseException:
            index._db.close()
            raise
        return index

    def _prepare(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise DamagedIndex(f"{self.path!r}: index schema version {version}, this build reads {SCHEMA_VERSION}")
        for table, columns in COLUMNS.items():
            found = [r[1] for r in self._db.execute(f"PRAGMA table_info({table})")]
            if found and found != columns:
                raise DamagedIndex(f"{self.path!r}: table {table} has columns {found}, expected {columns}")
        if version != SCHEMA_VERSION:
            self._db.executescript(SCHEMA)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def verify(self) -> None:
        """SQLite's quick_check of every page (~1.4 s per million rows, so only after an unclean
        shutdown); DamagedIndex when it finds anything wrong."""
        with _damage_as_damaged_index(self.path):
            problems = [r[0] for r in self._db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise DamagedIndex(f"{self.path!r}: {'; '.join(problems)}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself on some errors (SQLITE_FULL); a transaction left open would
            # make every later BEGIN fail, even once the disk has room again
            if self._db.in_transaction:
                with suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

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


def _copy_read_only(path: str, into: sqlite3.Connection) -> None:
    """Copies the database at `path` into `into` without writing beside it. A WAL database normally
    needs its -shm file (created when missing); where it can't be created (read-only disk) the file
    is read as immutable, which ignores a WAL left by an unclean shutdown (reconcile adopts its files)."""
    with open(path, "rb") as f:
        _check_header(path, f.read(len(SQLITE_HEADER)))
    last: sqlite3.OperationalError | None = None
    for flags in ("mode=ro", "immutable=1"):
        src = _connect(f"file:{quote(path)}?{flags}", uri=True)
        try:
            src.backup(into)
            return
        except sqlite3.OperationalError as exc:
            last = exc
        finally:
            src.close()
    assert last is not None
    raise last
