"""The stamp of a source file: what proves it unchanged since its content was hashed.

A stamp is (dev, inode, size, mtime_ns, ctime_ns). Size and mtime alone miss a same-size rewrite
whose tool restores the mtime (rsync -t, cp -p, many dataset tools); the ctime cannot be set from
user space, and every write, rename into place, chmod or utime moves it. A changed stamp only costs
a rehash: the key is the content's digest, so an unchanged file keeps its key.

The ctime is kept with the resolution of the kernel's clock tick (a few ms on kernels without
fine-grained timestamps, a second or more on some filesystems), so a file changed twice within one
tick can keep its stamp. A stamp taken within RACY_NS of the file's last change is therefore not
trusted (the same rule as git's "racy" index entries): `source_stamp` returns None and whoever
remembers digests against stamps rehashes next time instead.

Both the daemon (its digest and key memos) and the client (its handle cache) use this one function.
"""

from __future__ import annotations

import os
import time

from .specs import OBJECT_SCHEME

__all__ = ["Stamp", "source_stamp", "stamp_of", "unchanged", "matches", "RACY_NS"]

RACY_NS = 2_000_000_000  # coarser than any filesystem's timestamp granularity in use (FAT's 2 s)

Stamp = tuple[int, int, int, int, int]


def stamp_of(st: os.stat_result, now_ns: int | None = None) -> Stamp | None:
    """The stamp of a stat result; None when it is too recent to be trusted."""
    now = time.time_ns() if now_ns is None else now_ns
    if now - max(st.st_ctime_ns, st.st_mtime_ns) < RACY_NS:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def source_stamp(path: str) -> Stamp | None:
    """The stamp of the file at `path`; None when it can't be stat'ed or changed too recently, and
    for an object (s3://...): the daemon tells its versions apart by ETag, and a local stat of the
    URL would look up a relative path."""
    if path.startswith(OBJECT_SCHEME):
        return None
    try:
        return stamp_of(os.stat(path))
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return None


def unchanged(path: str, stamp: Stamp | None) -> bool:
    """The file at `path` still has `stamp` (one stat; a None stamp never matches)."""
    if stamp is None:
        return False
    try:
        return matches(os.stat(path), stamp)
    except (OSError, ValueError):
        return False


def matches(st: os.stat_result, stamp: Stamp) -> bool:
    """A stat result has `stamp`: the likeliest change compared first, no tuple built (the daemon's
    lookups and the loader's later epochs run it once per item)."""
    return (st.st_ctime_ns == stamp[4] and st.st_mtime_ns == stamp[3] and st.st_ino == stamp[1]
            and st.st_size == stamp[2] and st.st_dev == stamp[0])
