"""What a training loop needs around the client.

    client = CacheClient()
    dataset = CachedDataset(client, {"vae": image_specs, "clip": caption_specs})
    sampler = BucketBatchSampler(image_specs, batch_size=32, prefetch=(client, {"vae": image_specs}))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4, persistent_workers=True)

Latents need no DataLoader workers: `client.loader(...)` (loader.py) gathers batches in the main
process at memory speed. For a trainer that keeps its DataLoader, the handle mode keeps the workers
but moves the copy out of them: `CachedDataset(..., handles=True)` makes each worker return a
batch's handles (a few hundred bytes), `collate_handles` passes them through, and `gathered(loader)`
copies each batch out of shared memory in the main process, so no batch tensor crosses a worker
pipe:

    loader = DataLoader(CachedDataset(client, specs, "vae", handles=True), batch_size=32,
                        num_workers=4, collate_fn=collate_handles, persistent_workers=True)
    for batch in gathered(loader, client):
        ...

`CachedDataset` fetches a whole batch per call (DataLoader hands `__getitems__` a batch's indices), so
a worker makes one RPC per batch per encoder, and repeated specs cost no RPC while their handles are
cached. Items are dicts of the entries' tensors (zero-copy views until collate stacks them) plus
"key" (or "<encoder>.key" with several encoders). `BucketBatchSampler` makes batches whose items share
a size, as bucketed training needs, and hints the daemon about the batches `lookahead` steps ahead,
so a first epoch over a cold cache overlaps encoding with training. Both are plain picklable objects:
fork, spawn, forkserver and thread-based loading all work.
"""

from __future__ import annotations

import random
from collections import defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .client import CacheClient
from .errors import DaemonUnavailable
from .gather import Buffers, HandleBatch, gather, unchanged
from .specs import ImageSpec, Spec

__all__ = ["CachedDataset", "BucketBatchSampler", "collate_handles", "gathered", "HOLD_BATCHES"]

HOLD_BATCHES = 8  # batches whose leases a worker keeps: more than a DataLoader has in flight per worker


class CachedDataset(Dataset):
    """Entries by index: `specs` for one `encoder`, or a mapping {encoder: specs} of equal lengths
    (e.g. latents and caption embeddings of the same images). With `handles=True`, a batch is its
    handles (see the module docstring): use `collate_handles` and `gathered`."""

    def __init__(self, client: CacheClient, specs: Sequence[Spec] | Mapping[str, Sequence[Spec]],
                 encoder: str | None = None, compute: bool = True, handles: bool = False,
                 hold: int = HOLD_BATCHES) -> None:
        if isinstance(specs, Mapping):
            if encoder is not None:
                raise ValueError("give either specs and encoder, or a mapping {encoder: specs}")
            columns = {name: list(s) for name, s in specs.items()}
        else:
            if encoder is None:
                raise ValueError("encoder is required when specs is a sequence")
            columns = {encoder: list(specs)}
        lengths = {name: len(s) for name, s in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"every encoder needs one spec per item, got lengths {lengths}")
        self.client = client
        self.columns = columns
        self.compute = compute
        self.handles = handles
        self.hold = hold
        self._held: deque[list[int]] = deque()  # this worker's leases of its last `hold` batches

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_held": deque()}  # leases stay with the process that took them

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.handles:
            raise TypeError("CachedDataset(handles=True) loads whole batches: give the DataLoader a batch_size")
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> Any:
        if self.handles:
            return self._handles(list(indices))
        items: list[dict[str, Any]] = [{} for _ in indices]
        single = len(self.columns) == 1
        for name, specs in self.columns.items():
            entries = self.client.get([specs[i] for i in indices], encoder=name, compute=self.compute)
            for item, e in zip(items, entries, strict=True):
                for tensor, value in e.items():
                    if tensor in item:
                        raise ValueError(f"encoders {sorted(self.columns)} both produce {tensor!r}")
                    item[tensor] = value
                item["key" if single else f"{name}.key"] = e.key
        return items


    def _handles(self, indices: list[int]) -> dict[str, Any]:
        """{encoder: HandleBatch} of the batch, plus "index": the worker keeps the leases of its last
        `hold` batches, long enough for the main process to gather them (which checks anyway)."""
        release = self._held.popleft() if len(self._held) >= self.hold else []
        out: dict[str, Any] = {"index": indices}
        taken: list[int] = []
        rows = np.arange(len(indices))
        for name, specs in self.columns.items():
            resolved = self.client.resolve([specs[i] for i in indices], name, compute=self.compute, release=release)
            release = []
            taken += resolved.lease_ids
            out[name] = resolved.batch(rows)
        self._held.append(taken)
        return out


def collate_handles(batch: Any) -> Any:
    """The DataLoader collate_fn of the handle mode: the worker's handles, passed through."""
    return batch


def gathered(loader: Iterable[Any], client: CacheClient) -> Iterator[dict[str, Any]]:
    """The batches of a handle-mode DataLoader, copied out of shared memory in this process: the
    same {tensor: (B, ...), "key": [hex, ...]} the plain path collates (one "<encoder>.key" per
    encoder when there are several). A slot reused since the worker resolved it is read again
    through `client.get`."""
    dataset = getattr(loader, "dataset", None)
    buffers = Buffers()
    for handles in loader:
        indices = handles["index"]
        out: dict[str, Any] = {}
        names = [k for k in handles if k != "index"]
        for name in names:
            hb: HandleBatch = handles[name]
            segments = {sid: client.segment(path) for sid, path in hb.segments.items()}
            tensors = gather(hb.records, segments, hb.layouts, buffers, as_torch=True)
            _reread_changed(client, dataset, name, indices, hb, segments, tensors)
            out.update(tensors)
            out["key" if len(names) == 1 else f"{name}.key"] = [k.ljust(32, b"\0").hex()
                                                                for k in hb.records["key"].tolist()]
        yield out


def _reread_changed(client: CacheClient, dataset: Any, name: str, indices: list[int], hb: HandleBatch,
                    segments: dict[int, Any], tensors: dict[str, torch.Tensor]) -> None:
    stale = np.flatnonzero(~unchanged(hb.records, segments))
    if not len(stale):
        return
    if dataset is None:
        raise DaemonUnavailable("a slot was reused before the main process gathered it, and the loader has "
                                "no dataset to read it again from")
    specs = [dataset.columns[name][indices[j]] for j in stale.tolist()]
    for j, e in zip(stale.tolist(), client.get(specs, encoder=name), strict=True):
        for tensor, out in tensors.items():
            out[j] = e[tensor]


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices whose specs share a target size, shuffled per epoch (call set_epoch).

    With `prefetch=(client, {encoder: specs})`, yielding batch i hints the daemon about batch
    i + lookahead. Runs in the process that iterates the DataLoader, not in the workers.
    """

    def __init__(self, specs: Sequence[Spec], batch_size: int, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, prefetch: tuple[CacheClient, Mapping[str, Sequence[Spec]]] | None = None,
                 lookahead: int = 4) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead!r}")
        buckets: dict[Any, list[int]] = defaultdict(list)
        for i, spec in enumerate(specs):
            buckets[spec.size if isinstance(spec, ImageSpec) else None].append(i)
        self.buckets = list(buckets.values())
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.prefetch = prefetch
        self.lookahead = lookahead
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        out = []
        for bucket in self.buckets:
            order = rng.sample(bucket, len(bucket)) if self.shuffle else list(bucket)
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    out.append(batch)
        if self.shuffle:
            rng.shuffle(out)
        return out

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        for i in range(min(self.lookahead, len(batches))):
            self._hint(batches[i])
        for i, batch in enumerate(batches):
            if i + self.lookahead < len(batches):
                self._hint(batches[i + self.lookahead])
            yield batch

    def _hint(self, batch: list[int]) -> None:
        if self.prefetch is None:
            return
        client, columns = self.prefetch
        for name, specs in columns.items():
            client.prefetch([specs[i] for i in batch], encoder=name)
