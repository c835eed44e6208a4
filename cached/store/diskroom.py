"""How the disk tier makes room for a put: which entries it evicts (least recently used first) and
how far it goes for the space the filesystem really has free.

Two limits bound a put. disk_bytes is a budget the tier keeps itself, by counting its own files, so
LRU eviction always meets it. Free space on the filesystem is only observed (statvfs) and is shared
with the index's WAL, other files and other writers, so eviction for it is bounded:
- FREE_RESERVE stays free, for the WAL to grow (a commit that finds no room fails the whole put);
- space taken by others is not chased: when the tier holds less than is missing, nothing is evicted;
- when evicting freed files without freeing space (files still mapped or open, snapshots, another
  writer filling the disk), puts that need space are refused for FUTILE_EVICTION_S instead of
  emptying the tier for nothing, put after put.
Every function here runs with the tier's lock held.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from cached_client.errors import CapacityError

if TYPE_CHECKING:
    from .disk import DiskTier

__all__ = ["make_room", "evict_lru", "free_bytes", "FREE_RESERVE", "FUTILE_EVICTION_S"]

EVICT_BATCH = 64
FREE_RESERVE = 4 << 20  # kept free on the filesystem: room for the index's WAL (<= ~1 MiB) to grow
FUTILE_EVICTION_S = 60.0  # after eviction failed to free space, puts that need it are refused this long


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def make_room(tier: DiskTier, size: int) -> None:
    """Evicts least recently used entries so that `size` more bytes fit disk_bytes and the
    filesystem, keeping FREE_RESERVE free there. CapacityError when the filesystem can't be given
    the room (see the module docstring); then nothing is evicted for it."""
    evict_lru(tier, tier.bytes + tier._reserved + size - tier.capacity)
    free = free_bytes(tier.directory)
    short = size + tier._reserved + FREE_RESERVE - free
    if short > 0:
        _free_filesystem(tier, short, free)


def _free_filesystem(tier: DiskTier, short: int, free: int) -> None:
    """Evicts `short` bytes for the filesystem, which has `free`, unless that can't help (raises).
    A try that freed files without freeing space makes later ones refuse for FUTILE_EVICTION_S."""
    where = f"disk tier {tier.directory}: {free} bytes free on the filesystem ({FREE_RESERVE} kept free)"
    if short > tier.bytes:
        raise CapacityError(f"{where}, and evicting all {tier.bytes} bytes of the tier would not make room")
    if time.monotonic() < tier._futile_until:
        raise CapacityError(f"{where}, and evicting did not free space a moment ago")
    tier._futile_until = time.monotonic() + FUTILE_EVICTION_S  # kept if evicting fails or frees nothing
    freed = evict_lru(tier, short)
    gained = free_bytes(tier.directory) - free
    if gained < min(short, freed // 2):
        raise CapacityError(f"{where}: evicting {freed} bytes of entries freed {gained}; "
                            f"not evicting for this again for {FUTILE_EVICTION_S:.0f} s")
    tier._futile_until = 0.0


def evict_lru(tier: DiskTier, need: int) -> int:
    """Drops least recently used entries until `need` bytes are freed; bytes freed. Stops early
    when the tier is empty or its files can't be removed."""
    if need <= 0:
        return 0
    tier._flush_touches()  # the oldest by the access times of every hit so far
    freed = 0
    while freed < need:
        victims = tier._index.oldest(EVICT_BATCH)
        if not victims:
            break
        for key, _ in victims:
            dropped, size = tier._drop([key])
            if not dropped:
                return freed
            freed += size
            if freed >= need:
                break
    return freed
