"""What a client holds in one process: its channel, segment mappings, handle cache and leases.

The handle cache maps (encoder, spec) to the lease the daemon granted for it. While an entry's views
are alive its lease is busy; when they die the lease becomes idle but stays cached, so reading the
entry again costs no RPC, only a stat of the source to prove it unchanged. Idle leases go back to
the daemon (piggybacked on the next call, or by the watcher thread) when the daemon's control page
says memory is under pressure, or when more than MAX_IDLE pile up.

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

import grpc

from ._proto import cache_pb2 as pb
from ._proto import cache_pb2_grpc
from .specs import ImageSpec, Spec
from .views import Lease, Segment
from .wire import Layout

__all__ = ["ProcessState", "Control", "source_stamp", "MAX_IDLE", "WATCH_INTERVAL_S"]

MAX_IDLE = 65536          # idle leases one process keeps at most
IDLE_PAGES_BYTES = 64 << 20  # idle entries' pages a process keeps mapped; older ones are dropped
WATCH_INTERVAL_S = 0.5    # how often the watcher reads the control page


def source_stamp(spec: Spec) -> tuple[int, ...] | None:
    """(dev, inode, size, mtime_ns) of an image spec's file; None for texts and unreadable files."""
    if not isinstance(spec, ImageSpec):
        return None
    try:
        st = os.stat(spec.path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Control:
    """The daemon's control page, mapped read-only and shared, so its counter is always current."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
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
    owner: pb.Owner
    instance: str = ""
    segments: dict[str, Segment] = field(default_factory=dict)
    layouts: dict[int, Layout] = field(default_factory=dict)
    handles: dict[tuple[str, Spec], Lease] = field(default_factory=dict)
    idle: dict[int, Lease] = field(default_factory=dict)
    dead: deque = field(default_factory=deque)  # weak references whose views died (views._Watch)
    hints: deque = field(default_factory=deque)  # prefetch calls in flight
    resident: dict[int, Lease] = field(default_factory=dict)  # idle, pages mapped, oldest first
    resident_bytes: int = 0
    control: Control | None = None
    pressure_seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    watcher: threading.Thread | None = None

    def lookup(self, hkey: tuple[str, Spec]) -> Lease | None:
        """A cached lease whose source is unchanged (caller holds the lock); stale ones are dropped."""
        lease = self.handles.get(hkey)
        if lease is None:
            return None
        if lease.stamp is not None and source_stamp(hkey[1]) != lease.stamp:
            del self.handles[hkey]  # rewritten since: the daemon computes its new key
            return None
        self.idle.pop(lease.lease_id, None)
        return lease

    def reap(self) -> None:
        """Leases whose views died become idle; their pages leave this process."""
        while self.dead:
            watch = self.dead.popleft()
            lease = watch.lease
            if lease.base is not watch:
                continue  # revived since, with new views
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
        """Every idle lease id, to give back now; their handles leave the cache."""
        for lease in self.idle.values():
            if self.handles.get(lease.hkey) is lease:
                del self.handles[lease.hkey]
            self._unmap(lease)
        ids = list(self.idle)
        self.idle.clear()
        return ids

    def take_due(self) -> list[int]:
        """Idle lease ids to give back when the daemon asked for them or too many piled up."""
        pressure = self.control.pressure() if self.control is not None else self.pressure_seen
        if not self.idle or (pressure == self.pressure_seen and len(self.idle) < MAX_IDLE):
            return []
        self.pressure_seen = pressure
        return self.take_idle()

    def adopt(self, instance: str, control: str) -> None:
        """Follows the daemon in a reply: a new instance drops what belonged to the old one (views
        already handed out stay valid: their mappings live as long as they do)."""
        if instance != self.instance:
            self.instance = instance
            self.segments.clear()
            self.layouts.clear()
            self.handles.clear()
            self.idle.clear()
            self.resident.clear()
            self.resident_bytes = 0
            self.control = None
        if control and self.control is None:
            self.control = Control(control)
            self.pressure_seen = self.control.pressure()

    def start_watcher(self, release: Callable[[list[int]], None]) -> None:
        """A daemon thread that gives idle leases back under pressure even when this process makes
        no calls (an idle trainer must not pin the daemon's memory)."""
        if self.watcher is not None:
            return

        def watch() -> None:
            while True:
                time.sleep(WATCH_INTERVAL_S)
                with self.lock:
                    self.reap()
                    ids = self.take_due()
                if ids:
                    try:
                        release(ids)
                    except Exception:  # noqa: BLE001 - the daemon expires them if it can't be told
                        pass

        self.watcher = threading.Thread(target=watch, name="cached-leases", daemon=True)
        self.watcher.start()
