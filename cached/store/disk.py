"""The disk tier: entries that survive daemon restarts, reboots and kill -9, bounded by LRU eviction.

    <directory>/                   0750; every file in it 0640, whatever the umask
        lock                       flock held by the one DiskTier using the directory (pid inside)
        index.sqlite (-wal, -shm)  the index: key, size, meta, last access (diskindex.py)
        entries/00/ .. entries/ff/ <key hex>.safetensors, sharded by the key's first byte (diskformat.py)
        tmp/                       files being written; wiped at every open

A write goes to tmp/, is fsynced, renamed into its shard, the shard directory fsynced, and only then
is its index row committed. Reads find entries through the index and verify each file's checksum, so a
half-written or damaged file is never served: a damaged one is removed and counted ("corrupt").

Opening never lists the 100,000 files of a big tier: it wipes tmp/ (in-flight writes only) and reads
two aggregates from the index. The index records a clean close; when the last close was not clean
(kill -9, power loss) open also runs reconcile(): one listing of the shard directories (names only,
no stat) that drops rows whose file is gone and adopts, after verifying it, any file renamed into
place just before the crash and never committed. A row whose file vanished later is dropped by the
get that finds it missing. A damaged index is moved aside and rebuilt from the files (diskrepair.py).

Faults degrade the tier, never the daemon:
- A write that fails (disk full, quota, read-only, permissions, SQLite "database or disk is full")
  is a CapacityError counted in stats()["write_errors"] and logged at most once a minute; it leaves
  no temp file, no file without a row and no row it could not keep. Room is made by LRU eviction for
  both disk_bytes and what the filesystem really has free (FREE_RESERVE kept for the index's WAL),
  and only where eviction can give it: space taken by other files is not chased (diskroom.py).
- open_or_degrade() opens a directory it can't write read-only (an in-memory copy of the index),
  and one it can't read either "off" (every get a miss), with one WARNING saying why.
- close() never raises; a step that fails leaves the index marked unclean, so the next open repairs.

Hits update the LRU clock in memory; those access times reach the index in batches (every
`touch_interval_s` or 1024 hits), so a hit costs no write. All methods are thread-safe: index calls
run under one lock, file reads and writes outside it.

DiskTier holds the tier's state, its public methods and the index bookkeeping they share; each path
through it lives in its own module: diskread.py (get), diskwrite.py (put), diskroom.py (what to evict
for room), diskfaults.py (counting and logging faults), diskrepair.py (open, reconcile, rebuild).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import compress, diskread, diskroom, diskwrite
from .diskfaults import FaultLog
from .diskindex import FAULTS, DiskIndex
from .diskrepair import DirectoryInUse, open_degraded, open_read_write
from .slot import TensorBytes

__all__ = ["DiskTier", "DiskEntry", "DirectoryInUse", "MODES"]

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
MODES = ("read-write", "read-only", "off")


@dataclass(frozen=True)
class DiskEntry:
    """What the index knows of one entry (for eviction filters and listings)."""

    key: bytes
    size: int
    raw_bytes: int
    meta: dict[str, str]
    atime: float


def _check_arguments(capacity_bytes: int, compression: str, mode: str) -> None:
    if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
        raise ValueError(f"disk_bytes must be a positive int, got {capacity_bytes!r}")
    if compression not in compress.MODES:
        raise ValueError(f"compression must be one of {sorted(compress.MODES)}, got {compression!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")


class DiskTier:
    """Entries on local disk under `directory`, at most `capacity_bytes` of files, LRU-evicted.

    `mode` "read-write" raises when the directory can't be used; "read-only" serves what is there
    from an in-memory copy of the index and refuses puts; "off" serves nothing. open_or_degrade()
    picks the first that works."""

    _index: DiskIndex  # opened by diskrepair.open_read_write or open_degraded

    def __init__(self, directory: str, capacity_bytes: int, compression: str = "lz4", *,
                 touch_interval_s: float = 1.0, durable: bool = True, mode: str = "read-write") -> None:
        _check_arguments(capacity_bytes, compression, mode)
        self.directory = os.path.abspath(directory)
        self.capacity = capacity_bytes
        self.compression = compression
        self.durable = durable  # False skips fsync: for benchmarks and tests that fill a tier fast
        self.mode = mode
        self.reason = ""  # why the tier is not read-write (open_or_degrade)
        self._codec = compress.MODES[compression]
        self._touch_interval = touch_interval_s
        self._entries_dir = os.path.join(self.directory, "entries")
        self._tmp_dir = os.path.join(self.directory, "tmp")
        self._lock = threading.Lock()
        self._closed = False
        self._lock_fd: int | None = None
        self._touches: dict[bytes, float] = {}
        self._last_flush = time.monotonic()
        self._reserved = 0  # bytes of puts that made room and are still writing (diskwrite.py)
        self._futile_until = 0.0  # monotonic time until which evicting for the filesystem is pointless
        self.counters = dict.fromkeys(("hits", "misses", "writes", "corrupt", "evictions", "evicted_bytes",
                                       "write_errors", "read_errors"), 0)
        self._faults = FaultLog(self.directory, self.counters, self._lock)
        self.entries = self.bytes = self.raw_bytes = 0
        self._orphans: set[bytes] = set()  # rows whose file is removed but whose delete failed: never served
        (open_read_write if mode == "read-write" else open_degraded)(self)

    @classmethod
    def open_or_degrade(cls, directory: str, capacity_bytes: int, compression: str = "lz4", *,
                        touch_interval_s: float = 1.0, durable: bool = True) -> DiskTier:
        """The tier on `directory`, read-write; where that fails for a reason of the disk (read-only,
        full, permissions, in use by another process, not a directory) the same tier read-only, and
        where it can't be read either the tier "off". One WARNING says which and why. Raises only for
        bad arguments: what the daemon calls, so a bad disk never stops it."""
        _check_arguments(capacity_bytes, compression, "read-write")
        reasons: list[str] = []
        for mode in MODES:
            try:
                tier = cls(directory, capacity_bytes, compression, mode=mode, touch_interval_s=touch_interval_s,
                           durable=durable)
            except (*FAULTS, ValueError) as exc:
                reasons.append(f"cannot {'write' if mode == 'read-write' else 'read'} it: {exc}")
                continue
            if reasons:
                tier.reason = "; ".join(reasons)
                log.warning("disk tier %s is %s (%s): %s", tier.directory, mode, tier.reason,
                            "its entries are served, new ones stay in shared memory only" if mode == "read-only"
                            else "entries are served from shared memory only")
            return tier
        raise AssertionError("mode 'off' always opens")

    @property
    def writable(self) -> bool:
        return self.mode == "read-write"

    def _path(self, key: bytes) -> str:
        if len(key) != 32:
            raise ValueError(f"key must be 32 bytes, got {len(key)}")
        hexkey = key.hex()
        return os.path.join(self._entries_dir, hexkey[:2], hexkey + SUFFIX)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"disk tier {self.directory!r} is closed")

    # index bookkeeping, shared by reads, writes, eviction and repair (lock held)

    def _unlink(self, path: str) -> bool:
        """Removes an entry file (lock held); False, counted, when it is still there."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._faults.note("write_errors", f"removing {path}", exc)
            return False
        return True

    def _forget_rows(self, keys: Iterable[bytes]) -> list[tuple[bytes, int, int]]:
        """Deletes the rows of files that are gone, with those whose delete failed before (lock held):
        (key, size, raw) of the rows deleted. Raises what the index raises (a full disk); the rows are
        then kept aside, never served, and deleted by the next call."""
        self._orphans.update(keys)
        gone = self._index.delete(self._orphans)
        self._orphans.clear()
        self._account(gone)
        return gone

    def _forget_quietly(self, keys: list[bytes]) -> None:
        """_forget_rows on the read path: a failure is only counted."""
        try:
            self._forget_rows(keys)
        except FAULTS as exc:
            self._faults.note("write_errors", "dropping index rows", exc)

    def _account(self, removed: Iterable[tuple[bytes, int, int]], added: tuple[int, int] = (0, 0)) -> None:
        for _, size, raw in removed:
            self.entries -= 1
            self.bytes -= size
            self.raw_bytes -= raw
        if added != (0, 0):
            self.entries += 1
            self.bytes += added[0]
            self.raw_bytes += added[1]

    def _known(self, key: bytes) -> bool:
        """Whether the index has a row for `key` (lock held); an index that can't be read knows nothing."""
        try:
            return key not in self._orphans and self._index.size_of(key) is not None
        except FAULTS as exc:
            self._faults.note("read_errors", "reading the index", exc)
            return False

    def _flush_touches(self) -> None:
        """Writes the batched access times (lock held); ones that can't be written are dropped (counted)."""
        touches, self._touches = self._touches, {}
        self._last_flush = time.monotonic()
        if touches:
            try:
                self._index.touch(touches)
            except FAULTS as exc:
                self._faults.note("write_errors", "writing access times", exc)

    # reads and writes

    _map = staticmethod(diskread.map_file)  # (diskrepair reads the files it adopts with it)

    def contains(self, key: bytes) -> bool:
        self._path(key)
        with self._lock:
            self._check_open()
            return self._known(key)

    def get(self, key: bytes) -> tuple[dict[str, TensorBytes], dict[str, str]] | None:
        """(tensors, meta) of a verified entry, or None. Tensors of an uncompressed entry are views of
        a read-only mmap of its file; those of a compressed one views of one decoded buffer."""
        return diskread.get(self, key)

    def put(self, key: bytes, tensors: dict[str, TensorBytes], meta: dict[str, str]) -> int:
        """Writes an entry through to disk (replacing any entry of that key); its size on disk.

        CapacityError when it can't be stored: larger than the tier, no room on the filesystem even
        after the eviction that can help, a disk or index that can't be written (read-only, full,
        permissions), or a tier that is not read-write. Counted in stats()["write_errors"]; nothing
        of the write is left behind. ValueError for a bad key, dtype, shape or meta.
        """
        return diskwrite.put(self, key, tensors, meta)

    # eviction

    def _evict_lru(self, need: int) -> int:
        """diskroom.evict_lru (lock held); diskrepair evicts down to a lowered disk_bytes with it."""
        return diskroom.evict_lru(self, need)

    def _drop(self, keys: Iterable[bytes]) -> tuple[int, int]:
        """Unlinks the files, then deletes the rows of those that are gone (lock held): (entries,
        bytes) dropped. A file that can't be removed keeps its row."""
        gone = self._forget_rows([key for key in keys if self._unlink(self._path(key))])
        freed = sum(size for _, size, _ in gone)
        self.counters["evictions"] += len(gone)
        self.counters["evicted_bytes"] += freed
        return len(gone), freed

    def list_entries(self) -> list[DiskEntry]:
        """Every entry, least recently used first (for `cachectl ls` and eviction filters)."""
        with self._lock:
            self._check_open()
            self._flush_touches()
            rows = [row for row in self._index.rows() if row[0] not in self._orphans]
        return [DiskEntry(key, size, raw, json.loads(meta), atime) for key, size, raw, meta, atime in rows]

    def evict(self, match: Callable[[DiskEntry], bool]) -> tuple[int, int]:
        """Drops the entries for which `match` is true: (entries, bytes freed). CapacityError when
        the index can't be written; files that can't be removed (read-only disk) stay, not counted."""
        keys = [e.key for e in self.list_entries() if match(e)]
        with self._faults.capacity_errors("evicting"), self._lock:
            self._check_open()
            return self._drop(keys)

    def evict_all(self) -> tuple[int, int]:
        with self._faults.capacity_errors("evicting"), self._lock:
            self._check_open()
            return self._drop(self._index.keys())

    # repair, stats, lifetime

    def reconcile(self) -> dict[str, int]:
        """Makes the index and the files agree (after an unclean shutdown): drops rows without a
        file, adopts verified files without a row and removes damaged ones. Counts of each."""
        from .diskrepair import reconcile

        return reconcile(self)

    def stats(self) -> dict[str, int]:
        """Sizes and counters; `read_only` is 1 when puts are refused (read-only or off), `off` 1 when
        the tier serves nothing."""
        with self._lock:
            return {"entries": self.entries, "bytes": self.bytes, "raw_bytes": self.raw_bytes,
                    "capacity_bytes": self.capacity, **self.counters,
                    "read_only": int(not self.writable), "off": int(self.mode == "off")}

    def close(self) -> None:
        """Flushes access times, records a clean close and releases the directory. Idempotent. Never
        raises: a step that fails (a full or read-only disk) is logged in one line and the others
        still run; the index then stays marked unclean, so the next open reconciles."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            failed: list[str] = []
            try:
                for what, step in self._close_steps():
                    try:
                        step()
                    except Exception as exc:  # each step runs whatever the others did
                        self._faults.unclean = True
                        failed.append(f"{what}: {exc}")
            finally:
                self._release_lock()
            if failed:
                log.warning("disk tier %s closed, but %s; the next open reconciles", self.directory,
                            "; ".join(failed))

    def _close_steps(self) -> list[tuple[str, Callable[[], object]]]:
        """What close() runs, in order: a tier that may not write only closes its index."""
        steps: list[tuple[str, Callable[[], object]]] = [
            ("writing access times", self._flush_touches),
            ("dropping rows of removed files", lambda: self._orphans and self._forget_rows(())),
            ("recording a clean close", self._mark_clean),
            ("checkpointing the index", self._index.checkpoint),
        ] if self.writable else []
        return [*steps, ("closing the index", self._index.close)]

    def _mark_clean(self) -> None:
        """Records a clean close, unless something was left for the next open to reconcile."""
        if not self._faults.unclean:
            self._index.set_state("clean", "1")

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
