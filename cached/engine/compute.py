"""Misses into entries: single flight, decoding within a memory budget, hand-off to the batcher.

Identical concurrent misses share one computation (a `Flight`), which goes on while any request
waiting for it is alive and is dropped (Cancelled) once none is. Each new miss is decoded in the
thread pool and handed to its encoder's batcher as soon as it is ready; the batcher was told how
many are coming (`expect`), so the misses of one request still make one batch.

Memory is bounded by `DecodeBudget`: decoding an image reserves its decoded bytes (the source's
pixels, RGB with room for the library's copies) plus the float input it becomes; the first part is
given back when decoding ends, the second when the item is encoded. A request of 1,536 misses thus
streams through the encoder instead of holding every decoded image at once, and a decoder waiting
for budget makes the batcher stop waiting for more of a partial batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from cached_client.errors import CacheError, Cancelled, DaemonError, SourceError
from cached_client.specs import ImageSpec, Spec

from ..encoders import Encoder
from ..images import open_image, prepare_image
from .batcher import Batcher, Job, fail, group_of
from .caller import Caller
from .items import Item
from .sources import Sources

__all__ = ["Computer", "DecodeBudget", "Flight", "SOURCE_BYTES_PER_PIXEL", "INPUT_BYTES_PER_PIXEL"]

log = logging.getLogger(__name__)

SOURCE_BYTES_PER_PIXEL = 8  # RGB(A) as decoded, plus the EXIF-transposed and converted copies
INPUT_BYTES_PER_PIXEL = 12  # the float32 (3, H, W) input the encoder takes
POLL_S = 0.1                # how often a wait checks that its caller is still there

Alive = Callable[[], bool]


class DecodeBudget:
    """Bytes of decoded images in flight, all requests together; one item larger than the whole
    budget may go alone."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.waiting = 0
        self._cv = threading.Condition()
        self.on_starved: Callable[[], None] = lambda: None

    def acquire(self, n: int, alive: Alive) -> bool:
        """Reserves min(n, total) bytes; False when `alive()` turned false while waiting."""
        n = min(n, self.total)
        with self._cv:
            if self.used + n > self.total:
                self.waiting += 1
                self.on_starved()
                try:
                    while self.used + n > self.total:
                        if not alive():
                            return False
                        self._cv.wait(POLL_S)
                finally:
                    self.waiting -= 1
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= min(n, self.total)
            self._cv.notify_all()

    def starved(self) -> bool:
        return self.waiting > 0


@dataclass(eq=False)
class Flight:
    """One computation in progress and the requests waiting for it."""

    future: Future = field(default_factory=Future)
    waiters: list[Alive] = field(default_factory=list)

    def wanted(self) -> bool:
        return any(alive() for alive in list(self.waiters))


class Computer:
    def __init__(self, batchers: dict[str, Batcher], sources: Sources, pool: ThreadPoolExecutor,
                 budget: DecodeBudget, max_pixels: int) -> None:
        self.batchers = batchers
        self.sources = sources
        self.pool = pool
        self.budget = budget
        self.max_pixels = max_pixels
        self._flights: dict[bytes, Flight] = {}
        self._mu = threading.Lock()
        for b in batchers.values():
            b.starved = budget.starved
        budget.on_starved = self._poke

    def _poke(self) -> None:
        for b in self.batchers.values():
            b.poke()

    def compute(self, enc: Encoder, items: list[Item], caller: Caller, alive: Alive) -> list[Future]:
        """Futures of the items' entries, shared with every concurrent request for the same key."""
        futures: list[Future] = []
        fresh: list[tuple[Item, Flight]] = []
        with self._mu:
            for item in items:
                flight = self._flights.get(item.key)
                if flight is None:
                    flight = self._flights[item.key] = Flight()
                    fresh.append((item, flight))
                flight.waiters.append(alive)
                futures.append(flight.future)
        batcher = self.batchers[enc.name]
        for item, flight in fresh:
            flight.future.add_done_callback(partial(self._land, item.key))
            batcher.expect(group_of(item.spec), 1)
            self.pool.submit(self._prepare, enc, item, flight, caller)
        return futures

    def cancel_all(self, why: str) -> int:
        """Fails every computation in progress with Cancelled (a shutdown's grace ran out): whoever
        waits gets a precise error at once; work already running finishes into nothing."""
        with self._mu:
            flights = list(self._flights.values())
        for flight in flights:
            fail(flight.future, Cancelled(why))
        return len(flights)

    def _land(self, key: bytes, _: Future) -> None:
        with self._mu:
            self._flights.pop(key, None)

    def _prepare(self, enc: Encoder, item: Item, flight: Flight, caller: Caller) -> None:
        batcher = self.batchers[enc.name]
        try:
            job = self._job(enc, item, flight, caller)
        except CacheError as exc:
            job, error = None, exc
        except Exception as exc:  # noqa: BLE001 - a bug here must fail the item, not hang its request
            log.exception("preparing %s failed", describe(item.spec))
            job, error = None, DaemonError(f"preparing {describe(item.spec)}: {exc}")
        if job is None:
            batcher.expect(group_of(item.spec), -1)
            fail(flight.future, error)
        else:
            batcher.submit_many([job], expected=True)

    def _job(self, enc: Encoder, item: Item, flight: Flight, caller: Caller) -> Job:
        if not flight.wanted():
            raise Cancelled("every request waiting for this item has gone")
        meta = {"encoder": enc.name, "source": item.real, "spec": item.spec.wire_json()}
        seed = int.from_bytes(item.key[:8], "little")
        if not isinstance(item.spec, ImageSpec):
            return Job(item.key, item.spec.text, seed, meta, flight.future, flight.wanted)
        data = item.data if item.data is not None else self._reload(item, caller)
        image = open_image(data, item.spec.path, self.max_pixels)  # reads the header only
        w, h = item.spec.size
        decode, keep = image.width * image.height * SOURCE_BYTES_PER_PIXEL, w * h * INPUT_BYTES_PER_PIXEL
        if not self.budget.acquire(decode + keep, flight.wanted):
            raise Cancelled("every request waiting for this item has gone")
        try:
            value: Any = prepare_image(image, item.spec, seed)
        except BaseException:
            self.budget.release(decode + keep)
            raise
        finally:
            del image
        self.budget.release(decode)
        flight.future.add_done_callback(lambda _: self.budget.release(keep))
        return Job(item.key, value, seed, meta, flight.future, flight.wanted)

    def _reload(self, item: Item, caller: Caller) -> bytes:
        source = self.sources.load(item.spec.path, caller)  # type: ignore[union-attr]
        if source.digest != item.digest:
            raise SourceError(f"{item.spec.path}: changed while being read; retry")  # type: ignore[union-attr]
        assert source.data is not None
        return source.data


def wait_result(fut: Future, alive: Alive, deadline: float | None) -> Any:
    """The future's result; Cancelled when the caller went away, DeadlineExceeded-like Cancelled
    when its deadline passed: a handler never waits for work nobody will receive."""
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise Cancelled("the call's deadline passed")
        try:
            return fut.result(timeout=POLL_S if remaining is None else min(POLL_S, remaining))
        except TimeoutError:
            if not alive():
                raise Cancelled("the call ended") from None


def describe(spec: Spec) -> str:
    if isinstance(spec, ImageSpec):
        return f"{spec.path} {spec.size[0]}x{spec.size[1]}"
    return f"text {spec.text[:40]!r}"
