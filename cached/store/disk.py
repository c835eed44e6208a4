"""The disk tier: entries that survive daemon restarts, reboots and kill -9, bounded by LRU eviction.

    <directory>/
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
get that finds it missing.

Hits update the LRU clock in memory; those access times reach the index in batches (every
`touch_interval_s` or 1024 hits), so a hit costs no write. All methods are thread-safe: index calls
run under one lock, file reads and writes outside it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cached_client.errors import CapacityError

from . import compress, diskformat
from .diskformat import CorruptEntry
from .diskindex import DiskIndex
from .slot import TensorBytes

__all__ = ["DiskTier", "DiskEntry"]

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
TOUCH_BATCH = 1024
EVICT_BATCH = 64


@dataclass(frozen=True)
class DiskEntry:
    """What the index knows of one entry (for eviction filters and listings)."""

    key: bytes
    size: int
    raw_bytes: int
    meta: dict[str, str]
    atime: float


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        data = data[os.write(fd, data):]


def _hold_lock(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ValueError(f"disk_dir {os.path.dirname(path)!r} is in use by another process (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


class DiskTier:
    """Entries on local disk under `directory`, at most `capacity_bytes` of files, LRU-evicted."""

    def __init__(self, directory: str, capacity_bytes: int, compression: str = "lz4", *,
                 touch_interval_s: float = 1.0, durable: bool = True) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"disk_bytes must be a positive int, got {capacity_bytes!r}")
        if compression not in compress.MODES:
            raise ValueError(f"compression must be one of {sorted(compress.MODES)}, got {compression!r}")
        self.directory = os.path.abspath(directory)
        self.capacity = capacity_bytes
        self.compression = compression
        self.durable = durable  # False skips fsync: for benchmarks and tests that fill a tier fast
        self._codec = compress.MODES[compression]
        self._touch_interval = touch_interval_s
        self._entries_dir = os.path.join(self.directory, "entries")
        self._tmp_dir = os.path.join(self.directory, "tmp")
        os.makedirs(self._entries_dir, exist_ok=True)
        self._lock_fd: int | None = _hold_lock(os.path.join(self.directory, "lock"))
        self._lock = threading.Lock()
        self._touches: dict[bytes, float] = {}
        self._last_flush = time.monotonic()
        self._reserved = 0
        self.counters = dict.fromkeys(("hits", "misses", "writes", "corrupt", "evictions", "evicted_bytes"), 0)
        try:
            self._open()
        except BaseException:
            self._release_lock()
            raise

    def _open(self) -> None:
        wiped = self._wipe_tmp()
        for i in range(256):
            os.makedirs(os.path.join(self._entries_dir, f"{i:02x}"), exist_ok=True)
        self._index = DiskIndex(os.path.join(self.directory, "index.sqlite"))
        state = self._index.get_state("clean")
        self._index.set_state("clean", "0")
        self.entries, self.bytes, self.raw_bytes = self._index.totals()
        if state != "1":  # None: a new index, maybe beside files whose index was deleted
            if state == "0":
                log.warning("disk tier %s was not closed cleanly; reconciling index and files", self.directory)
            self.reconcile()
        if self.bytes > self.capacity:  # disk_bytes was lowered since the last run
            with self._lock:
                self._evict_lru(self.bytes - self.capacity)
        log.info("disk tier %s: %d entries, %d of %d bytes, compression %s%s", self.directory, self.entries,
                 self.bytes, self.capacity, self.compression, f", {wiped} unfinished write(s) removed" if wiped else "")

    def _wipe_tmp(self) -> int:
        n = len(os.listdir(self._tmp_dir)) if os.path.isdir(self._tmp_dir) else 0
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        os.makedirs(self._tmp_dir)
        return n

    def _path(self, key: bytes) -> str:
        if len(key) != 32:
            raise ValueError(f"key must be 32 bytes, got {len(key)}")
        hexkey = key.hex()
        return os.path.join(self._entries_dir, hexkey[:2], hexkey + SUFFIX)

    def _check_open(self) -> None:
        if self._lock_fd is None:
            raise ValueError(f"disk tier {self.directory!r} is closed")

    # reads

    def contains(self, key: bytes) -> bool:
        self._path(key)
        with self._lock:
            self._check_open()
            return self._index.size_of(key) is not None

    def get(self, key: bytes) -> tuple[dict[str, TensorBytes], dict[str, str]] | None:
        """(tensors, meta) of a verified entry, or None. Tensors of an uncompressed entry are views of
        a read-only mmap of its file; those of a compressed one views of one decoded buffer."""
        path = self._path(key)
        with self._lock:
            self._check_open()
            known = self._index.size_of(key) is not None
            if not known:
                self.counters["misses"] += 1
                return None
        try:
            buf, st = self._map(path)
        except FileNotFoundError:
            self._forget(key)
            return None
        try:
            entry = diskformat.decode(buf, key)
        except CorruptEntry as exc:
            self._drop_corrupt(key, path, st, exc)
            return None
        self._touch(key)
        return entry

    @staticmethod
    def _map(path: str) -> tuple[memoryview, os.stat_result]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not st.st_size:
                return memoryview(b""), st
            mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        mm.madvise(mmap.MADV_WILLNEED)
        return memoryview(mm), st

    def _forget(self, key: bytes) -> None:
        """A row whose file is gone (deleted by hand, or lost to a power cut): drop the row."""
        with self._lock:
            self.counters["misses"] += 1
            if self._lock_fd is not None and not os.path.exists(self._path(key)):
                self._account(self._index.delete([key]))

    def _drop_corrupt(self, key: bytes, path: str, st: os.stat_result, exc: CorruptEntry) -> None:
        log.warning("disk tier: removing damaged entry %s: %s", path, exc)
        with self._lock:
            self.counters["corrupt"] += 1
            self.counters["misses"] += 1
            try:
                now = os.stat(path)
            except FileNotFoundError:
                return
            if self._lock_fd is None:
                return
            if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):  # not a fresh copy written since
                os.unlink(path)
                self._account(self._index.delete([key]))

    def _touch(self, key: bytes) -> None:
        with self._lock:
            self.counters["hits"] += 1
            if self._lock_fd is None:  # closed while the file was read
                return
            self._touches[key] = time.time()
            if len(self._touches) >= TOUCH_BATCH or time.monotonic() - self._last_flush >= self._touch_interval:
                self._flush_touches()

    def _flush_touches(self) -> None:
        if self._touches:
            self._index.touch(self._touches)
            self._touches = {}
        self._last_flush = time.monotonic()

    # writes

    def put(self, key: bytes, tensors: dict[str, TensorBytes], meta: dict[str, str]) -> int:
        """Writes an entry through to disk (replacing any entry of that key); its size on disk.

        CapacityError if the entry alone is larger than the tier, or the disk is full even after
        evicting; ValueError for a bad key, dtype, shape or meta.
        """
        path = self._path(key)
        enc = diskformat.encode(key, tensors, meta, self._codec)
        if enc.size > self.capacity:
            raise CapacityError(f"disk tier {self.directory}: an entry of {enc.size} bytes does not fit "
                                f"disk_bytes={self.capacity}")
        tmp = self._write_reserved(key, enc)
        with self._lock:
            self._reserved -= enc.size
            if self._lock_fd is None:
                os.unlink(tmp)
                raise ValueError(f"disk tier {self.directory!r} was closed during a write")
            os.replace(tmp, path)
            old = self._index.upsert(key, enc.size, enc.raw_bytes, meta, time.time())
            self._account([(key, *old)] if old else [], added=(enc.size, enc.raw_bytes))
            self.counters["writes"] += 1
        if self.durable:
            _fsync_dir(os.path.dirname(path))
        return enc.size

    def _write_reserved(self, key: bytes, enc: diskformat.Encoded) -> str:
        """Makes room for `enc` (evicting LRU entries), then writes it to a tmp file; its path."""
        for attempt in range(2):
            with self._lock:
                self._check_open()
                self._evict_lru(self.bytes + self._reserved + enc.size - self.capacity
                                if attempt == 0 else 2 * enc.size)
                self._reserved += enc.size
            try:
                return self._write_tmp(key, enc)
            except OSError as exc:
                with self._lock:
                    self._reserved -= enc.size
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                log.warning("disk tier %s: disk full writing %d bytes (attempt %d)", self.directory, enc.size, attempt + 1)
        free = shutil.disk_usage(self.directory).free
        raise CapacityError(f"disk tier {self.directory}: no space left on the device ({free} bytes free) "
                            f"even after evicting; lower disk_bytes or free the disk")

    def _write_tmp(self, key: bytes, enc: diskformat.Encoded) -> str:
        tmp = os.path.join(self._tmp_dir, f"{key.hex()}.{uuid.uuid4().hex[:12]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            for chunk in enc.chunks:
                _write_all(fd, chunk)
            if self.durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _account(self, removed: Iterable[tuple[bytes, int, int]], added: tuple[int, int] = (0, 0)) -> None:
        for _, size, raw in removed:
            self.entries -= 1
            self.bytes -= size
            self.raw_bytes -= raw
        if added != (0, 0):
            self.entries += 1
            self.bytes += added[0]
            self.raw_bytes += added[1]

    # eviction

    def _evict_lru(self, need: int) -> None:
        """Drops least recently used entries until `need` bytes are freed (lock held)."""
        if need <= 0:
            return
        self._flush_touches()
        while need > 0:
            victims = self._index.oldest(EVICT_BATCH)
            if not victims:
                return
            for key, _ in victims:
                need -= self._drop([key])[1]
                if need <= 0:
                    return

    def _drop(self, keys: Iterable[bytes]) -> tuple[int, int]:
        """Unlinks the files, then deletes the rows (lock held): (entries, bytes) dropped."""
        keys = list(keys)
        for key in keys:
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass
        gone = self._index.delete(keys)
        self._account(gone)
        freed = sum(size for _, size, _ in gone)
        self.counters["evictions"] += len(gone)
        self.counters["evicted_bytes"] += freed
        return len(gone), freed

    def list_entries(self) -> list[DiskEntry]:
        """Every entry, least recently used first (for `cachectl ls` and eviction filters)."""
        with self._lock:
            self._check_open()
            self._flush_touches()
            rows = self._index.rows()
        return [DiskEntry(key, size, raw, json.loads(meta), atime) for key, size, raw, meta, atime in rows]

    def evict(self, match: Callable[[DiskEntry], bool]) -> tuple[int, int]:
        """Drops the entries for which `match` is true: (entries, bytes freed)."""
        keys = [e.key for e in self.list_entries() if match(e)]
        with self._lock:
            self._check_open()
            return self._drop(keys)

    def evict_all(self) -> tuple[int, int]:
        with self._lock:
            self._check_open()
            return self._drop(self._index.keys())

    # repair, stats, lifetime

    def reconcile(self) -> dict[str, int]:
        """Makes the index and the files agree (after an unclean shutdown): drops rows without a
        file, adopts verified files without a row and removes damaged ones. Counts of each."""
        from .diskrepair import reconcile

        return reconcile(self)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": self.entries, "bytes": self.bytes, "raw_bytes": self.raw_bytes,
                    "capacity_bytes": self.capacity, **self.counters}

    def close(self) -> None:
        """Flushes access times, records a clean close and releases the directory. Idempotent."""
        with self._lock:
            if self._lock_fd is None:
                return
            self._flush_touches()
            self._index.set_state("clean", "1")
            self._index.checkpoint()
            self._index.close()
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
