"""Specs in, sealed and leased entries out.

For each item of a request the engine computes its key (source digest + transform + encoder
fingerprint), serves it from the store if it is there, and otherwise decodes the source in a thread
pool and hands it to the encoder's batcher. Identical concurrent misses share one computation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from cached_client.errors import CacheError, CacheMiss, DaemonError, InvalidSpec, SourceError, UnknownEncoder
from cached_client.specs import ImageSpec, Spec, TextSpec, decode_spec
from cached_client.stamp import Stamp, source_stamp

from ..encoders import Encoder
from ..images import DEFAULT_MAX_PIXELS, prepare_image
from ..store import Entry, Owner, TensorBytes
from .batcher import Batcher, Job
from .keys import entry_key
from .prefetch import Prefetcher
from .selection import Selection, check_tier
from .sources import Sources
from .tiers import Held, Tiers

__all__ = ["Engine", "Held", "EncoderOptions", "Item", "tensor_bytes"]

KEY_MEMO_ITEMS = 1_000_000

log = logging.getLogger(__name__)

Result = Held | CacheError


@dataclass(frozen=True)
class EncoderOptions:
    max_batch: int = 32
    max_queue_delay_ms: float = 5.0


@dataclass(frozen=True)
class Item:
    """One parsed request item and its key."""

    spec: Spec
    key: bytes
    real: str
    data: bytes | None  # the source bytes when they were read to digest them


def tensor_bytes(t: torch.Tensor) -> TensorBytes:
    """A CPU tensor's bytes for the store, without a copy when it is contiguous."""
    t = t.contiguous()
    raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
    return TensorBytes(str(t.dtype).removeprefix("torch."), tuple(t.shape), memoryview(raw.numpy()))  # type: ignore[arg-type]


class Engine:
    def __init__(self, tiers: Tiers, encoders: dict[str, Encoder], sources: Sources,
                 options: dict[str, EncoderOptions] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 decode_workers: int | None = None) -> None:
        self.tiers = tiers
        self.store = tiers.shm
        self.encoders = encoders
        self.sources = sources
        self.max_pixels = max_pixels
        options = options or {}
        self.batchers = {
            name: Batcher(enc, self._seal, options.get(name, EncoderOptions()).max_batch,
                          options.get(name, EncoderOptions()).max_queue_delay_ms / 1000)
            for name, enc in encoders.items()}
        self.pool = ThreadPoolExecutor(decode_workers or min(8, (os.cpu_count() or 2)),
                                       thread_name_prefix="decode")
        self._inflight: dict[bytes, Future] = {}
        # packed spec line -> its item and the source's stamp: a repeated spec costs one stat
        # instead of a realpath, a JSON parse and a key digest
        self._keys: dict[tuple[str, bytes], tuple[Item, Stamp | None]] = {}
        self._mu = threading.Lock()
        # hits: items served from a tier (shm_hits + disk_hits); misses: found in none of them
        # (then computed, or CacheMiss); errors: items that failed; computed: entries encoded
        self.counters = {"hits": 0, "shm_hits": 0, "disk_hits": 0, "misses": 0, "computed": 0, "errors": 0}
        self.prefetcher = Prefetcher(self)

    # requests: one method per RPC

    def get(self, encoder: str, specs: bytes, compute: bool, owner: Owner | None,
            release: list[int] | None = None) -> list[Result]:
        """One result per item, in order: (entry, lease) or the item's error. `release` are lease
        ids the owner gives back first."""
        if release and owner is not None:
            self.store.release(owner, release)
        enc = self.encoder(encoder)
        items = self.parse(specs, enc)
        results: list[Result | Item | None] = list(items)  # errors stay; items are replaced below
        misses: list[tuple[int, Item]] = []
        for i, item in enumerate(items):
            if isinstance(item, CacheError):
                continue
            held = self.tiers.acquire(item.key, owner)
            if held is not None:
                results[i] = held
            else:
                misses.append((i, item))
        promoted = self._promote(misses, owner)
        found = sum(p is not None for p in promoted)
        self._count(shm_hits=sum(isinstance(r, tuple) for r in results), disk_hits=found,
                    misses=len(misses) - found)
        left: list[tuple[int, Item]] = []
        for (i, item), held in zip(misses, promoted, strict=True):
            if held is not None:
                results[i] = held
            elif compute:
                left.append((i, item))
            else:
                results[i] = CacheMiss(f"item {i} ({_describe(item.spec)}) is not cached")
        futures = self.compute(enc, [item for _, item in left])
        for (i, item), fut in zip(left, futures, strict=True):
            results[i] = self._finish(enc, item, fut, owner)
        self._count(errors=sum(isinstance(r, CacheError) for r in results))
        return results  # type: ignore[return-value]

    def _promote(self, misses: list[tuple[int, Item]], owner: Owner | None) -> list[Held | None]:
        """Shared-memory misses read from disk, in parallel (each read is verified by checksum)."""
        if not misses or self.tiers.disk is None:
            return [None] * len(misses)
        return list(self.pool.map(lambda m: self.tiers.promote(m[1].key, owner), misses))

    def prefetch(self, encoder: str, specs: bytes) -> tuple[int, int]:
        """(queued, dropped): a hint computed in the background (prefetch.py)."""
        return self.prefetcher.submit(encoder, specs)

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
                        prefetch_dropped=self.prefetcher.dropped)
        return {"counters": counters, "tiers": self.tiers.stats(), "leases": self.store.stats()["leases"],
                "encoders": encoders}

    def warm(self, encoder: str, specs: bytes, window: int = 256) -> Iterator[dict[str, Any]]:
        """Computes every item without leasing, yielding progress about every 0.25 s."""
        enc = self.encoder(encoder)
        items = self.parse(specs, enc)
        progress: dict[str, Any] = {"done": 0, "total": len(items), "computed": 0, "cached": 0, "errors": []}
        outstanding: deque[tuple[int, Future]] = deque()
        last = time.monotonic()

        def settle(i: int, result: Result | CacheError, computed: bool) -> None:
            progress["done"] += 1
            if isinstance(result, CacheError):
                progress["errors"].append((i, result))
                self._count(errors=1)
            else:
                progress["computed" if computed else "cached"] += 1

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
                futures = self.compute(enc, [it for _, it in group])
                outstanding.extend((j, f) for (j, _), f in zip(group, futures, strict=True))
                group = []
            while len(outstanding) >= window or (outstanding and outstanding[0][1].done()):
                j, fut = outstanding.popleft()
                settle(j, _outcome(fut), True)
            if time.monotonic() - last > 0.25:
                yield _snapshot(progress)
                last = time.monotonic()
        while outstanding:
            wait([f for _, f in outstanding], timeout=0.25, return_when=FIRST_COMPLETED)
            while outstanding and outstanding[0][1].done():
                j, fut = outstanding.popleft()
                settle(j, _outcome(fut), True)
            yield _snapshot(progress)
        yield _snapshot(progress)

    # internals

    def encoder(self, name: str) -> Encoder:
        enc = self.encoders.get(name)
        if enc is None:
            raise UnknownEncoder(f"no encoder named {name!r}; configured: {sorted(self.encoders)}")
        return enc

    def parse(self, specs: bytes, enc: Encoder) -> list[Item | CacheError]:
        """One Item (or the item's error) per line of a packed batch."""
        if not specs:
            return []
        return [self._item(i, line, enc) for i, line in enumerate(specs.split(b"\n"))]

    def _item(self, i: int, line: bytes, enc: Encoder) -> Item | CacheError:
        remembered = self._keys.get((enc.name, line))
        if remembered is not None:
            item, stamp = remembered
            if not isinstance(item.spec, ImageSpec) or source_stamp(item.spec.path) == stamp:
                return item  # a text, or the same file unchanged: the same key
        try:
            spec = decode_spec(line)
        except (ValueError, TypeError) as exc:
            return InvalidSpec(f"item {i}: {exc}")
        try:
            if isinstance(spec, TextSpec):
                if enc.input != "text":
                    raise InvalidSpec(f"item {i}: encoder {enc.name!r} takes images, not text")
                digest = hashlib.blake2b(spec.text.encode(), digest_size=32).digest()
                item = Item(spec, entry_key(digest, spec, enc.fingerprint), "", None)
                self._remember(enc, line, item, None)
                return item
            if enc.input != "image":
                raise InvalidSpec(f"item {i}: encoder {enc.name!r} takes text, not images")
            real, digest, data, stamp = self.sources.digest(spec.path)
            item = Item(spec, entry_key(digest, spec, enc.fingerprint), real, data)
            if stamp is not None:
                self._remember(enc, line, Item(spec, item.key, real, None), stamp)
            return item
        except CacheError as exc:
            return exc

    def _remember(self, enc: Encoder, line: bytes, item: Item, stamp: Stamp | None) -> None:
        if len(self._keys) >= KEY_MEMO_ITEMS:
            self._keys.clear()  # crude but bounded; refilling costs one realpath + hash lookup per spec
        self._keys[(enc.name, line)] = (item, stamp)

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

    def compute(self, enc: Encoder, items: list[Item]) -> list[Future]:
        """Futures of the items' entries, shared with every concurrent request for the same key.

        The items new to the engine are decoded in parallel and reach the batcher together, so the
        misses of one request are encoded as one batch (or as few as max_batch allows).
        """
        futures: list[Future] = []
        fresh: list[tuple[Item, Future]] = []
        with self._mu:
            for item in items:
                fut = self._inflight.get(item.key)
                if fut is None:
                    fut = self._inflight[item.key] = Future()
                    fresh.append((item, fut))
                futures.append(fut)
        for item, fut in fresh:
            fut.add_done_callback(partial(self._forget, item.key))
        if fresh:
            jobs: list[Job | None] = [None] * len(fresh)
            remaining = [len(fresh)]
            lock = threading.Lock()

            def prepared(k: int, job: Job | None) -> None:
                jobs[k] = job
                with lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    ready = [j for j in jobs if j is not None]
                    if ready:
                        self.batchers[enc.name].submit_many(ready)

            for k, (item, fut) in enumerate(fresh):
                self.pool.submit(self._prepare, enc, item, fut, k, prepared)
        return futures

    def _forget(self, key: bytes, _: Future | None = None) -> None:
        with self._mu:
            self._inflight.pop(key, None)

    def _prepare(self, enc: Encoder, item: Item, fut: Future, k: int,
                 done: Callable[[int, Job | None], None]) -> None:
        job = None
        try:
            meta = {"encoder": enc.name, "source": item.real, "spec": item.spec.wire_json()}
            seed = int.from_bytes(item.key[:8], "little")
            if isinstance(item.spec, ImageSpec):
                data = item.data
                if data is None:
                    data = self.sources.read(item.real, item.spec.path)
                    if self.sources.digest(item.spec.path)[1] != hashlib.blake2b(data, digest_size=32).digest():
                        raise SourceError(f"{item.spec.path}: changed while being read; retry")
                value: Any = prepare_image(data, item.spec, seed, self.max_pixels)
            else:
                value = item.spec.text
            job = Job(item.key, value, seed, meta, fut)
        except CacheError as exc:
            fut.set_exception(exc)
        except Exception as exc:  # noqa: BLE001 - a bug here must fail the item, not hang its request
            log.exception("preparing %s failed", _describe(item.spec))
            fut.set_exception(DaemonError(f"preparing {_describe(item.spec)}: {exc}"))
        finally:
            done(k, job)

    def _seal(self, job: Job, outputs: dict[str, torch.Tensor]) -> Entry:
        entry = self.tiers.seal(job.key, {k: tensor_bytes(v) for k, v in outputs.items()}, job.meta)
        self._count(computed=1)
        return entry

    def _finish(self, enc: Encoder, item: Item, fut: Future, owner: Owner | None) -> Result:
        for _ in range(3):  # an entry can be evicted between its sealing and our lease; compute again
            try:
                fut.result()
            except CacheError as exc:
                return exc
            held = self.tiers.acquire(item.key, owner)
            if held is not None:
                return held
            [fut] = self.compute(enc, [item])
        return DaemonError(f"{_describe(item.spec)} was evicted three times before it could be leased; "
                           f"shm_bytes is too small for the working set")

    def _count(self, **counts: int) -> None:
        with self._mu:
            for name, n in counts.items():
                self.counters[name] += n
            self.counters["hits"] += counts.get("shm_hits", 0) + counts.get("disk_hits", 0)

    def close(self) -> None:
        self.prefetcher.close()
        for b in self.batchers.values():
            b.close()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.tiers.close()


def _outcome(fut: Future) -> Held | CacheError:
    try:
        return fut.result(), 0
    except CacheError as exc:
        return exc


def _snapshot(progress: dict[str, Any]) -> dict[str, Any]:
    snap = dict(progress)
    progress["errors"] = []
    return snap


def _describe(spec: Spec) -> str:
    if isinstance(spec, ImageSpec):
        return f"{spec.path} {spec.size[0]}x{spec.size[1]}"
    return f"text {spec.text[:40]!r}"
