"""Opening the disk tier's directory, and making its index and files agree again: after an unclean
shutdown, and after the index itself was damaged.

Opening read-write takes the directory's lock, wipes tmp/, opens the index and, when the last close
was not clean, reconciles. Opening degraded (a disk the tier may not write) works on a copy of the
index in memory and writes nothing; "off" touches no file at all.

What a kill -9, a power cut or a bad disk can leave, and what happens to it:

    state                               cause                                       action
    row, no file                        file deleted by hand; power cut lost it     drop the row
    file, no row                        killed between rename and index commit      verify; adopt or remove
    file in tmp/                        killed mid-write                            (wiped by every open)
    index.sqlite damaged                garbage, truncated, another schema/version  moved aside, rebuilt
                                                                                    from the verified files

reconcile lists the 256 shard directories by name only (no stat, no read) and reads just the files
that have no row, so it costs about one directory listing even for a large tier. A damaged index is
renamed to index.sqlite.damaged-<time> (with its -wal and -shm, so SQLite never replays an old WAL
into the new database) and a new one is filled by reconcile, which then reads and verifies every file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from contextlib import suppress
from typing import TYPE_CHECKING

from . import diskformat
from .diskformat import CorruptEntry
from .diskindex import FAULTS, DiskIndex, is_damage

if TYPE_CHECKING:
    from .disk import DiskTier

__all__ = ["DirectoryInUse", "open_read_write", "open_degraded", "reconcile", "scan_files", "move_aside"]

log = logging.getLogger(__name__)

INDEX = "index.sqlite"


class DirectoryInUse(ValueError):
    """Another process holds the lock of the tier's directory."""


def _hold_lock(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DirectoryInUse(f"disk_dir {os.path.dirname(path)!r} is in use by another process (pid {holder})") from None
    with suppress(OSError):  # the pid is for people; a full disk must not stop the open
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _wipe_tmp(tmp_dir: str) -> int:
    n = len(os.listdir(tmp_dir)) if os.path.isdir(tmp_dir) else 0
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir, 0o750)
    return n


def open_read_write(tier: DiskTier) -> None:
    """Locks the directory (creating it 0750), wipes tmp/, opens the index (rebuilding a damaged
    one), reconciles after an unclean close and evicts down to disk_bytes. On failure it releases
    what it took and raises."""
    os.makedirs(tier.directory, 0o750, exist_ok=True)
    os.makedirs(tier._entries_dir, 0o750, exist_ok=True)
    tier._lock_fd = _hold_lock(os.path.join(tier.directory, "lock"))
    try:
        wiped = _wipe_tmp(tier._tmp_dir)
        for i in range(256):
            os.makedirs(os.path.join(tier._entries_dir, f"{i:02x}"), 0o750, exist_ok=True)
        tier._index, state = open_index(tier)
        try:
            _reconcile_unless_clean(tier, state)
            if tier.bytes > tier.capacity:  # disk_bytes was lowered since the last run
                with tier._lock:
                    tier._evict_lru(tier.bytes - tier.capacity)
        except BaseException:
            tier._index.close()
            raise
    except BaseException:
        tier._release_lock()
        raise
    log.info("disk tier %s: %d entries, %d of %d bytes, compression %s%s", tier.directory, tier.entries,
             tier.bytes, tier.capacity, tier.compression, f", {wiped} unfinished write(s) removed" if wiped else "")


def open_degraded(tier: DiskTier) -> None:
    """Read-only: a copy of the index in memory, checked against the files when the last close was
    not clean; raises when the directory can't be listed. Off: an empty index, no file touched."""
    if tier.mode == "off":
        tier._index = DiskIndex.in_memory()
        return
    os.listdir(tier.directory)
    tier._index, state = open_snapshot(tier)
    tier.entries, tier.bytes, tier.raw_bytes = tier._index.totals()
    _reconcile_unless_clean(tier, state)


def _reconcile_unless_clean(tier: DiskTier, state: str | None) -> None:
    if state != "1":  # None: a new index, maybe beside files whose index was deleted
        if state == "0":
            log.warning("disk tier %s was not closed cleanly; reconciling index and files", tier.directory)
        reconcile(tier)


def scan_files(entries_dir: str, suffix: str) -> dict[bytes, str]:
    """key -> path of every entry file under the shard directories (names only); none when there
    is no entries directory yet."""
    found: dict[bytes, str] = {}
    if not os.path.isdir(entries_dir):
        return found
    for shard in os.scandir(entries_dir):
        if not shard.is_dir(follow_symlinks=False):
            continue
        for f in os.scandir(shard.path):
            stem = f.name[:-len(suffix)]
            if f.name.endswith(suffix) and len(stem) == 64:
                try:
                    found[bytes.fromhex(stem)] = f.path
                except ValueError:
                    pass
    return found


def _adopt(tier: DiskTier, key: bytes, path: str) -> str:
    """Indexes a file that has no row (lock held): "adopted", "removed" (damaged) or "skipped"."""
    if tier._index.size_of(key) is not None:
        return "skipped"  # written since the listing
    try:
        buf, st = tier._map(path)
    except OSError:  # gone since the listing, or unreadable
        return "skipped"
    try:
        tensors, meta = diskformat.decode(buf, key)
    except CorruptEntry as exc:
        log.warning("disk tier: removing damaged unindexed file %s: %s", path, exc)
        tier.counters["corrupt"] += 1
        return "removed" if tier._unlink(path) else "skipped"
    raw = sum(t.nbytes for t in tensors.values())
    tier._index.upsert(key, st.st_size, raw, meta, st.st_mtime)
    return "adopted"


def reconcile(tier: DiskTier) -> dict[str, int]:
    with tier._lock:
        tier._check_open()
        tier._flush_touches()
        indexed = tier._index.keys()
    files = scan_files(tier._entries_dir, ".safetensors")
    counts = {"files": len(files), "rows": len(indexed), "adopted": 0, "removed": 0, "dropped_rows": 0}
    with tier._lock:
        gone = [k for k in indexed - files.keys() if not os.path.exists(tier._path(k))]
        counts["dropped_rows"] = len(tier._index.delete(gone))
        for key in files.keys() - indexed:
            outcome = _adopt(tier, key, files[key])
            if outcome in counts:
                counts[outcome] += 1
        tier.entries, tier.bytes, tier.raw_bytes = tier._index.totals()
    log.info("disk tier %s reconciled: %s", tier.directory, counts)
    return counts


def move_aside(path: str) -> str:
    """Renames a damaged database and its -wal and -shm to <path>.damaged-<time>; the new name."""
    aside = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 0
    while os.path.exists(aside if not n else f"{aside}.{n}"):
        n += 1
    aside = aside if not n else f"{aside}.{n}"
    for suffix in ("-wal", "-shm", ""):  # the WAL first: it must never meet a new database
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    return aside


def open_index(tier: DiskTier) -> tuple[DiskIndex, str | None]:
    """The tier's index, opened for writing and marked not cleanly closed, and the "clean" state it
    had. One that is damaged (checked page by page when the last close was not clean) is moved aside
    with a WARNING and replaced by an empty one (state None, so the caller reconciles)."""
    path = os.path.join(tier.directory, INDEX)
    try:
        return _open_checked(tier, path)
    except Exception as exc:
        if not is_damage(exc):
            raise
        aside = move_aside(path)
        log.warning("disk tier %s: the index is damaged (%s); moved it to %s and rebuilding it from the entry "
                    "files", tier.directory, exc, aside)
    return _open_checked(tier, path)


def _open_checked(tier: DiskTier, path: str) -> tuple[DiskIndex, str | None]:
    index = DiskIndex(path)
    try:
        state = index.get_state("clean")
        if state != "1":
            index.verify()
        # reads every row: a damaged table is found now, not by the first put
        tier.entries, tier.bytes, tier.raw_bytes = index.totals()
        index.set_state("clean", "0")
    except BaseException:
        index.close()
        raise
    return index, state


def open_snapshot(tier: DiskTier) -> tuple[DiskIndex, str | None]:
    """A copy in memory of the tier's index, for a tier that may not write its directory, and its
    "clean" state; an empty copy (state None, so the caller reconciles) when the index is missing,
    unreadable or damaged (WARNING)."""
    path = os.path.join(tier.directory, INDEX)
    if os.path.exists(path):
        try:
            index = DiskIndex.in_memory(path)
            return index, index.get_state("clean")
        except Exception as exc:
            if not (is_damage(exc) or isinstance(exc, FAULTS)):
                raise
            log.warning("disk tier %s: the index is %s (%s); serving from a copy rebuilt in memory from the "
                        "entry files", tier.directory, "damaged" if is_damage(exc) else "unreadable", exc)
    return DiskIndex.in_memory(), None
