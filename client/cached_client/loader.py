"""A workerless loader: batches gathered straight out of shared memory by a background thread.

    loader = client.loader(specs, "vae", batch_size=64, shuffle=True, seed=0, device="cuda")
    for epoch in range(epochs):
        for batch in loader:            # one epoch; the next `for` is the next epoch
            train_step(batch["latent"])  # (B, C, H, W), already on the device

DataLoader workers cost latents more than they give: each collates a batch into a new shared-memory
tensor and pipes it to the main process, about 7x slower than gathering in the main process. Here a
thread resolves a window of upcoming batches in one RPC (the handles arrive as arrays), copies each
batch into a buffer (one memcpy per item and tensor), and, with a device, copies it there from
pinned memory on a side stream, `prefetch_batches` ahead of the training loop. It runs on into the
next epoch, so epoch boundaries do not stall. Leases are taken per window and given back once the
window is gathered: a dataset larger than shared memory streams through.

Order: the `rank`-th of `world_size` disjoint shares of a permutation seeded by (seed, epoch), the
same on every rank, like DistributedSampler; or the batches of a `batch_sampler` (BucketBatchSampler
for mixed sizes), every `world_size`-th of them. `state_dict` / `load_state_dict` resume mid-epoch at
exactly the next batch.

Here is the Loader and its work on the producer's thread (resolve, gather); the order and its
windows are in order.py, the producer thread and the device copy in producer.py.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import CacheError, InvalidSpec, LimitExceeded
from .gather import Buffers, Resolved, gather
from .order import _check, _columns, _Position, _Pushback, _window, epoch_batches
from .producer import _END, _Copier, _Producer
from .resident import Resident
from .specs import Spec

if TYPE_CHECKING:
    from .client import CacheClient

__all__ = ["Loader", "epoch_batches"]

WINDOW_ITEMS = 1024          # items resolved in one RPC at most
WINDOW_BYTES = 32 << 20      # ... and at most this many leased bytes (a dataset larger than shm streams)
# (window, {encoder: handles}, {item index: row} or None when rows are item indices, leases to give
# back once the window is gathered)
_Resolution = tuple[list[Any], dict[str, Resolved], dict[int, int] | None, list[int]]


class Loader:
    def __init__(self, client: CacheClient, specs: Sequence[Spec] | Sequence[Sequence[Spec]] | Mapping[str, Sequence[Spec]],
                 encoder: str | Sequence[str] | None, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, prefetch_batches: int = 4,
                 pin_memory: bool | None = None, device: str | torch.device | None = None,
                 batch_sampler: Any = None, compute: bool = True, window: int = WINDOW_ITEMS,
                 resident: bool | int = True, copy_threads: int | None = None) -> None:
        self.columns = _columns(specs, encoder)
        self.n = len(next(iter(self.columns.values())))
        _check(batch_size, rank, world_size, prefetch_batches, window)
        self.client = client
        self.batch_size = batch_size
        self.order = dict(shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size,
                          batch_sampler=batch_sampler)
        self.prefetch_batches = prefetch_batches
        self.device = torch.device(device) if device is not None else None
        cuda = self.device is not None and self.device.type == "cuda"
        self.pin_memory = cuda if pin_memory is None else pin_memory
        if self.pin_memory and not torch.cuda.is_available():
            raise InvalidSpec("pin_memory needs CUDA, which this torch does not have")
        self.compute = compute
        self.window = window
        self._wire = {name: [s._wire for s in specs_] for name, specs_ in self.columns.items()}
        self._position = _Position(0, 0)
        self._resume = False  # the next iteration continues _position (set by load_state_dict, set_epoch)
        self._producer: _Producer | None = None
        self._window_items = min(window, 4 * batch_size)  # a small first window measures the items
        self._keep = resident
        # copies split over this many threads (numpy copies without the interpreter lock): a copy
        # bound by memory bandwidth needs a few cores, not all of the trainer's
        self.copy_threads = copy_threads or min(4, os.cpu_count() or 1)
        self._copiers: ThreadPoolExecutor | None = None
        self._resident: Resident | None = None
        # what a fresh process does once, here rather than in the first epoch: ask the daemon's size
        # (resident by default: it connects) and order the first epoch (numpy loads its random code
        # on first use)
        self._orders: dict[int, list[np.ndarray]] = {}
        self._orders_mu = threading.Lock()
        self._make_resident()
        self._batches(0)

    # the epoch protocol

    def __len__(self) -> int:
        return len(self._batches(self._position.epoch))

    def _batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches, remembered for the last two epochs asked (the training loop's
        `len()` and the producer, which runs ahead into the next)."""
        with self._orders_mu:
            got = self._orders.get(epoch)
            if got is None:
                got = epoch_batches(self.n, self.batch_size, epoch=epoch, **self.order)
                if len(self._orders) >= 2:
                    del self._orders[min(self._orders)]
                self._orders[epoch] = got
            return got

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is epoch `epoch`, from its start."""
        self._restart(_Position(epoch, 0))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._position.epoch, "batch": self._position.batch, "n": self.n,
                "batch_size": self.batch_size, "seed": self.order["seed"], "rank": self.order["rank"],
                "world_size": self.order["world_size"]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resumes where `state` was taken: the next iteration yields the rest of that epoch."""
        for key in ("n", "batch_size", "seed", "rank", "world_size"):
            mine = self.n if key == "n" else self.batch_size if key == "batch_size" else self.order[key]
            if state.get(key, mine) != mine:
                raise InvalidSpec(f"state_dict is of a loader with {key}={state[key]!r}, this one has {mine!r}")
        self._restart(_Position(int(state["epoch"]), int(state["batch"])))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """One epoch: the next one, or, after load_state_dict or set_epoch, the one they name from
        where they say. An iteration left unfinished is over: the next one starts a new epoch, as a
        DataLoader's does."""
        start = self._position
        if start.batch and not self._resume:
            start = _Position(start.epoch + 1, 0)
        self._resume = False
        if self._producer is None or self._producer.start != start:
            self._stop()
            self._producer = _Producer(self, start)
        producer = self._producer
        assert producer is not None
        epoch, batch = start.epoch, start.batch
        while True:
            item = producer.next()
            if item is _END:
                break
            batch += 1
            self._position = _Position(epoch, batch)
            yield item
        self._position = _Position(epoch + 1, 0)
        producer.start = self._position  # it already runs into the next epoch

    def _restart(self, position: _Position) -> None:
        self._stop()
        self._position = position
        self._resume = True
        self._producer = _Producer(self, position)

    def close(self) -> None:
        """Stops the background thread and gives back the leases it holds, and those kept resident."""
        self._stop()
        if self._resident is not None:
            self._release(self._resident.abandon())
            self._resident = None

    def _stop(self) -> None:
        if self._producer is not None:
            self._producer.stop()
            self._producer = None

    def __del__(self) -> None:
        self.close()

    # the work, on the producer's thread

    def produce(self, position: _Position, put: Any, stopped: threading.Event) -> None:
        """Resolves, gathers and puts batches from `position` on, epoch after epoch. The next
        window is resolved (an RPC the daemon answers on its own cores) while this one is gathered."""
        copier = _Copier(self.device, Buffers(self._allocator()))
        resolver = ThreadPoolExecutor(1, thread_name_prefix="cached-resolve")
        self._copiers = ThreadPoolExecutor(self.copy_threads, thread_name_prefix="cached-copy") \
            if self.copy_threads > 1 else None
        held: list[list[int]] = []  # lease ids of the windows resolved and not kept, oldest first
        self._make_resident()
        ahead: Future | None = None
        try:
            windows = _Pushback(self._windows(position, stopped))
            ahead = self._ahead(resolver, windows.next(), [])
            while (now := ahead.result()) is not None:  # type: ignore[union-attr]
                window, resolved, rows_of, transient = now
                if _over_cap(resolved) and len(window) > 1:  # this process's lease cap: halve the windows
                    self._release(transient)
                    self._window_items = max(self.batch_size, self._window_items // 2)
                    windows.push(window[:len(window) // 2], window[len(window) // 2:])
                    ahead = self._ahead(resolver, windows.next(), [])
                    continue
                held.append(transient)
                done = held.pop(0) if len(held) > 1 else []  # the window gathered before this one
                ahead = self._ahead(resolver, windows.next(), done)
                for batch in window:
                    item = _END if batch is None else self._gather(batch, resolved, rows_of, copier)
                    if stopped.is_set() or not put(item):
                        return
        finally:
            resolver.shutdown(wait=True)
            if self._copiers is not None:
                self._copiers.shutdown(wait=True)
            last = ahead.result() if ahead is not None and ahead.done() and not ahead.exception() else None
            self._release([i for ids in [*held, last[3] if last else []] for i in ids])

    def _windows(self, position: _Position, stopped: threading.Event) -> Iterator[list[Any]]:
        """Groups of consecutive batches, epoch after epoch from `position`; None marks an epoch's end."""
        epoch, skip = position.epoch, position.batch
        while not stopped.is_set():
            batches: list[Any] = [*self._batches(epoch)[skip:], None]
            while batches:
                window, batches = _window(batches, self._window_items)
                yield window
            epoch, skip = epoch + 1, 0

    def _ahead(self, resolver: ThreadPoolExecutor, window: list[Any] | None, release: list[int]) -> Future:
        """The next window's resolution: on the resolver thread while the daemon answers it, so it
        overlaps this window's gather; on this thread when the dataset is resident (a stat per
        item, which would only fight the gather for the interpreter on another thread)."""
        if self._resident is not None and self._resident.complete:
            done: Future = Future()
            done.set_result(self._resolve(window, release))
            return done
        return resolver.submit(self._resolve, window, release)

    def _make_resident(self) -> None:
        if self._resident is not None or self._keep is False:
            return
        budget = self._keep if not isinstance(self._keep, bool) else self._shm_capacity() // 2
        self._resident = Resident(self.columns, budget)

    def _shm_capacity(self) -> int:
        try:
            return int(self.client.stats()["tiers"]["shm"]["capacity_bytes"])
        except CacheError:
            return 0

    def _resolve(self, window: list[Any] | None, release: list[int]) -> _Resolution | None:
        """The handles of the window's distinct items, one RPC per encoder, or none at all while
        the dataset is resident and their sources unchanged; None past the end."""
        if window is None:
            self._release(release)
            return None
        real = [b for b in window if b is not None]
        items = sorted(set().union(*(b.tolist() for b in real)))  # no np.unique: its first call loads ~15 ms of code
        resident = self._resident
        if resident is not None and not self.client._daemon_alive():
            resident.reset()  # its leases died with the daemon that granted them
        if resident is not None and resident.complete:
            changed = resident.changed(items)
            if changed:
                stamps = resident.stamp(changed)
                replaced = resident.keep(changed, self._rpc(changed, release), stamps)
                self._release(replaced)
            else:
                self._release(release)
            return window, resident.view(), None, []
        keeping = resident is not None and not resident.abandoned
        out = self._rpc(items, release)
        self._fit(out)
        transient = [i for r in out.values() for i in r.lease_ids]
        if keeping and not _over_cap(out):
            self._release(resident.keep(items, out, resident.stamps_of(items, out)))  # type: ignore[union-attr]
            if not resident.abandoned:  # type: ignore[union-attr]
                transient = []
        return window, out, {i: r for r, i in enumerate(items)}, transient

    def _rpc(self, items: list[int], release: list[int]) -> dict[str, Resolved]:
        out = {}
        for name, wire in self._wire.items():
            if items:
                out[name] = self.client.resolve(b"\n".join([wire[i] for i in items]), name,
                                                compute=self.compute, release=release)
                release = []
        self._release(release)
        return out

    def _fit(self, resolved: dict[str, Resolved]) -> None:
        """Items per window such that a window's leases stay under WINDOW_BYTES."""
        per_item = sum(int(r.records["length"].mean()) for r in resolved.values() if len(r.records))
        if per_item:
            self._window_items = max(self.batch_size, min(self.window, WINDOW_BYTES // per_item))

    def _gather(self, batch: np.ndarray, resolved: dict[str, Resolved], rows_of: dict[int, int] | None,
                copier: _Copier) -> Any:
        try:
            rows = batch if rows_of is None else np.asarray([rows_of[i] for i in batch.tolist()], dtype=np.int64)
            out: dict[str, Any] = {}
            buffers = copier.buffers()
            for r in resolved.values():
                r.check(rows)
                for name, tensor in gather(r.records[rows], r.segments, r.layouts, buffers, as_torch=True,
                                           pool=self._copiers).items():
                    if name in out:
                        raise InvalidSpec(f"encoders {sorted(resolved)} both produce {name!r}")
                    out[name] = tensor
            out["index"] = torch.from_numpy(batch.copy())
            return copier.move(out)
        except CacheError as exc:
            return exc

    def _allocator(self) -> Any:
        if not self.pin_memory:
            return None
        return lambda shape, dtype: torch.empty(shape, dtype=_TORCH[dtype.str], pin_memory=True).numpy()

    def _release(self, ids: list[int]) -> None:
        if ids:
            try:
                self.client.release(ids)
            except CacheError:
                pass  # the daemon takes them back when this process goes


_TORCH = {np.dtype(np.float32).str: torch.float32, np.dtype(np.float16).str: torch.float16,
          np.dtype(np.uint16).str: torch.bfloat16, np.dtype(np.int64).str: torch.int64,
          np.dtype(np.int32).str: torch.int32, np.dtype(np.uint8).str: torch.uint8}


def _over_cap(resolved: dict[str, Resolved]) -> bool:
    return any(isinstance(e, LimitExceeded) for r in resolved.values() for e in r.errors.values())
