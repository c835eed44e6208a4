"""What a client holds in one process: its channel, segment mappings, handle cache and leases.

A process holds at most one lease per entry (key), and every lease it holds is in `leases` until it
is given back, so a lease can't be lost with its views (held leases always equal live entries,
whatever a batch repeats). The handle cache maps (encoder, spec) to the lease of the entry it
resolved to, with the stamp of the spec's source file at the time. While an entry's views are alive
its lease is busy; when they die the lease becomes idle but stays cached, so reading the entry again
costs no RPC, only a stat of the source to prove it unchanged. Idle leases go back to the daemon
(piggybacked on the next call, or by the watcher thread) when the daemon's control page says memory
is under pressure, or when more than MAX_IDLE pile up; a second lease granted for an entry already
held goes back at once.

An idle entry's pages stay mapped, so re-reading it does not fault them in again, up to
IDLE_PAGES_BYTES per process; past that, the oldest idle entries' pages are dropped from this
process (MADV_DONTNEED: the shared copy stays), so a worker's memory does not grow with what it read.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import overload

import grpc

from ._proto import cache_pb2_grpc
from .specs import ImageSpec, Spec
from .stamp import Stamp, unchanged
from .views import Lease, Segment, open_readonly
from .wire import Layout

__all__ = ["ProcessState", "Control", "process_state", "MAX_IDLE", "WATCH_INTERVAL_S"]

MAX_IDLE = 65536          # idle leases one process keeps at most
IDLE_PAGES_BYTES = 64 << 20  # idle entries' pages a process keeps mapped; older ones are dropped
WATCH_INTERVAL_S = 0.5    # how often the watcher reads the control page

HKey = tuple[str, Spec]   # (encoder, spec)


class Control:
    """The daemon's control page, mapped read-only and shared, so its counter is always current."""

    def __init__(self, path: str, open_fd: Callable[[str], int] = open_readonly) -> None:
        fd = open_fd(path)
        try:
            self.map = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.path = path

    def pressure(self) -> int:
        return struct.unpack_from("<Q", self.map, 8)[0]


@dataclass(eq=False)
class ProcessState:
    channel: grpc.Channel
    stub: cache_pb2_grpc.CacheStub
    instance: str = ""
    segments: dict[str, Segment] = field(default_factory=dict)
    layouts: dict[int, Layout] = field(default_factory=dict)
    leases: dict[bytes, Lease] = field(default_factory=dict)  # by key: every lease held, busy or idle
    handles: dict[HKey, tuple[Lease, Stamp | None]] = field(default_factory=dict)
    idle: dict[int, Lease] = field(default_factory=dict)
    due: list[int] = field(default_factory=list)  # lease ids to give back with the next call
    dead: deque = field(default_factory=deque)  # weak references whose views died (views._Watch)
    hints: deque = field(default_factory=deque)  # prefetch calls in flight
    resident: dict[int, Lease] = field(default_factory=dict)  # idle, pages mapped, oldest first
    resident_bytes: int = 0
    control: Control | None = None
    pressure_seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    watcher: threading.Thread | None = None
    open_fd: Callable[[str], int] = open_readonly  # a read-only descriptor of a segment the daemon names

    def lookup(self, hkey: HKey) -> Lease | None:
        """A cached lease whose source is unchanged (caller holds the lock); stale ones are dropped."""
        hit = self.handles.get(hkey)
        if hit is None:
            return None
        lease, stamp = hit
        if isinstance(hkey[1], ImageSpec) and not unchanged(hkey[1].path, stamp):
            self._forget(hkey)  # rewritten (or too recently changed to tell): the daemon decides
            return None
        self.idle.pop(lease.lease_id, None)
        return lease

    def adopt_lease(self, hkey: HKey, stamp: Stamp | None, lease: Lease) -> Lease:
        """Records a lease a reply granted; the entry's lease when this process already holds one
        (the new one is then given back with the next call)."""
        held = self.leases.get(lease.key)
        if held is None:
            self.leases[lease.key] = held = lease
        elif held.lease_id != lease.lease_id:
            self.due.append(lease.lease_id)
        self.idle.pop(held.lease_id, None)
        old = self.handles.get(hkey)
        if old is not None and old[0] is not held:
            old[0].hkeys.discard(hkey)
        self.handles[hkey] = (held, stamp)
        held.hkeys.add(hkey)
        return held

    def _forget(self, hkey: HKey) -> None:
        lease, _ = self.handles.pop(hkey)
        lease.hkeys.discard(hkey)

    def reap(self) -> None:
        """Leases whose views died become idle; their pages leave this process past the budget."""
        while self.dead:
            watch = self.dead.popleft()
            lease: Lease = watch.lease
            if lease.base is not watch or self.leases.get(lease.key) is not lease:
                continue  # revived since with new views, or already given back
            if lease.instance != self.instance:  # the daemon that granted it is gone
                lease.segment.drop_pages(lease.offset, lease.length)
                continue
            self.idle[lease.lease_id] = lease
            if lease.lease_id not in self.resident:
                self.resident[lease.lease_id] = lease
                self.resident_bytes += lease.length
        while self.resident_bytes > IDLE_PAGES_BYTES:
            self._unmap(next(iter(self.resident.values())))

    def _unmap(self, lease: Lease) -> None:
        if self.resident.pop(lease.lease_id, None) is not None:
            self.resident_bytes -= lease.length
            if not lease.alive():
                lease.segment.drop_pages(lease.offset, lease.length)

    def take_idle(self) -> list[int]:
        """Every idle lease id (and every duplicate), to give back now; their handles leave the cache."""
        for lease in self.idle.values():
            for hkey in list(lease.hkeys):
                self._forget(hkey)
            del self.leases[lease.key]
            self._unmap(lease)
        ids = [*self.idle, *self.due]
        self.idle.clear()
        self.due.clear()
        return ids

    def take_due(self) -> list[int]:
        """Lease ids to give back now: duplicates, and the idle ones when the daemon asked for them
        or too many piled up."""
        pressure = self.control.pressure() if self.control is not None else self.pressure_seen
        if not self.idle or (pressure == self.pressure_seen and len(self.idle) < MAX_IDLE):
            due, self.due = self.due, []
            return due
        self.pressure_seen = pressure
        return self.take_idle()

    def adopt(self, instance: str, control: str) -> None:
        """Follows the daemon in a reply: a new instance drops what belonged to the old one (views
        already handed out stay valid: their mappings live as long as they do)."""
        if instance != self.instance:
            self.instance = instance
            self.segments.clear()
            self.layouts.clear()
            self.leases.clear()
            self.handles.clear()
            self.idle.clear()
            self.due.clear()
            self.resident.clear()
            self.resident_bytes = 0
            self.control = None
        if control and self.control is None:
            self.control = Control(control, self.open_fd)
            self.pressure_seen = self.control.pressure()

    def start_watcher(self, release: Callable[[list[int]], None], daemon_alive: Callable[[], bool]) -> None:
        """A daemon thread that gives idle leases back under pressure even when this process makes
        no calls (an idle trainer must not pin the daemon's memory), and drops the handles of a
        daemon that is gone (its identity connection closed): they would be served from a dead
        daemon's memory, which also stays allocated while they are mapped."""
        if self.watcher is not None:
            return

        def watch() -> None:
            while True:
                time.sleep(WATCH_INTERVAL_S)
                alive = daemon_alive()
                with self.lock:
                    if not alive:
                        self.adopt("", "")
                    self.reap()
                    ids = self.take_due()
                if ids:
                    try:
                        release(ids)
                    except Exception:  # noqa: BLE001 - the daemon expires them if it can't be told
                        pass

        self.watcher = threading.Thread(target=watch, name="cached-leases", daemon=True)
        self.watcher.start()


_states: dict[str, ProcessState] = {}  # this process's, by target
_states_lock = threading.Lock()


@overload
def process_state(target: str) -> ProcessState | None: ...
@overload
def process_state(target: str, create: Callable[[str], ProcessState]) -> ProcessState: ...
def process_state(target: str, create: Callable[[str], ProcessState] | None = None) -> ProcessState | None:
    """This process's state for `target`, made with `create` on first use (None without it)."""
    with _states_lock:
        state = _states.get(target)
        if state is None and create is not None:
            state = _states[target] = create(target)
        return state


def _forget_states_in_child() -> None:
    global _states_lock
    _states_lock = threading.Lock()  # the parent's threads and their state did not come along
    _states.clear()


os.register_at_fork(after_in_child=_forget_states_in_child)
