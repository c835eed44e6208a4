"""The ways of reading latents in a DataLoader that the benchmarks compare, as map-style datasets.

Each returns one fp32 latent tensor per item and leaves batching to the DataLoader's default
collate (a stack into shared memory, the same for all), so the methods differ only in how an item
reaches the worker. Every dataset is plain data until a worker first reads from it, so it crosses
fork and spawn alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from cached_client import CacheClient, ImageSpec
from cached_client.views import Segment

__all__ = ["Latents", "CachedLatents", "ArenaViews", "PerItemFiles", "read_safetensors", "read_npz", "InRam", "NoData",
           "METHODS", "make_loader"]


@dataclass(frozen=True)
class Latents:
    """N latents of one size, and where each method finds them."""

    name: str                    # "128KiB"
    encoder: str                 # the daemon's encoder name
    shape: tuple[int, int, int]  # (C, H, W), fp32
    specs: list[ImageSpec]
    arena: str                   # all N back to back in /dev/shm: item i at i * nbytes
    safetensors: list[str]
    npz: list[str]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def __len__(self) -> int:
        return len(self.specs)


class CachedLatents(Dataset):
    """cached: specs only; each worker fetches a whole batch in one client.get (one RPC)."""

    def __init__(self, client: CacheClient, specs: Sequence[ImageSpec], encoder: str) -> None:
        self.client, self.specs, self.encoder = client, list(specs), encoder

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        entries = self.client.get([self.specs[i] for i in indices], encoder=self.encoder)
        return [e["latent"] for e in entries]


class ArenaViews(Dataset):
    """The design's ceiling: views sliced out of one shared-memory file at known offsets, mapped
    once per process the way the client maps the daemon's arenas (and never unmapped, since
    closing a map under a live view segfaults)."""

    def __init__(self, path: str, n: int, shape: tuple[int, ...]) -> None:
        self.path, self.n, self.shape = path, n, shape
        self.count = int(np.prod(shape))
        self._segment: tuple[int, Segment] | None = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_segment": None}

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._segment is None or self._segment[0] != os.getpid():
            self._segment = (os.getpid(), Segment(self.path))
        arr = np.frombuffer(self._segment[1].map, np.float32, self.count, i * self.count * 4)
        return torch.from_numpy(arr.reshape(self.shape))


def read_safetensors(path: str) -> torch.Tensor:
    """ai-toolkit's cache_latents_to_disk: load_file of the item's own file."""
    return load_file(path)["latent"]


def read_npz(path: str) -> torch.Tensor:
    """kohya sd-scripts: np.load of the fp32 npz beside the image."""
    with np.load(path) as z:
        return torch.from_numpy(z["latents"])


class PerItemFiles(Dataset):
    """One file per item, read when the item is asked for."""

    def __init__(self, paths: Sequence[str], read: Callable[[str], torch.Tensor]) -> None:
        self.paths, self.read = list(paths), read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.read(self.paths[i])


class InRam(Dataset):
    """Per-trainer in-RAM caching: every latent held by the dataset object, in each trainer."""

    def __init__(self, latents: list[torch.Tensor]) -> None:
        self.latents = latents

    @classmethod
    def load(cls, lat: Latents) -> InRam:
        """Each latent in a tensor of its own in private memory, as a trainer that encoded them
        holds them (not load_file, whose tensors map the file and so live in the page cache)."""
        latents = []
        with open(lat.arena, "rb") as f:
            for _ in range(len(lat)):
                t = torch.empty(lat.shape)
                f.readinto(t.numpy())  # type: ignore[arg-type]
                latents.append(t)
        return cls(latents)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.latents[i]


class NoData(Dataset):
    """The control: one small tensor for every item, so a run measures the processes themselves
    (interpreters, DataLoader queues, batches in flight) and no data."""

    def __init__(self, n: int, shape: tuple[int, ...]) -> None:
        self.n, self.item = n, torch.zeros(shape)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.item


# name -> (dataset from (address, Latents), multiprocessing start method)
METHODS: dict[str, tuple[Callable[[str, Latents], Dataset], str]] = {
    "cached": (lambda addr, lat: CachedLatents(CacheClient(addr), lat.specs, lat.encoder), "fork"),
    "shm ceiling": (lambda addr, lat: ArenaViews(lat.arena, len(lat), lat.shape), "fork"),
    "safetensors/item": (lambda addr, lat: PerItemFiles(lat.safetensors, read_safetensors), "fork"),
    "npz/item": (lambda addr, lat: PerItemFiles(lat.npz, read_npz), "fork"),
    "in-RAM fork": (lambda addr, lat: InRam.load(lat), "fork"),
    "in-RAM spawn": (lambda addr, lat: InRam.load(lat), "spawn"),
}


def make_loader(dataset: Dataset, workers: int, context: str, batch_size: int = 32,
                seed: int = 0) -> DataLoader:
    """A trainer's loader: shuffled, persistent workers, batches stacked by the default collate.
    A batch that takes over five minutes raises instead of hanging the suite (a stuck worker)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      multiprocessing_context=context, persistent_workers=True, prefetch_factor=2,
                      generator=torch.Generator().manual_seed(seed), timeout=300)
