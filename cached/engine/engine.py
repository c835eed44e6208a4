"""Specs in, sealed and leased entries out: one method per RPC.

For each item of a request the engine computes its key (items.py), serves it from shared memory or
promotes it from disk, and otherwise computes it (compute.py: single flight, a bounded decode, the
encoder's batcher). Every request is a `Call`: who sent it (for the source access check and its
leases), whether it still waits (work for a call that went away stops) and until when.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from cached_client.errors import CacheError, CacheMiss, DaemonError, InvalidSpec
from cached_client.stamp import Stamp

from ..encoders import Encoder
from ..images import DEFAULT_MAX_PIXELS
from ..store import Entry, Owner, TensorBytes
from .batcher import Batcher, Job
from .caller import INTERNAL, Call
from .compute import Computer, DecodeBudget, describe, wait_result
from .items import Item, Items
from .limits import Limits
from .prefetch import Prefetcher
from .selection import Selection, check_tier, resolve, unknown_encoder
from .sources import Sources
from .tiers import Held, Tiers

__all__ = ["Engine", "Held", "EncoderOptions", "Item", "tensor_bytes"]

log = logging.getLogger(__name__)

Result = Held | CacheError
RETIRE_TIMEOUT_S = 600.0  # a removed encoder's requests in flight get this long to finish
RETIRE_POLL_S = 0.05
_T = TypeVar("_T")


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
        self.batchers = {name: self._batcher(enc, options.get(name, EncoderOptions()))
                         for name, enc in encoders.items()}
        self.pool = ThreadPoolExecutor(decode_workers or min(8, (os.cpu_count() or 2)),
                                       thread_name_prefix="decode")
        self.items = Items(sources, self.limits)
        self.computer = Computer(self.batchers, sources, self.pool,
                                 DecodeBudget(self.limits.decoded_bytes_in_flight), max_pixels)
        self._mu = threading.Lock()
        # hits: items served from a tier (shm_hits + disk_hits + remote_hits); misses: found in none
        # of them (then computed, or CacheMiss); errors: items that failed; computed: entries encoded
        self.counters = {"hits": 0, "shm_hits": 0, "disk_hits": 0, "remote_hits": 0, "misses": 0, "computed": 0,
                         "errors": 0}
        # per client session: [items asked for, hits, misses], for operators (top, metrics)
        self.clients: dict[int, list[int]] = {}
        self.prefetcher = Prefetcher(self)
        # encoders added and removed while serving (reload): `encoders` and `batchers` are replaced,
        # never changed in place, so a reader iterating one is never disturbed
        self._enc_mu = threading.Lock()
        self._uses: dict[str, int] = {}                      # requests in flight per encoder name
        self._retiring: dict[str, threading.Event] = {}      # removed, batcher still draining
        self._closed = False

    # requests: one method per RPC

    def get(self, encoder: str, specs: bytes, compute: bool, call: Call,
            release: list[int] | None = None) -> tuple[list[Result], list[Stamp | None]]:
        """One result per item, in order: (entry, lease) or the item's error; and per item the
        stamp of its source when its key was made (what a client compares its own stat with to
        keep the handles: nothing to stat before asking). `release` are lease ids the caller
        gives back first."""
        owner = call.caller.session or None
        if release and owner is not None:
            self.store.release(owner, release)
        with self._using(encoder) as enc:
            items = self.items.parse(specs, enc, call.caller, call.alive)
            return self._get(enc, items, compute, call, owner), [it.stamp if isinstance(it, Item) else None for it in items]

    def _get(self, enc: Encoder, items: list[Item | CacheError], compute: bool, call: Call,
             owner: Owner | None) -> list[Result]:
        results: list[Result | Item | None] = list(items)  # errors stay; items are replaced below
        keyed = [(i, item) for i, item in enumerate(items) if not isinstance(item, CacheError)]
        misses: list[tuple[int, Item]] = []
        for (i, item), held in zip(keyed, self.tiers.acquire_many([it.key for _, it in keyed], owner),
                                   strict=True):
            if held is None:
                misses.append((i, item))
            else:
                results[i] = held
        promoted = self._promote(misses, owner)
        shm_hits = sum(isinstance(r, tuple) for r in results)
        disk_hits, remote_hits = (sum(isinstance(p, tuple) and p[1] == t for p in promoted) for t in ("disk", "remote"))
        missed = sum(p is None for p in promoted)
        self._count(shm_hits=shm_hits, disk_hits=disk_hits, remote_hits=remote_hits, misses=missed)
        self._count_client(call.caller.session, len(items), shm_hits + disk_hits + remote_hits, missed)
        left: list[tuple[int, Item]] = []
        for (i, item), found in zip(misses, promoted, strict=True):
            held = found[0] if isinstance(found, tuple) else found
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

    def _promote(self, misses: list[tuple[int, Item]],
                 owner: Owner | None) -> list[tuple[Held, str] | CacheError | None]:
        """Shared-memory misses read from disk or the remote tier, in parallel (each read is verified
        by checksum), with the tier each came from."""
        if not misses or not self.tiers.lower:
            return [None] * len(misses)
        return list(self.pool.map(lambda m: _caught(self.tiers.promote_from, m[1].key, owner), misses))

    def warm(self, encoder: str, specs: bytes, call: Call, window: int = 256) -> Iterator[dict[str, Any]]:
        """Computes every item without leasing, yielding progress about every 0.25 s."""
        with self._using(encoder) as enc:
            yield from self._warm(enc, specs, call, window)

    def _warm(self, enc: Encoder, specs: bytes, call: Call, window: int) -> Iterator[dict[str, Any]]:
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
        tier = check_tier(tier)
        return self.tiers.evict(resolve(selection, self.tiers, self.encoders, tier), tier)

    def list_entries(self, selection: Selection, tier: str) -> list[dict[str, Any]]:
        tier = check_tier(tier)
        return self.tiers.list_entries(tier, resolve(selection, self.tiers, self.encoders, tier))

    def stats(self) -> dict[str, Any]:
        """Counters, tiers and encoders, as the Stats RPC reports them. `capacity_evictions` are the
        evictions that made room for new entries (the rest were asked for)."""
        from .report import parameter_bytes  # here: this method is the only part of the engine that needs it

        encoders = {name: {**enc.describe(), "input": enc.input, "items": b.items, "batches": b.batches,
                           "max_batch_seen": b.max_batch_seen, "busy_s": b.busy_s, "queued": b.queued(),
                           "max_batch": b.max_batch, "fit_limit": b.fit_limit,
                           "parameter_bytes": parameter_bytes(enc)}
                    for name, enc in self.encoders.items() if (b := self.batchers[name])}
        with self._mu:
            counters = dict(self.counters)
        shm = self.store.stats()
        counters.update(self.tiers.counter_values(), prefetch_queued=self.prefetcher.queued,
                        prefetch_dropped=self.prefetcher.dropped, key_memo_bytes=self.items.memo_bytes,
                        decoded_bytes_in_flight=self.computer.budget.used,
                        evictions_explicit=shm["evictions_explicit"],
                        capacity_evictions=shm["evictions"] - shm["evictions_explicit"])
        return {"counters": counters, "tiers": self.tiers.stats(), "leases": shm["leases"], "encoders": encoders}

    # internals

    def encoder(self, name: str) -> Encoder:
        enc = self.encoders.get(name)
        if enc is None:
            raise unknown_encoder(name, self.encoders)
        return enc

    # encoders added and removed while serving

    def add_encoder(self, name: str, encoder: Encoder, options: EncoderOptions | None = None,
                    timeout: float = RETIRE_TIMEOUT_S) -> Batcher:
        """Serves the loaded `encoder` as `name` from now on. A removed encoder of that name is first
        waited for (up to `timeout` s) until it has drained: its work must never reach the new one's
        batcher, whose entries have other keys."""
        retiring = self._retiring.get(name)
        if retiring is not None and not retiring.wait(timeout):
            raise ValueError(f"encoder {name!r} was removed and is still finishing its work; try again")
        batcher = self._batcher(encoder, options or EncoderOptions())
        batcher.starved = self.computer.budget.starved
        with self._enc_mu:
            if self._closed or name in self.encoders or name in self._retiring:
                batcher.close(0)
                raise ValueError(f"encoder {name!r} is configured already" if not self._closed
                                 else "the engine is closed")
            self._set_batchers({**self.batchers, name: batcher})
            self.encoders = {**self.encoders, name: encoder}
        return batcher

    def remove_encoder(self, name: str, timeout: float = RETIRE_TIMEOUT_S) -> threading.Event:
        """New requests for `name` fail with UnknownEncoder from now on; requests in flight finish,
        then (in the background, at most `timeout` s later) its batcher stops and the model is let
        go. Its entries stay in the tiers. The event is set once it is gone."""
        with self._enc_mu:
            self.encoder(name)
            self.encoders = {k: v for k, v in self.encoders.items() if k != name}
            done = self._retiring[name] = threading.Event()
        self.prefetcher.forget(name)  # its queued hints would look up the batcher by name
        threading.Thread(target=self._retire, args=(name, done, time.monotonic() + timeout),
                         name=f"retire-{name}", daemon=True).start()
        return done

    def _retire(self, name: str, done: threading.Event, deadline: float) -> None:
        batcher = self.batchers[name]
        while (self._uses.get(name) or batcher.queued()) and time.monotonic() < deadline:
            time.sleep(RETIRE_POLL_S)
        if self._uses.get(name) or batcher.queued():
            log.warning("encoder %s: still busy after removal; its queued work is cancelled", name)
        with self._enc_mu:
            self._set_batchers({k: v for k, v in self.batchers.items() if k != name})
        batcher.close(max(1.0, deadline - time.monotonic()))
        with self._enc_mu:
            del self._retiring[name]
        done.set()
        log.info("encoder %s: removed", name)

    @contextlib.contextmanager
    def _using(self, name: str) -> Iterator[Encoder]:
        """The encoder `name` (UnknownEncoder when there is none), kept from retiring meanwhile."""
        with self._enc_mu:
            enc = self.encoder(name)
            self._uses[name] = self._uses.get(name, 0) + 1
        try:
            yield enc
        finally:
            with self._enc_mu:
                self._uses[name] -= 1
                if not self._uses[name]:
                    del self._uses[name]

    def _batcher(self, enc: Encoder, options: EncoderOptions) -> Batcher:
        return Batcher(enc, self._seal, options.max_batch, options.max_queue_delay_ms / 1000)

    def _set_batchers(self, batchers: dict[str, Batcher]) -> None:
        self.batchers = self.computer.batchers = batchers

    def compute(self, enc: Encoder, items: list[Item], call: Call = INTERNAL) -> list[Future]:
        return self.computer.compute(enc, items, call.caller, call.alive)

    def find(self, key: bytes, owner: Owner | None, count: bool = False) -> Held | None:
        """From shared memory, else promoted from disk or the remote tier; leased to `owner` when given. `count`: the
        item is being served (counted as a hit of its tier), not looked up for the daemon itself."""
        held = self.tiers.acquire(key, owner)
        if held is not None:
            if count:
                self._count(shm_hits=1)
            return held
        found = self.tiers.promote_from(key, owner)
        if found is not None and count:
            self._count(**{f"{found[1]}_hits": 1})
        return None if found is None else found[0]

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

    def _count_client(self, session: int, items: int, hits: int, misses: int) -> None:
        if session:
            with self._mu:
                c = self.clients.setdefault(session, [0, 0, 0])
                c[0] += items
                c[1] += hits
                c[2] += misses

    def forget_client(self, session: int) -> None:
        """A client process is gone: its counters go with it."""
        with self._mu:
            self.clients.pop(session, None)

    def client_counters(self) -> dict[int, tuple[int, int, int]]:
        """{session: (items asked for, hits, misses)}."""
        with self._mu:
            return {s: (c[0], c[1], c[2]) for s, c in self.clients.items()}

    def _count(self, **counts: int) -> None:
        with self._mu:
            for name, n in counts.items():
                self.counters[name] += n
            self.counters["hits"] += sum(counts.get(f"{tier}_hits", 0) for tier in ("shm", "disk", "remote"))

    def cancel_all(self) -> int:
        """Every computation in progress fails with Cancelled now (its callers are answered)."""
        return self.computer.cancel_all("daemon is shutting down")

    def close(self, timeout: float = 10.0) -> None:
        """Stops within about `timeout` seconds: queued work fails with Cancelled, the batches being
        encoded finish, pending disk writes are finished while time is left."""
        deadline = time.monotonic() + timeout
        with self._enc_mu:
            self._closed = True
        self.prefetcher.close()
        self.cancel_all()
        for b in self.batchers.values():
            b.close(max(0.0, deadline - time.monotonic()))
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.tiers.close(max(1.0, deadline - time.monotonic()))


def _caught(fn: Callable[[bytes, Owner | None], _T | None], key: bytes, owner: Owner | None) -> _T | CacheError | None:
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
