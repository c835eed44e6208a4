"""Specs in, sealed and leased entries out: one method per RPC.

For each item of a request the engine computes its key (items.py), serves it from shared memory or
promotes it from disk, and otherwise computes it (compute.py: single flight, a bounded decode, the
encoder's batcher). Every request is a `Call`: who sent it (for the source access check and its
leases), whether it still waits (work for a call that went away stops) and until when.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from cached_client.errors import CacheError, CacheMiss, DaemonError, InvalidSpec, UnknownEncoder

from ..encoders import Encoder
from ..images import DEFAULT_MAX_PIXELS
from ..store import Entry, Owner, TensorBytes
from .batcher import Batcher, Job
from .caller import INTERNAL, Call
from .compute import Computer, DecodeBudget, describe, wait_result
from .items import Item, Items
from .limits import Limits
from .prefetch import Prefetcher
from .selection import Selection, check_tier
from .sources import Sources
from .tiers import Held, Tiers

__all__ = ["Engine", "Held", "EncoderOptions", "Item", "tensor_bytes"]

log = logging.getLogger(__name__)

Result = Held | CacheError


@dataclass(frozen=True)
class EncoderOptions:
    max_batch: int = 32
    max_queue_delay_ms: float = 5.0


def tensor_bytes(t: torch.Tensor) -> TensorBytes:
    """A CPU tensor's bytes for the store, without a copy when it is contiguous."""
    t = t.contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return TensorBytes(str(t.dtype).removeprefix("torch."), tuple(t.shape), memoryview(raw.numpy()))  # type: ignore[arg-type]


class Engine:
    def __init__(self, tiers: Tiers, encoders: dict[str, Encoder], sources: Sources,
                 options: dict[str, EncoderOptions] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 decode_workers: int | None = None, limits: Limits | None = None) -> None:
        self.tiers = tiers
        self.store = tiers.shm
        self.encoders = encoders
        self.sources = sources
        self.limits = limits or Limits()
        options = options or {}
        self.batchers = {
            name: Batcher(enc, self._seal, options.get(name, EncoderOptions()).max_batch,
                          options.get(name, EncoderOptions()).max_queue_delay_ms / 1000)
            for name, enc in encoders.items()}
        self.pool = ThreadPoolExecutor(decode_workers or min(8, (os.cpu_count() or 2)),
                                       thread_name_prefix="decode")
        self.items = Items(sources, self.limits)
        self.computer = Computer(self.batchers, sources, self.pool,
                                 DecodeBudget(self.limits.decoded_bytes_in_flight), max_pixels)
        self._mu = threading.Lock()
        # hits: items served from a tier (shm_hits + disk_hits); misses: found in none of them
        # (then computed, or CacheMiss); errors: items that failed; computed: entries encoded
        self.counters = {"hits": 0, "shm_hits": 0, "disk_hits": 0, "misses": 0, "computed": 0, "errors": 0}
        self.prefetcher = Prefetcher(self)

    # requests: one method per RPC

    def get(self, encoder: str, specs: bytes, compute: bool, call: Call,
            release: list[int] | None = None) -> list[Result]:
        """One result per item, in order: (entry, lease) or the item's error. `release` are lease
        ids the caller gives back first."""
        owner = call.caller.session or None
        if release and owner is not None:
            self.store.release(owner, release)
        enc = self.encoder(encoder)
        items = self.items.parse(specs, enc, call.caller, call.alive)
        results: list[Result | Item | None] = list(items)  # errors stay; items are replaced below
        misses: list[tuple[int, Item]] = []
        for i, item in enumerate(items):
            if not isinstance(item, CacheError):
                held = _caught(self.tiers.acquire, item.key, owner)
                if held is None:
                    misses.append((i, item))
                else:
                    results[i] = held
        promoted = self._promote(misses, owner)
        self._count(shm_hits=sum(isinstance(r, tuple) for r in results),
                    disk_hits=sum(isinstance(p, tuple) for p in promoted),
                    misses=sum(p is None for p in promoted))
        left: list[tuple[int, Item]] = []
        for (i, item), held in zip(misses, promoted, strict=True):
            if held is not None:
                results[i] = held
            elif compute:
                left.append((i, item))
            else:
                results[i] = CacheMiss(f"item {i} ({describe(item.spec)}) is not cached")
        futures = self.computer.compute(enc, [item for _, item in left], call.caller, call.alive)
        for (i, item), fut in zip(left, futures, strict=True):
            results[i] = self._finish(enc, item, fut, call, owner)
        self._count(errors=sum(isinstance(r, CacheError) for r in results))
        return results  # type: ignore[return-value]

    def _promote(self, misses: list[tuple[int, Item]], owner: Owner | None) -> list[Result | None]:
        """Shared-memory misses read from disk, in parallel (each read is verified by checksum)."""
        if not misses or self.tiers.disk is None:
            return [None] * len(misses)
        return list(self.pool.map(lambda m: _caught(self.tiers.promote, m[1].key, owner), misses))

    def warm(self, encoder: str, specs: bytes, call: Call, window: int = 256) -> Iterator[dict[str, Any]]:
        """Computes every item without leasing, yielding progress about every 0.25 s."""
        enc = self.encoder(encoder)
        items = self.items.parse(specs, enc, call.caller, call.alive)
        progress: dict[str, Any] = {"done": 0, "total": len(items), "computed": 0, "cached": 0, "errors": []}
        outstanding: deque[tuple[int, Future]] = deque()

        def settle(i: int, result: Any, computed: bool) -> None:
            progress["done"] += 1
            if isinstance(result, CacheError):
                progress["errors"].append((i, result))
                self._count(errors=1)
            else:
                progress["computed" if computed else "cached"] += 1

        last = time.monotonic()
        group: list[tuple[int, Item]] = []
        group_size = self.batchers[enc.name].max_batch
        for i, item in enumerate(items):
            if isinstance(item, CacheError):
                settle(i, item, False)
            elif (held := self.find(item.key, None, count=True)) is not None:
                settle(i, held, False)
            else:
                self._count(misses=1)
                group.append((i, item))
            if len(group) >= group_size or (group and i == len(items) - 1):
                futures = self.computer.compute(enc, [it for _, it in group], call.caller, call.alive)
                outstanding.extend((j, f) for (j, _), f in zip(group, futures, strict=True))
                group = []
            while len(outstanding) >= window or (outstanding and outstanding[0][1].done()):
                j, fut = outstanding.popleft()
                settle(j, _outcome(fut, call), True)
            if time.monotonic() - last > 0.25:
                yield _snapshot(progress)
                last = time.monotonic()
        while outstanding and call.alive():
            wait([f for _, f in outstanding], timeout=0.25, return_when=FIRST_COMPLETED)
            while outstanding and outstanding[0][1].done():
                j, fut = outstanding.popleft()
                settle(j, _outcome(fut, call), True)
            yield _snapshot(progress)
        yield _snapshot(progress)

    def prefetch(self, encoder: str, specs: bytes, call: Call) -> tuple[int, int]:
        """(queued, dropped): a hint computed in the background (prefetch.py)."""
        return self.prefetcher.submit(encoder, specs, call.caller)

    def release(self, owner: Owner, lease_ids: list[int]) -> int:
        return self.store.release(owner, lease_ids)

    def evict(self, selection: Selection, tier: str) -> dict[str, int]:
        if selection.empty:
            raise InvalidSpec("evict needs all, an encoder, a source prefix or keys")
        return self.tiers.evict(selection, check_tier(tier))

    def list_entries(self, selection: Selection, tier: str) -> list[dict[str, Any]]:
        return self.tiers.list_entries(check_tier(tier), selection)

    def stats(self) -> dict[str, Any]:
        """Counters, tiers and encoders, as the Stats RPC reports them."""
        encoders = {name: {**enc.describe(), "items": b.items, "batches": b.batches,
                           "max_batch_seen": b.max_batch_seen, "busy_s": b.busy_s}
                    for name, enc in self.encoders.items() if (b := self.batchers[name])}
        with self._mu:
            counters = dict(self.counters)
        counters.update(self.tiers.counter_values(), prefetch_queued=self.prefetcher.queued,
                        prefetch_dropped=self.prefetcher.dropped, key_memo_bytes=self.items.memo_bytes,
                        decoded_bytes_in_flight=self.computer.budget.used)
        return {"counters": counters, "tiers": self.tiers.stats(), "leases": self.store.stats()["leases"],
                "encoders": encoders}

    # internals

    def encoder(self, name: str) -> Encoder:
        enc = self.encoders.get(name)
        if enc is None:
            raise UnknownEncoder(f"no encoder named {name!r}; configured: {sorted(self.encoders)}")
        return enc

    def compute(self, enc: Encoder, items: list[Item], call: Call = INTERNAL) -> list[Future]:
        return self.computer.compute(enc, items, call.caller, call.alive)

    def find(self, key: bytes, owner: Owner | None, count: bool = False) -> Held | None:
        """From shared memory, else promoted from disk; leased to `owner` when given. `count`: the
        item is being served (counted as a hit of its tier), not looked up for the daemon itself."""
        held = self.tiers.acquire(key, owner)
        if held is not None:
            if count:
                self._count(shm_hits=1)
            return held
        held = self.tiers.promote(key, owner)
        if held is not None and count:
            self._count(disk_hits=1)
        return held

    def _seal(self, job: Job, outputs: dict[str, torch.Tensor]) -> Entry:
        entry = self.tiers.seal(job.key, {k: tensor_bytes(v) for k, v in outputs.items()}, job.meta)
        self._count(computed=1)
        return entry

    def _finish(self, enc: Encoder, item: Item, fut: Future, call: Call, owner: Owner | None) -> Result:
        for _ in range(3):  # an entry can be evicted between its sealing and our lease; compute again
            try:
                wait_result(fut, call.alive, call.deadline)
            except CacheError as exc:
                return exc
            held = _caught(self.tiers.acquire, item.key, owner)
            if held is not None:
                return held
            [fut] = self.computer.compute(enc, [item], call.caller, call.alive)
        return DaemonError(f"{describe(item.spec)} was evicted three times before it could be leased; "
                           f"shm_bytes is too small for the working set")

    def _count(self, **counts: int) -> None:
        with self._mu:
            for name, n in counts.items():
                self.counters[name] += n
            self.counters["hits"] += counts.get("shm_hits", 0) + counts.get("disk_hits", 0)

    def cancel_all(self) -> int:
        """Every computation in progress fails with Cancelled now (its callers are answered)."""
        return self.computer.cancel_all("daemon is shutting down")

    def close(self, timeout: float = 10.0) -> None:
        """Stops within about `timeout` seconds: queued work fails with Cancelled, the batches being
        encoded finish, pending disk writes are finished while time is left."""
        deadline = time.monotonic() + timeout
        self.prefetcher.close()
        self.cancel_all()
        for b in self.batchers.values():
            b.close(max(0.0, deadline - time.monotonic()))
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.tiers.close(max(1.0, deadline - time.monotonic()))


def _caught(fn: Callable[[bytes, Owner | None], Held | None], key: bytes, owner: Owner | None) -> Result | None:
    """`fn(key, owner)`, or the CacheError it raised (a lease over the owner's cap fails one item)."""
    try:
        return fn(key, owner)
    except CacheError as exc:
        return exc


def _outcome(fut: Future, call: Call) -> Any:
    try:
        return wait_result(fut, call.alive, call.deadline)
    except CacheError as exc:
        return exc


def _snapshot(progress: dict[str, Any]) -> dict[str, Any]:
    snap = dict(progress)
    progress["errors"] = []
    return snap
