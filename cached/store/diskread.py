"""The disk tier's read path: find an entry through the index, map its file, verify it, count the hit.

A file is mapped read-only and decoded in place (diskformat.decode checks its checksum), so an
uncompressed entry is served without a copy and a half-written or damaged one is never served.
Every way a get can fail is a miss, and each leaves the tier more correct than it found it:

    what the get finds              action
    no row (or an orphaned one)     miss
    row, file gone                  drop the row (deleted by hand, lost to a power cut)
    file unreadable                 miss counted in read_errors (permissions, I/O error)
    file damaged                    remove it and its row, counted in "corrupt"

A hit moves the entry to the front of the LRU in memory only; the tier writes those access times
to the index in batches (TOUCH_BATCH hits or touch_interval_s), so a hit costs no write.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from typing import TYPE_CHECKING

from . import diskformat
from .diskformat import CorruptEntry
from .slot import TensorBytes

if TYPE_CHECKING:
    from .disk import DiskTier

__all__ = ["get", "map_file", "TOUCH_BATCH"]

log = logging.getLogger(__name__)

TOUCH_BATCH = 1024


def get(tier: DiskTier, key: bytes) -> tuple[dict[str, TensorBytes], dict[str, str]] | None:
    """DiskTier.get: (tensors, meta) of a verified entry, or None."""
    path = tier._path(key)
    with tier._lock:
        tier._check_open()
        if not tier._known(key):
            tier.counters["misses"] += 1
            return None
    try:
        buf, st = map_file(path)
    except FileNotFoundError:
        _forget_missing(tier, key)
        return None
    except OSError as exc:  # unreadable (permissions, I/O error): a miss
        with tier._lock:
            tier.counters["misses"] += 1
            tier._faults.note("read_errors", f"reading {path}", exc)
        return None
    try:
        entry = diskformat.decode(buf, key)
    except CorruptEntry as exc:
        _drop_corrupt(tier, key, path, st, exc)
        return None
    _touch(tier, key)
    return entry


def map_file(path: str) -> tuple[memoryview, os.stat_result]:
    """A read-only map of the whole file (empty for an empty file) and its stat, taken from the
    same open file, so the stat describes the bytes mapped."""
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


def _forget_missing(tier: DiskTier, key: bytes) -> None:
    """A row whose file is gone (deleted by hand, or lost to a power cut): drop the row."""
    with tier._lock:
        tier.counters["misses"] += 1
        if not tier._closed and not os.path.exists(tier._path(key)):
            tier._forget_quietly([key])


def _drop_corrupt(tier: DiskTier, key: bytes, path: str, st: os.stat_result, exc: CorruptEntry) -> None:
    """Removes a damaged file and its row, unless a fresh copy was written over it since it was read."""
    log.warning("disk tier: removing damaged entry %s: %s", path, exc)
    with tier._lock:
        tier.counters["corrupt"] += 1
        tier.counters["misses"] += 1
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return
        if tier._closed:
            return
        if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):  # not a fresh copy written since
            if tier._unlink(path) or not tier.writable:  # (read-only: forgotten by the copy in memory)
                tier._forget_quietly([key])


def _touch(tier: DiskTier, key: bytes) -> None:
    """Counts a hit and moves `key` to the front of the LRU, flushing access times when a batch is due."""
    with tier._lock:
        tier.counters["hits"] += 1
        if tier._closed:  # closed while the file was read
            return
        tier._touches[key] = time.time()
        if len(tier._touches) >= TOUCH_BATCH or time.monotonic() - tier._last_flush >= tier._touch_interval:
            tier._flush_touches()
