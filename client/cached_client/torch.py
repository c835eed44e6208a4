"""What a training loop needs around the client: a Dataset that fetches a whole batch per call.

    dataset = CachedDataset(CacheClient(), specs, encoder="vae")
    loader = DataLoader(dataset, batch_size=32, num_workers=4)   # one client.get per batch

DataLoader calls `__getitems__` with a batch's indices, so a worker makes one RPC per batch, and
repeated specs cost no RPC at all while their handles are cached. Each item is a dict of the entry's
tensors (zero-copy views until collate stacks them) plus its "key".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from .client import CacheClient
from .specs import Spec

__all__ = ["CachedDataset"]


class CachedDataset(Dataset):
    """Entries for `specs` from `encoder`; picklable, so it works with fork, spawn and forkserver."""

    def __init__(self, client: CacheClient, specs: Sequence[Spec], encoder: str, compute: bool = True) -> None:
        self.client = client
        self.specs = list(specs)
        self.encoder = encoder
        self.compute = compute

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        entries = self.client.get([self.specs[i] for i in indices], encoder=self.encoder, compute=self.compute)
        return [{**e.tensors, "key": e.key} for e in entries]
