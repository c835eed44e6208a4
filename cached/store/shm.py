"""The shared-memory tier: sealed entries in a few arenas, leases, and LRU eviction.

An entry is written once into a slot and sealed; it is never modified. A client that has a live view
of an entry holds a lease on it, and an entry with leases is never reclaimed: eviction takes the least
recently used entry that nobody holds. Evicting a held entry only drops it from the index; its slot
is freed when its last lease goes.

Clients keep the leases of entries they viewed and dropped (idle leases), so that reading the same
entry again costs no RPC. The control page tells them when to give those back: it holds a pressure
counter the store bumps when leased bytes pass half the capacity, when an allocation fails because
everything is held, and when an evicted entry is still held. Clients read it (a memory load) on
every get and release their idle leases when it changes.

    control page: b"CACHEDC" + version byte (1), then the pressure counter, little-endian u64
"""

from __future__ import annotations

import functools
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from cached_client.errors import CapacityError, LimitExceeded
from cached_client.wire import HANDLE, Layout, encode_layout

from .alloc import PAGE, round_up
from .arena import Arena, check_shm_capacity
from .names import control_name, hold_instance_lock, lock_name, segment_name, sweep_stale
from .slot import TensorBytes, plan_slot, write_slot

__all__ = ["ShmStore", "Entry", "Owner"]

log = logging.getLogger(__name__)

MAX_ARENA = 1 << 30
RELEASE_WAIT_S = 1.0  # how long an allocation waits for clients to give back idle leases
CONTROL_MAGIC = b"CACHEDC\x01"

# a client process's session id (cached/server/sessions.py): the kernel-verified holder of leases
Owner = int


@dataclass(eq=False)
class Entry:
    key: bytes
    segment: int
    offset: int
    length: int
    generation: int
    layout_id: int
    meta: dict[str, str]
    leases: int = 0
    indexed: bool = True  # False once evicted while held: freed when the last lease goes

    @functools.cached_property
    def record(self) -> bytes:
        """Its wire.HANDLE record with lease 0: a reply copies it and sets the lease."""
        return np.array([(self.key, 0, self.generation, self.offset, self.length, self.segment, self.layout_id)],
                        dtype=HANDLE).tobytes()


@dataclass
class _Layouts:
    """Interns tensor tables so a reply names a small id instead of repeating the table."""

    ids: dict[Layout, int] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)

    def intern(self, layout: Layout) -> int:
        lid = self.ids.get(layout)
        if lid is None:
            lid = self.ids[layout] = len(self.ids) + 1
            self.texts[lid] = encode_layout(layout)
        return lid

    def text(self, lid: int) -> str:
        """The layout's JSON, as clients decode it."""
        return self.texts[lid]


class ShmStore:
    """Owns the daemon's arenas. All methods are thread-safe."""

    def __init__(self, shm_dir: str, capacity: int, instance: str, group: int | None = None,
                 arena_bytes: int = MAX_ARENA, owner_cap: int | None = None, backend: str = "dev-shm") -> None:
        if capacity < PAGE:
            raise ValueError(f"shm_bytes must be at least {PAGE}, got {capacity!r}")
        self.shm_dir = shm_dir
        self.instance = instance
        self.backend = backend
        self._lock_fd: int | None = None
        if backend == "dev-shm":  # files by name: sweep dead daemons' files, check the room, mark ours
            sweep_stale(shm_dir)
            check_shm_capacity(shm_dir, capacity)
            self._lock_fd = hold_instance_lock(shm_dir, instance)
        self.arenas: list[Arena] = []
        try:
            n = -(-capacity // arena_bytes)
            per = round_up(-(-capacity // n))
            for seq in range(n):
                self.arenas.append(Arena(shm_dir, segment_name(instance, seq), per, group, backend))
            self._control_arena = Arena(shm_dir, control_name(instance), PAGE, group, backend)
        except BaseException:
            self.close()
            raise
        self.capacity = sum(a.size for a in self.arenas)
        self.control_path, self._control = self._control_arena.path, self._control_arena.map
        self._control[:8] = CONTROL_MAGIC
        self.pressure = 0
        self.leased_bytes = 0
        self._over_half = False
        self.layouts = _Layouts()
        self._mu = threading.RLock()
        self._released = threading.Condition(self._mu)  # notified when leases go
        self._index: dict[bytes, Entry] = {}
        self._lru: OrderedDict[bytes, Entry] = OrderedDict()  # indexed entries nobody holds
        self._leases: dict[int, tuple[Owner, Entry]] = {}
        self._by_owner: dict[Owner, set[int]] = {}
        self._owner_bytes: dict[Owner, int] = {}  # bytes each owner's leases hold
        self.owner_cap = owner_cap  # at most this many leased bytes per owner (None: no cap)
        self._next_lease = 1
        self._generation = 0
        self.evictions = 0
        self.evictions_explicit = 0  # by Evict; the rest made room for new entries
        self.bytes_used = 0
        log.info("shared memory: %d arena(s), %d bytes, %s", len(self.arenas), self.capacity,
                 "memfd" if backend == "memfd" else f"in {shm_dir}")

    def _bump_pressure(self, why: str) -> None:
        self.pressure += 1
        struct.pack_into("<Q", self._control, 8, self.pressure)
        log.debug("asking clients to release idle leases (%s)", why)

    # lookups and writes

    def lookup(self, key: bytes) -> Entry | None:
        with self._mu:
            entry = self._index.get(key)
            if entry is not None and entry.key in self._lru:
                self._lru.move_to_end(key)
            return entry

    def put(self, key: bytes, tensors: dict[str, TensorBytes], meta: dict[str, str]) -> Entry:
        """Writes and seals an entry (or returns the one already there). CapacityError when every
        byte is held by leases."""
        layout, layout_json, length = plan_slot(tensors)
        with self._mu:
            existing = self._index.get(key)
            if existing is not None:
                return existing
            segment, offset = self._allocate(length, key)
            self._generation += 1
            entry = Entry(key, segment, offset, round_up(length), self._generation,
                          self.layouts.intern(layout), meta)
            # Writing under the lock is simple and cheap next to encoding (a memcpy of < 1 MiB);
            # the slot is not in the index until it is complete, so no reader sees it half-written.
            view = self.arenas[segment].view[offset:offset + length]
            write_slot(view, key, entry.generation, layout, layout_json, tensors)
            self._index[key] = entry
            self._lru[key] = entry
            self.bytes_used += entry.length
            return entry

    def _allocate(self, length: int, key: bytes) -> tuple[int, int]:
        if round_up(length) > max(a.size for a in self.arenas):
            raise CapacityError(f"entry {key.hex()[:16]} needs {length} bytes, more than an arena "
                                f"holds ({self.arenas[0].size}); raise shm_bytes")
        deadline = time.monotonic() + RELEASE_WAIT_S
        while True:
            for i, arena in enumerate(self.arenas):
                off = arena.alloc.alloc(length)
                if off is not None:
                    return i, off
            if not self._lru and time.monotonic() < deadline:
                # everything is held: ask clients for their idle leases, and give them a moment
                self._bump_pressure("allocation failed")
                self._released.wait(deadline - time.monotonic())
                continue
            if not self._lru:
                raise CapacityError(
                    f"shared memory is full: {self.bytes_used} of {self.capacity} bytes are held by "
                    f"clients' leases; raise shm_bytes or hold fewer entries at once")
            _, victim = self._lru.popitem(last=False)
            self._drop(victim)
            self.evictions += 1

    def _drop(self, entry: Entry) -> None:
        """Removes from the index; frees the slot now if nobody holds it."""
        if entry.indexed:
            del self._index[entry.key]
            self._lru.pop(entry.key, None)
            entry.indexed = False
        if entry.leases == 0:
            self.arenas[entry.segment].alloc.free(entry.offset, entry.length)
            self.bytes_used -= entry.length

    # leases

    def acquire_many(self, keys: list[bytes], owner: Owner | None) -> list[tuple[Entry, int] | LimitExceeded | None]:
        """For each key: (entry, lease id) when indexed (lease 0 without an owner), None on a
        miss, LimitExceeded past the owner's cap. One lock for the batch: a 256-key hit costs no
        more locking than one."""
        with self._mu:
            entries = [self._index.get(key) for key in keys]
            if owner is not None:
                return self._lease_many(entries, owner)
            for entry in entries:
                if entry is not None and entry.key in self._lru:
                    self._lru.move_to_end(entry.key)
            return [None if entry is None else (entry, 0) for entry in entries]

    def lease(self, entry: Entry, owner: Owner) -> int | None:
        """A new lease on an entry; None when it was evicted since it was looked up. LimitExceeded
        when the owner would hold more than `owner_cap` bytes: one client can't starve the rest."""
        with self._mu:
            if not entry.indexed:
                return None
            [got] = self._lease_many([entry], owner)
            if isinstance(got, LimitExceeded):
                raise got
            return got[1]  # type: ignore[index]

    def _lease_many(self, entries: list[Entry | None], owner: Owner) -> list[tuple[Entry, int] | LimitExceeded | None]:
        """Leases indexed entries (None stays None; caller holds the lock), the owner's bookkeeping
        once for the batch."""
        held = self._owner_bytes.get(owner, 0)
        cap = self.owner_cap
        mine = self._by_owner.setdefault(owner, set())
        leases, lru = self._leases, self._lru
        lid = self._next_lease
        first = 0  # bytes of entries nobody held before
        out: list[tuple[Entry, int] | LimitExceeded | None] = []
        for entry in entries:
            if entry is None:
                out.append(None)
                continue
            if cap is not None and held + entry.length > cap:
                out.append(LimitExceeded(f"this process holds {held} bytes of leases, its cap is {cap}"
                                         f" (limits.client_leased_bytes); drop views or let idle leases go"))
                continue
            held += entry.length
            leases[lid] = (owner, entry)
            mine.add(lid)
            out.append((entry, lid))
            lid += 1
            entry.leases += 1
            if entry.leases == 1:
                lru.pop(entry.key, None)
                first += entry.length
        self._next_lease = lid
        if held:
            self._owner_bytes[owner] = held
        if not mine:
            del self._by_owner[owner]
        self.leased_bytes += first
        if not self._over_half and self.leased_bytes > self.capacity // 2:
            self._over_half = True  # bump once per crossing, not once per lease
            self._bump_pressure("leases hold half the capacity")
        return out

    def release(self, owner: Owner, lease_ids: Iterable[int]) -> int:
        """Gives back leases; ids that are not this owner's are ignored. Returns how many went."""
        with self._mu:
            held = self._by_owner.get(owner)
            if not held:
                return 0
            mine = [lid for lid in dict.fromkeys(lease_ids) if lid in held]  # an id sent twice goes once
            held.difference_update(mine)
            if not held:
                del self._by_owner[owner]
            self._unlease(owner, mine)
        return len(mine)

    def _unlease(self, owner: Owner, lids: Iterable[int]) -> None:
        """Drops leases of `owner` (already out of its set; caller holds the lock): entries nobody
        holds any more go back to the LRU, or are freed when evicted meanwhile."""
        leases = self._leases
        gone = 0   # bytes of the owner's leases
        idle = []  # entries nobody holds now
        for lid in lids:
            entry = leases.pop(lid)[1]
            gone += entry.length
            entry.leases -= 1
            if not entry.leases:
                idle.append(entry)
        left = self._owner_bytes.pop(owner, 0) - gone
        if left:
            self._owner_bytes[owner] = left
        for entry in idle:
            self.leased_bytes -= entry.length
            if entry.indexed:
                self._lru[entry.key] = entry
            else:
                self._drop(entry)
        if idle:
            self._over_half = self._over_half and self.leased_bytes > self.capacity // 2
            self._released.notify_all()

    def release_owner(self, owner: Owner) -> int:
        """Drops every lease of an owner that is gone (its session ended); returns how many."""
        with self._mu:
            held = self._by_owner.pop(owner, set())
            self._unlease(owner, held)
        if held:
            log.debug("gave back %d lease(s) of a client process that is gone", len(held))
        return len(held)

    def owners(self) -> dict[Owner, tuple[int, int]]:
        """{owner: (leases, leased bytes)}, for operators."""
        with self._mu:
            return {o: (len(ids), self._owner_bytes.get(o, 0)) for o, ids in self._by_owner.items()}

    # eviction and reporting

    def evict(self, match: Callable[[Entry], bool]) -> tuple[int, int, int]:
        """Drops matching entries: (entries, bytes freed now, entries still held by leases)."""
        with self._mu:
            victims = [e for e in self._index.values() if match(e)]
            freed = pending = 0
            for entry in victims:
                if entry.leases:
                    pending += 1
                else:
                    freed += entry.length
                self._drop(entry)
            self.evictions += len(victims)
            self.evictions_explicit += len(victims)
            if pending:
                self._bump_pressure("evicted entries are still held")
            return len(victims), freed, pending

    def list_entries(self) -> list[Entry]:
        """Indexed entries, least recently used first (held ones last)."""
        with self._mu:
            held = [e for e in self._index.values() if e.leases]
            return [*self._lru.values(), *held]

    def stats(self) -> dict[str, int]:
        with self._mu:
            return {"entries": len(self._index), "bytes": self.bytes_used,
                    "capacity_bytes": self.capacity, "leases": len(self._leases),
                    "evictions": self.evictions, "evictions_explicit": self.evictions_explicit,
                    "held_bytes": sum(a.held_bytes() for a in self.arenas)}

    def segment_paths(self) -> list[str]:
        return [a.path for a in self.arenas]

    def client_fds(self, paths: list[str]) -> list[int]:
        """Read-only descriptors of memfd segments (and the control page) by the paths replies
        name, for the identity socket to hand over; ValueError for a path that is not one of ours."""
        ours = {a.path: a.client_fd for a in [*self.arenas, self._control_arena] if a.client_fd >= 0}
        unknown = [p for p in paths if p not in ours]
        if unknown:
            raise ValueError(f"no such segment of this daemon: {unknown[0][:80]!r}")
        return [ours[p] for p in paths]

    def close(self) -> None:
        """Unlinks every segment and the instance lock (a memfd goes with its last descriptor)."""
        control = getattr(self, "_control_arena", None)
        for arena in [*self.arenas, *([control] if control is not None else [])]:
            arena.close()
        self.arenas = []
        self._control_arena = None  # type: ignore[assignment]
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            try:
                os.unlink(os.path.join(self.shm_dir, lock_name(self.instance)))
            except FileNotFoundError:
                pass
            os.close(fd)
            self._lock_fd = None
