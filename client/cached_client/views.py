"""Zero-copy views of sealed entries, and the leases that keep them valid.

Each segment is mapped once per process, MAP_PRIVATE over a read-only descriptor: reads share the
daemon's pages, and a write to a view (torch has no read-only tensors) lands in a private copy of the
page, in this process only, and never reaches the shared copy. Such a private page must not be seen
by a later read either, so before views are made over a slot its pages are checked in
/proc/self/pagemap (one pread, ~2.5 us per 128 KiB): pages that are no longer the shared file's
are dropped (MADV_DONTNEED: the next read maps the sealed page again), or, while another view of the
entry still holds them, the new views get a clean copy read from the segment instead. numpy views
are handed out read-only (`writeable=False`).

An entry's views all hang off one numpy array over its slot; a weak reference to it (`_Watch`) tells
the process when the last view died, which makes the lease idle (see handles.py).
"""

from __future__ import annotations

import errno
import importlib.util
import mmap
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CacheError, CapacityError, DaemonError, DaemonUnavailable, PermissionDenied
from .specs import Spec
from .wire import Layout

__all__ = ["Segment", "Lease", "Entry", "HAVE_TORCH", "PAGE", "shm_error"]

# The thin client runs without torch, handing out numpy arrays. torch is imported on the first tensor
# made, not here: cachectl and other tools that never make one start in a fraction of the time.
try:
    HAVE_TORCH = importlib.util.find_spec("torch") is not None
except (ImportError, ValueError):  # an import hook that refuses torch
    HAVE_TORCH = False

PAGE = mmap.PAGESIZE
_NUMPY = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "bfloat16": np.uint16,
          "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
          "bool": np.bool_}

# /proc/self/pagemap: one little-endian u64 per page (Documentation/admin-guide/mm/pagemap.rst); its
# last byte holds bit 63 (present, 0x80), 62 (swapped, 0x40) and 61 (file page or shared, 0x20). A
# page is the segment's own when it is not there (0x00) or a present file page (0xa0); anything else
# (an anonymous private copy, present or swapped out) is a page this process wrote.
_DIRTY = bytes(0 if (b & 0xE0) in (0x00, 0xA0) else 1 for b in range(256))


class _Pagemap:
    """This process's /proc/self/pagemap, reopened after a fork (the parent's fd describes the parent)."""

    def __init__(self) -> None:
        self._pid = -1
        self._fd: int | None = None
        self._mu = threading.Lock()

    def fd(self) -> int | None:
        if self._pid == os.getpid():
            return self._fd
        with self._mu:
            if self._pid != os.getpid():
                try:
                    self._fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    self._fd = None  # no pagemap (not Linux, or masked): every check says "dirty"
                self._pid = os.getpid()
            return self._fd


_PAGEMAP = _Pagemap()

# why this process can't open or map a file of the daemon's shared memory, by errno
_SHM_ERRORS: dict[int, tuple[type[CacheError], str]] = {
    errno.EACCES: (PermissionDenied, "this user may not read the daemon's shared memory: join its group"),
    errno.EPERM: (PermissionDenied, "this user may not read the daemon's shared memory: join its group"),
    errno.ENOENT: (DaemonUnavailable, "gone: the daemon restarted, or this process (a container?) does "
                                      "not share its shm directory"),
    errno.ENOMEM: (CapacityError, "out of memory or address space in this process"),
    errno.EMFILE: (CapacityError, "too many open files in this process"),
    errno.ENFILE: (CapacityError, "too many open files on this machine"),
}


def shm_error(path: str, exc: OSError | ValueError) -> CacheError:
    """The CacheError for a failure to open or map the daemon's shm file `path` (a segment or its
    control page); DaemonError for an errno with no better meaning (or a file mmap refuses)."""
    cls, why = _SHM_ERRORS.get(getattr(exc, "errno", None) or 0, (DaemonError, "can't be mapped"))
    return cls(f"{path}: {why} ({getattr(exc, 'strerror', None) or exc})")


def open_readonly(path: str) -> int:
    """A read-only descriptor of a segment file."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class Segment:
    """One shared-memory arena mapped into this process, for as long as the process lives."""

    def __init__(self, path: str, open_fd: Callable[[str], int] = open_readonly) -> None:
        """Maps the segment the daemon names `path` (a file, or "memfd:..." whose descriptor the
        identity socket hands over: `open_fd`); a CacheError (shm_error) when this process can't."""
        try:
            self.fd = open_fd(path)  # kept: clean copies are read from it
        except OSError as exc:
            raise shm_error(path, exc) from exc
        try:
            self.map = mmap.mmap(self.fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:  # ValueError: an empty file
            os.close(self.fd)
            raise shm_error(path, exc) from exc
        self.address = np.frombuffer(self.map, dtype=np.uint8, count=1).ctypes.data
        self.path = path
        self._shared: np.ndarray | None = None

    @property
    def shared(self) -> np.ndarray:
        """The segment as bytes through a second, read-only shared mapping: what gathers copy from
        (never this process's written pages, and no page of it can be written)."""
        if self._shared is None:
            try:
                self._shared = np.frombuffer(mmap.mmap(self.fd, 0, mmap.MAP_SHARED, mmap.PROT_READ), np.uint8)
            except (OSError, ValueError) as exc:
                raise shm_error(self.path, exc) from exc
        return self._shared

    def dirty(self, offset: int, length: int) -> bool:
        """True when a page of [offset, offset+length) is this process's private copy (written to),
        or when that can't be told."""
        fd = _PAGEMAP.fd()
        if fd is None or length <= 0:
            return fd is None
        first = (self.address + offset) // PAGE
        last = (self.address + offset + length - 1) // PAGE
        try:
            raw = os.pread(fd, 8 * (last - first + 1), 8 * first)
        except OSError:
            return True
        return 1 in raw[7::8].translate(_DIRTY)

    def drop_pages(self, offset: int, length: int) -> None:
        """Unmaps the range's pages from this process; private copies are discarded, and the next
        read maps the shared (sealed) pages again."""
        self.map.madvise(mmap.MADV_DONTNEED, offset, length)

    def clean_copy(self, offset: int, length: int) -> np.ndarray:
        """The range's sealed bytes, read from the segment into private memory."""
        buf = bytearray(length)
        try:
            n = os.preadv(self.fd, [buf], offset)
        except OSError as exc:
            raise shm_error(self.path, exc) from exc
        if n != length:
            raise DaemonError(f"{self.path}: short read of {length} bytes at {offset}: the segment shrank")
        return np.frombuffer(buf, dtype=np.uint8)


@dataclass(eq=False)
class Lease:
    """A lease the daemon granted on one entry, and the views this process has of it."""

    key: bytes
    lease_id: int
    segment: Segment
    offset: int
    length: int
    layout: Layout
    instance: str = ""                    # the daemon instance that granted the lease
    base: _Watch | None = None            # weak reference to the numpy array under the live views
    hkeys: set[tuple[str, Spec]] = field(default_factory=set)  # handle-cache entries that name it
    _arrays: list[tuple[str, str, weakref.ref]] = field(default_factory=list)  # per tensor, over the live base

    def alive(self) -> bool:
        return self.base is not None and self.base() is not None

    def views(self, dead: deque, want_torch: bool) -> dict[str, Any]:
        """Tensors over the slot, never over bytes a caller wrote: reuses the live base when it is
        clean, else drops the written pages or, while other views hold them, copies."""
        base = self.base() if self.base is not None else None
        if base is not None:
            if self.segment.dirty(self.offset, self.length):
                return _tensors(self._arrays_of(self.segment.clean_copy(self.offset, self.length)), want_torch)
            live = [(name, dtype, ref()) for name, dtype, ref in self._arrays]
            if want_torch and all(arr is not None for _, _, arr in live):
                return _tensors(live, True)  # type: ignore[arg-type]  # the live arrays, new tensors
        else:
            if self.segment.dirty(self.offset, self.length):
                self.segment.drop_pages(self.offset, self.length)
            base = np.frombuffer(self.segment.map, dtype=np.uint8, count=self.length, offset=self.offset)
            self.base = _Watch(base, dead.append, self)
        arrays = self._arrays_of(base)
        self._arrays = [(name, dtype, weakref.ref(arr)) for name, dtype, arr in arrays]
        return _tensors(arrays, want_torch)

    def _arrays_of(self, base: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
        return [(name, dtype, base[off:off + nbytes].view(_NUMPY[dtype]).reshape(shape))
                for name, dtype, shape, off, nbytes in self.layout]


class _Watch(weakref.ref):
    """A weak reference that knows its lease. When the array it watches dies, the callback (run in
    whichever thread dropped the last view, possibly inside the GC) only appends it to a deque."""

    __slots__ = ("lease",)

    def __new__(cls, ob: Any, callback: Any, lease: Lease) -> _Watch:
        return super().__new__(cls, ob, callback)

    def __init__(self, ob: Any, callback: Any, lease: Lease) -> None:
        super().__init__(ob, callback)  # type: ignore[call-arg]  # typeshed omits ref.__init__
        self.lease = lease


def _tensors(arrays: list[tuple[str, str, np.ndarray]], want_torch: bool) -> dict[str, Any]:
    """Fresh torch tensors over the arrays; or read-only numpy views of them."""
    out: dict[str, Any] = {}
    for name, dtype, arr in arrays:
        if not want_torch:
            view = arr.view()
            view.flags.writeable = False
            out[name] = view
        else:
            import torch  # noqa: PLC0415 - see HAVE_TORCH

            t = torch.from_numpy(arr)
            out[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
    return out


@dataclass(eq=False)
class Entry(Mapping):
    """One cached entry: named read-only tensor views (`entry["latent"]`) and its hex content `key`."""

    key: str
    spec: Spec
    tensors: dict[str, Any] = field(repr=False)

    def __getitem__(self, name: str) -> Any:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) for k, v in self.tensors.items()}
        return f"Entry(key={self.key[:16]}..., spec={self.spec!r}, tensors={shapes})"
