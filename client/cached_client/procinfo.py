"""What /proc says about a process's memory, mappings and descriptors, and what statvfs says of a
directory: read by `cachectl diagnose` for each client process, and by the daemon for itself
(its Diagnose RPC), with this one code.

Linux only. Anything that can't be read (another user's process without privileges, another pid
namespace, a process that just exited) is None, never an exception: a report says "not readable".
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import asdict, dataclass, field

__all__ = ["Mapped", "Memory", "read_memory", "segment_of", "open_fds", "fd_limit", "max_map_count",
           "DirUsage", "dir_usage"]

_KB = 1024
_COUNTED = {"Rss:": "rss", "Pss:": "pss", "Private_Clean:": "private_clean", "Private_Dirty:": "private_dirty",
            "Swap:": "swap", "Anonymous:": "anonymous"}


@dataclass
class Mapped:
    """Sums over a set of mappings, in bytes. In a client's private mapping of a segment, Private_Dirty
    and Anonymous are pages it wrote to: private copies of cached entries."""

    rss: int = 0
    pss: int = 0
    private_clean: int = 0
    private_dirty: int = 0
    swap: int = 0
    anonymous: int = 0

    def add(self, name: str, kib: int) -> None:
        setattr(self, name, getattr(self, name) + kib * _KB)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Memory:
    """A process's memory: all of it, and the part that maps the daemon's segments."""

    total: Mapped = field(default_factory=Mapped)
    segments: Mapped = field(default_factory=Mapped)
    maps: int = 0  # memory mappings (vm.max_map_count bounds them)

    @property
    def uss(self) -> int:
        """Unique set size: pages no other process maps."""
        return self.total.private_clean + self.total.private_dirty

    def as_dict(self) -> dict[str, object]:
        return {"rss": self.total.rss, "pss": self.total.pss, "uss": self.uss, "swap": self.total.swap,
                "maps": self.maps, "segments": self.segments.as_dict()}


def segment_of(pathname: str) -> str:
    """The name a mapping's path gives a segment: /dev/shm/x/cached-..-0000 and
    /memfd:cached-..-0000 (deleted) are both cached-..-0000."""
    name = pathname.removesuffix(" (deleted)").rsplit("/", 1)[-1]
    return name.removeprefix("memfd:")


def _is_header(line: str) -> bool:
    head = line.split(" ", 1)[0]
    return "-" in head and all(c in "0123456789abcdef-" for c in head)


def read_memory(pid: int | str, segments: Collection[str] = ()) -> Memory | None:
    """Parses /proc/PID/smaps once: totals, and sums over the mappings of `segments` (names as
    segment_of gives them). None when it can't be read."""
    try:
        with open(f"/proc/{pid}/smaps") as f:
            text = f.read()
    except OSError:
        return None
    mem = Memory()
    ours = False
    for line in text.splitlines():
        if _is_header(line):
            mem.maps += 1
            parts = line.split(None, 5)
            ours = len(parts) == 6 and segment_of(parts[5]) in segments
            continue
        key, _, rest = line.partition(" ")
        name = _COUNTED.get(key)
        if name is None:
            continue
        kib = int(rest.split()[0])
        mem.total.add(name, kib)
        if ours:
            mem.segments.add(name, kib)
    return mem if mem.maps else None


def open_fds(pid: int | str) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fd_limit(pid: int | str) -> int | None:
    """The soft RLIMIT_NOFILE of a process (None: unlimited or unreadable)."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft = line[len("Max open files"):].split()[0]
                    return int(soft) if soft.isdigit() else None
    except OSError:
        pass
    return None


def max_map_count() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class DirUsage:
    size: int
    used: int
    free: int


def dir_usage(path: str) -> DirUsage | None:
    """statvfs of the filesystem holding `path` (the shm directory: a tmpfs), in bytes."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    size = st.f_blocks * st.f_frsize
    return DirUsage(size, size - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize)
