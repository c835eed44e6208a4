"""Batches copied out of shared memory in one pass: the handles of many items as arrays, and the
gather that stacks their tensors into one buffer per name (one memcpy per item and tensor).

`Resolved` is what one resolve RPC returns: the wire.HANDLE records of its items, in order, the
segments and tensor tables they name, and the errors of the items that failed. `HandleBatch` is the
same for one batch in a form that pickles (paths, layout JSON), so a DataLoader worker can resolve
a batch and the main process gather it without a batch tensor ever crossing the worker pipe.

Gathers read through each segment's read-only shared mapping, so they never see pages this process
wrote. A gather of a batch whose leases another process holds (a worker's) checks every slot's
header after the copy: a slot reused meanwhile is found and re-read through the caller's own `get`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CacheError, InvalidSpec
from .stamp import Stamp
from .views import _NUMPY, Segment
from .wire import SLOT_GENERATION, SLOT_KEY, Layout

__all__ = ["Resolved", "HandleBatch", "Buffers", "gather", "unchanged"]


@dataclass
class Resolved:
    records: np.ndarray                       # wire.HANDLE, one per requested item, in order
    segments: dict[int, Segment]
    layouts: dict[int, Layout]
    errors: dict[int, CacheError] = field(default_factory=dict)
    stamps: list[Stamp | None] | None = None  # per item, its source's stamp as the daemon took it

    @property
    def lease_ids(self) -> list[int]:
        return [int(x) for x in self.records["lease"] if x]

    def check(self, rows: np.ndarray) -> None:
        """Raises the error of the first failed item among `rows`."""
        if not self.errors:
            return
        for r in rows.tolist():
            if r in self.errors:
                raise self.errors[r]

    def batch(self, rows: np.ndarray) -> HandleBatch:
        """The picklable handles of `rows`, for a gather in another process."""
        self.check(rows)
        recs = self.records[rows]
        segs = {int(s): self.segments[int(s)].path for s in np.unique(recs["segment"])}
        lays = {int(lid): self.layouts[int(lid)] for lid in np.unique(recs["layout"])}
        return HandleBatch(recs, segs, lays)


@dataclass
class HandleBatch:
    """One batch's handles, resolved in a DataLoader worker and gathered in the main process."""

    records: np.ndarray
    segments: dict[int, str]
    layouts: dict[int, Layout]
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the items' indices, keys

    def __len__(self) -> int:
        return len(self.records)


class Buffers:
    """Output buffers reused once nothing refers to them any more. A batch's tensors are numpy
    arrays handed to torch, so a buffer is free exactly when no tensor (or slice of one) made from
    it is alive; a batch a trainer keeps is never overwritten."""

    def __init__(self, allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray] | None = None) -> None:
        self._allocate = allocate or (lambda shape, dtype: np.empty(shape, dtype))
        self._pool: dict[tuple[tuple[int, ...], str], list[np.ndarray]] = {}

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        pool = self._pool.setdefault((shape, dtype.str), [])
        for k in range(len(pool)):
            # nobody else refers to it: only the pool's list and getrefcount's own argument do
            if sys.getrefcount(pool[k]) <= 2:
                return pool[k]
        buf = self._allocate(shape, dtype)
        pool.append(buf)
        return buf

    def __len__(self) -> int:
        return sum(len(p) for p in self._pool.values())


def gather(records: np.ndarray, segments: Mapping[int, Segment], layouts: Mapping[int, Layout],
           buffers: Buffers | None = None, as_torch: bool = False,
           pool: ThreadPoolExecutor | None = None) -> dict[str, Any]:
    """{tensor name: (B, *shape) array} of the records' entries, stacked (torch tensors with
    `as_torch`: bfloat16 stays bfloat16). InvalidSpec when the entries' tensors differ in shape (a
    batch mixing sizes: bucket it). With `pool`, the copies are split over its threads."""
    n = len(records)
    lids = records["layout"]
    if not n or (lids != lids[0]).any():
        shapes = sorted({tuple(t[2] for t in layouts[int(lid)]) for lid in np.unique(lids)})
        raise InvalidSpec(f"a batch mixes entries of different shapes {shapes[:3]}; batch same-size specs "
                          f"together (BucketBatchSampler)")
    layout = layouts[int(lids[0])]
    offsets = records["offset"].tolist()
    sids = records["segment"].tolist()
    shared = {sid: segments[sid].shared for sid in set(sids)}
    segs = [shared[sid] for sid in sids]
    out: dict[str, np.ndarray] = {}
    for name, dtype, shape, off, nbytes in layout:
        dt = np.dtype(_NUMPY[dtype])
        buf = buffers.take((n, *shape), dt) if buffers is not None else np.empty((n, *shape), dt)
        rows = buf.reshape(n, -1).view(np.uint8)
        starts = [o + off for o in offsets]
        if pool is None or n < 2 * MIN_SHARE:
            _copy(rows, segs, starts, nbytes, 0, n)
        else:
            k = min(pool._max_workers, n // MIN_SHARE)  # the pool's size, kept nowhere else
            shares = [pool.submit(_copy, rows, segs, starts, nbytes, n * i // k, n * (i + 1) // k) for i in range(k)]
            for share in shares:
                share.result()
        out[name] = _torch(buf, dtype) if as_torch else buf
    return out


MIN_SHARE = 4  # items a copy thread takes at least: fewer cost more to hand over than to copy


def _copy(rows: np.ndarray, segs: list[np.ndarray], starts: list[int], nbytes: int, lo: int, hi: int) -> None:
    """numpy's copies of items lo..hi out of their segments' shared mappings: numpy lets go of the
    interpreter while it copies, so copy threads use several cores; and there is no OpenMP team,
    which on a loader's thread beside the trainer's own (and other trainers' on the same cores)
    spins the cores away."""
    for j in range(lo, hi):
        rows[j] = segs[j][starts[j]:starts[j] + nbytes]


def _torch(arr: np.ndarray, dtype: str) -> Any:
    import torch

    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def unchanged(records: np.ndarray, segments: Mapping[int, Segment]) -> np.ndarray:
    """A bool per record: its slot still holds the entry it named (key and generation in the slot
    header match), checked after a gather that did not hold the leases itself."""
    ok = np.ones(len(records), dtype=bool)
    for j, (key, gen, off, seg) in enumerate(zip(records["key"].tolist(), records["generation"].tolist(),
                                                 records["offset"].tolist(), records["segment"].tolist(),
                                                 strict=True)):
        head = segments[seg].shared
        ok[j] = (bytes(head[off + SLOT_KEY.start:off + SLOT_KEY.stop]) == key.ljust(32, b"\0")
                 and int.from_bytes(bytes(head[off + SLOT_GENERATION.start:off + SLOT_GENERATION.stop]),
                                    "little") == gen)
    return ok
