"""Every way of reading a shuffled epoch of batches that bench/dataloader.py compares, as an object
with `epoch() -> items`: the same order (a seeded permutation, batch after batch, the last partial
batch dropped) for all.

Workerless, in the trainer's process:
- loader: `CacheClient.loader` (a thread gathers batches; the dataset fits, so after the first epoch
  its handles stay resident and each item costs one stat of its source);
- loader, streaming: the same with resident=False (every window resolved through the daemon again);
- CachedDataset, 0 workers: `CachedDataset` in a DataLoader without workers (one get per batch);
- arena, main process (the ceiling): views at known offsets of one mapped arena, `torch.stack`;
- arena, prefetching thread: the same on a background thread, 4 batches ahead through a queue, each
  batch a new tensor as in the ceiling (nothing to resolve, check or lease);
- in-RAM list: the latents as tensors in a list, `torch.stack`.
With 4 DataLoader workers (persistent, fork): CachedDataset, the handle mode (workers resolve,
the main process gathers), the arena, per-item safetensors files.

    python bench/readers.py trainer CONFIG.pkl   # one trainer process (the harness runs it)
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from methods import ArenaViews, CachedLatents, InRam, Latents, PerItemFiles, read_safetensors
from torch.utils.data import DataLoader

from cached_client import CacheClient
from cached_client.torch import CachedDataset, collate_handles, gathered

__all__ = ["READERS", "WORKERLESS", "make_reader"]

BATCH = 32
WORKERS = 4


def _order(n: int, seed: int, epoch: int) -> list[np.ndarray]:
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [perm[i:i + BATCH] for i in range(0, n - n % BATCH, BATCH)]


class _Stacked:
    """A main-process reader of `views[i]` stacked per batch (the arena ceiling, the in-RAM list)."""

    def __init__(self, views: list[torch.Tensor], seed: int) -> None:
        self.views, self.seed, self.epochs = views, seed, 0

    def epoch(self) -> int:
        n = 0
        for batch in _order(len(self.views), self.seed, self.epochs):
            n += len(torch.stack([self.views[i] for i in batch.tolist()]))
        self.epochs += 1
        return n


class _StackedAhead(_Stacked):
    """The ceiling's gather on a background thread, batches handed over a queue 4 deep: what a
    prefetching loader does, with nothing to resolve, check or lease."""

    def epoch(self) -> int:
        batches: queue.Queue = queue.Queue(maxsize=4)

        def produce() -> None:
            for batch in _order(len(self.views), self.seed, self.epochs):
                batches.put(torch.stack([self.views[i] for i in batch.tolist()]))
            batches.put(None)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        n = 0
        while (got := batches.get()) is not None:
            n += len(got)
        thread.join()
        self.epochs += 1
        return n


def _arena_views(lat: Latents) -> list[torch.Tensor]:
    data = ArenaViews(lat.arena, len(lat), lat.shape)
    return [data[i] for i in range(len(lat))]


class _Loader:
    def __init__(self, address: str, lat: Latents, seed: int, resident: bool = True) -> None:
        self.loader = CacheClient(address).loader(lat.specs, lat.encoder, BATCH, shuffle=True, seed=seed,
                                                  drop_last=True, resident=resident)

    def epoch(self) -> int:
        return sum(len(b["index"]) for b in self.loader)

    def restart(self) -> None:
        """Drops what the loader prefetched while other readers ran: a timed run starts cold."""
        self.loader.set_epoch(self.loader.state_dict()["epoch"])

    def close(self) -> None:
        self.loader.close()


class _Torch:
    """A DataLoader over a map-style dataset; `gather` for the handle mode."""

    def __init__(self, dataset: Any, workers: int, seed: int, collate: Any = None,
                 gather: Callable[[DataLoader], Any] | None = None) -> None:
        self.loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
                                 persistent_workers=workers > 0, prefetch_factor=2 if workers else None,
                                 generator=torch.Generator().manual_seed(seed), timeout=300 if workers else 0,
                                 multiprocessing_context="fork" if workers else None,
                                 **({"collate_fn": collate} if collate else {}))
        self.gather = gather

    def epoch(self) -> int:
        batches = self.gather(self.loader) if self.gather else self.loader
        return sum(len(b["latent"] if isinstance(b, dict) else b) for b in batches)


def _handles(address: str, lat: Latents, seed: int) -> _Torch:
    client = CacheClient(address)
    return _Torch(CachedDataset(client, lat.specs, lat.encoder, handles=True), WORKERS, seed,
                  collate=collate_handles, gather=lambda loader: gathered(loader, client))


READERS: dict[str, Callable[[str, Latents, int], Any]] = {
    "loader": _Loader,
    "loader, streaming (not resident)": lambda a, lat, s: _Loader(a, lat, s, resident=False),
    "CachedDataset, 0 workers": lambda a, lat, s: _Torch(CachedLatents(CacheClient(a), lat.specs, lat.encoder), 0, s),
    "arena, main process (ceiling)": lambda a, lat, s: _Stacked(_arena_views(lat), s),
    "arena, prefetching thread": lambda a, lat, s: _StackedAhead(_arena_views(lat), s),
    "in-RAM list": lambda a, lat, s: _Stacked(InRam.load(lat).latents, s),
    "CachedDataset, 4 workers": lambda a, lat, s: _Torch(CachedLatents(CacheClient(a), lat.specs, lat.encoder), WORKERS, s),
    "handle mode, 4 workers": _handles,
    "arena, 4 workers": lambda a, lat, s: _Torch(ArenaViews(lat.arena, len(lat), lat.shape), WORKERS, s),
    "safetensors/item, 4 workers": lambda a, lat, s: _Torch(PerItemFiles(lat.safetensors, read_safetensors), WORKERS, s),
}
WORKERLESS = ("loader", "loader, streaming (not resident)", "CachedDataset, 0 workers",
              "arena, main process (ceiling)", "arena, prefetching thread", "in-RAM list")


def make_reader(method: str, address: str, lat: Latents, seed: int = 0) -> Any:
    return READERS[method](address, lat, seed)


def timed(reader: Any, epochs: int = 1) -> float:
    """items/s over `epochs` epochs, back to back."""
    if hasattr(reader, "restart"):
        reader.restart()
    t0 = time.perf_counter()
    n = sum(reader.epoch() for _ in range(epochs))
    return n / (time.perf_counter() - t0)


def trainer(config: dict[str, Any]) -> dict[str, Any]:
    """One trainer process: builds its reader, waits at the barrier, times `epochs` epochs (the
    first one of a fresh process included), reports items/s per epoch and the wall time."""
    from memory import _barrier  # the same file barrier as the memory benchmark

    lat = config["latents"]
    reader = make_reader(config["method"], config["address"], lat, seed=os.getpid())
    _barrier(config["barrier"], "ready", config["k"])
    t0 = time.perf_counter()
    rates = [timed(reader) for _ in range(config["epochs"])]
    wall = time.perf_counter() - t0
    if hasattr(reader, "close"):
        reader.close()
    return {"rates": rates, "wall_s": wall, "items": config["epochs"] * (len(lat) - len(lat) % BATCH)}


if __name__ == "__main__" and sys.argv[1:2] == ["trainer"]:
    with open(sys.argv[2], "rb") as f:
        cfg = pickle.load(f)
    print(json.dumps(trainer(cfg)), flush=True)
