"""The disk tier's write path, ordered so that a crash or a fault at any step leaves a consistent tier.

    1. room    under the lock: evict for disk_bytes and free space, reserve the entry's size (diskroom.py)
    2. write   outside the lock: tmp/<key>.<random>.tmp, fsynced
    3. place   under the lock: rename into the shard, then commit the index row
    4. durable fsync the shard directory, so the rename survives a power cut

A kill between 3's rename and commit leaves a file without a row, which reconcile adopts after
verifying it; a tmp file is wiped by the next open. A failure leaves nothing: the tmp file is removed,
and a renamed file whose row could not be committed is unlinked (or, when even that fails, the index
is left unclean so the next open reconciles). The reservation keeps concurrent puts, whose files are
written outside the lock, from promising the same room twice.
"""

from __future__ import annotations

import os
import time
import uuid
from contextlib import suppress
from typing import TYPE_CHECKING

from cached_client.errors import CapacityError

from . import diskformat
from .diskroom import make_room
from .slot import TensorBytes

if TYPE_CHECKING:
    from .disk import DiskTier

__all__ = ["put"]


def put(tier: DiskTier, key: bytes, tensors: dict[str, TensorBytes], meta: dict[str, str]) -> int:
    """DiskTier.put: writes an entry through to disk; its size on disk."""
    path = tier._path(key)
    enc = diskformat.encode(key, tensors, meta, tier._codec)
    with tier._faults.capacity_errors(f"writing {key.hex()[:16]} ({enc.size} bytes)"):
        _check_fits(tier, enc.size)
        tmp = _write_reserved(tier, key, enc)
        with tier._lock:
            tier._reserved -= enc.size
            _commit(tier, key, path, tmp, enc, meta)
        if tier.durable:
            _fsync_dir(os.path.dirname(path))
    return enc.size


def _check_fits(tier: DiskTier, size: int) -> None:
    """CapacityError for a tier that takes no puts, or an entry larger than all of disk_bytes."""
    if not tier.writable:
        raise CapacityError(f"disk tier {tier.directory} is {tier.mode} ({tier.reason or 'by request'})")
    if size > tier.capacity:
        raise CapacityError(f"disk tier {tier.directory}: an entry of {size} bytes does not fit "
                            f"disk_bytes={tier.capacity}")


def _write_reserved(tier: DiskTier, key: bytes, enc: diskformat.Encoded) -> str:
    """Makes room for `enc`, then writes it to a tmp file; its path. The room stays reserved
    (tier._reserved) until the caller commits."""
    with tier._lock:
        tier._check_open()
        make_room(tier, enc.size)
        tier._reserved += enc.size
    try:
        return _write_tmp(tier, key, enc)
    except BaseException:
        with tier._lock:
            tier._reserved -= enc.size
        raise


def _write_tmp(tier: DiskTier, key: bytes, enc: diskformat.Encoded) -> str:
    tmp = os.path.join(tier._tmp_dir, f"{key.hex()}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        for chunk in enc.chunks:
            _write_all(fd, chunk)
        if tier.durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    return tmp


def _commit(tier: DiskTier, key: bytes, path: str, tmp: str, enc: diskformat.Encoded,
            meta: dict[str, str]) -> None:
    """Renames the written file into place and indexes it (lock held). On failure it removes what
    it placed, so that no file is left that the index does not know."""
    if tier._closed:
        _unlink_quietly(tmp)
        raise ValueError(f"disk tier {tier.directory!r} was closed during a write")
    try:
        had_row = tier._index.size_of(key) is not None
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    try:
        old = tier._index.upsert(key, enc.size, enc.raw_bytes, meta, time.time())
    except BaseException:
        if not had_row and not tier._unlink(path):  # (with a row, the file is known: a same-key entry)
            tier._faults.unclean = True
        raise
    tier._orphans.discard(key)  # its row is the new file's now
    tier._account([(key, *old)] if old else [], added=(enc.size, enc.raw_bytes))
    tier.counters["writes"] += 1


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        data = data[os.write(fd, data):]


def _unlink_quietly(path: str) -> None:
    with suppress(OSError):
        os.unlink(path)
