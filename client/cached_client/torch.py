"""What a training loop needs around the client.

    client = CacheClient()
    dataset = CachedDataset(client, {"vae": image_specs, "clip": caption_specs})
    sampler = BucketBatchSampler(image_specs, batch_size=32, prefetch=(client, {"vae": image_specs}))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4, persistent_workers=True)

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
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset, Sampler

from .client import CacheClient
from .specs import ImageSpec, Spec

__all__ = ["CachedDataset", "BucketBatchSampler"]


class CachedDataset(Dataset):
    """Entries by index: `specs` for one `encoder`, or a mapping {encoder: specs} of equal lengths
    (e.g. latents and caption embeddings of the same images)."""

    def __init__(self, client: CacheClient, specs: Sequence[Spec] | Mapping[str, Sequence[Spec]],
                 encoder: str | None = None, compute: bool = True) -> None:
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

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
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
