"""Zero-copy views of sealed entries, and the leases that keep them valid.

Each segment is mapped once per process, MAP_PRIVATE over a read-only descriptor: reads share the
daemon's pages, and a write to a view (torch has no read-only tensors) lands in a private copy of the
page that never reaches the shared copy. An entry's views all hang off one numpy array over its slot;
when the last view dies that array is collected, its lease becomes releasable, and the pages are
dropped from this process (MADV_DONTNEED), so a worker's memory follows what it holds, not what it
has read.
"""

from __future__ import annotations

import mmap
import os
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .specs import Spec
from .wire import Layout

__all__ = ["Segment", "Lease", "Entry", "HAVE_TORCH"]

try:
    import torch

    HAVE_TORCH = True
except ImportError:  # the thin client runs without torch, handing out numpy arrays
    torch = None  # type: ignore[assignment]
    HAVE_TORCH = False

_NUMPY = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "bfloat16": np.uint16,
          "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
          "bool": np.bool_}


class Segment:
    """One shared-memory arena mapped into this process, for as long as the process lives."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.map = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.path = path

    def drop_pages(self, offset: int, length: int) -> None:
        try:
            self.map.madvise(mmap.MADV_DONTNEED, offset, length)
        except (OSError, ValueError):
            pass  # an optimisation only: the pages stay mapped until reused


@dataclass(eq=False)
class Lease:
    """A lease the daemon granted on one entry, and the views this process has of it."""

    hkey: tuple[str, Spec]  # (encoder, spec): its place in the client's handle cache
    key: bytes
    lease_id: int
    segment: Segment
    offset: int
    length: int
    layout: Layout
    stamp: tuple[int, ...] | None = None  # the source file's stamp, taken before the request
    instance: str = ""                    # the daemon instance that granted the lease
    base: _Watch | None = None            # weak reference to the numpy array under the live views

    def alive(self) -> bool:
        return self.base is not None and self.base() is not None

    def views(self, dead: deque, want_torch: bool) -> dict[str, Any]:
        """Tensors over the slot; reuses the live base when there is one."""
        base = self.base() if self.base is not None else None
        if base is None:
            base = np.frombuffer(self.segment.map, dtype=np.uint8, count=self.length, offset=self.offset)
            self.base = _Watch(base, dead.append, self)
        return {name: _tensor(base, dtype, shape, off, nbytes, want_torch)
                for name, dtype, shape, off, nbytes in self.layout}


class _Watch(weakref.ref):
    """A weak reference that knows its lease. When the array it watches dies, the callback (run in
    whichever thread dropped the last view, possibly inside the GC) only appends it to a deque."""

    __slots__ = ("lease",)

    def __new__(cls, ob: Any, callback: Any, lease: Lease) -> _Watch:
        return super().__new__(cls, ob, callback)

    def __init__(self, ob: Any, callback: Any, lease: Lease) -> None:
        super().__init__(ob, callback)  # type: ignore[call-arg]  # typeshed omits ref.__init__
        self.lease = lease


def _tensor(base: np.ndarray, dtype: str, shape: tuple[int, ...], off: int, nbytes: int,
            want_torch: bool) -> Any:
    arr: np.ndarray = base[off:off + nbytes].view(_NUMPY[dtype]).reshape(shape)
    if not want_torch:
        return arr
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


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

