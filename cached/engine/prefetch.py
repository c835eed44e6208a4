"""Prefetch: non-blocking hints that compute (or promote) what the next batches will need.

A hint is parsed and queued at once; a background thread feeds the queue to the engine in groups of
the encoder's batch size, with at most `window` items in flight, so a hint for a whole epoch can't
fill memory with decoded images. A full queue drops new items (counted), never blocks the caller.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING

from cached_client.errors import CacheError

from .caller import Caller
from .items import Item

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Prefetcher"]

log = logging.getLogger(__name__)


class Prefetcher:
    def __init__(self, engine: Engine, window: int = 256, max_queued: int = 100_000) -> None:
        self.engine = engine
        self.max_queued = max_queued
        self._queue: deque[tuple[str, Item, Caller]] = deque()
        self._cv = threading.Condition()
        self._slots = threading.Semaphore(window)
        self._closed = False
        self.queued = self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def submit(self, encoder: str, specs: bytes, caller: Caller) -> tuple[int, int]:
        """(queued, dropped). Bad items are skipped: a hint never fails for one bad spec. Items are
        checked against the caller's rights now, and queued without their source bytes."""
        enc = self.engine.encoder(encoder)
        items = [replace(it, data=None) for it in self.engine.items.parse(specs, enc, caller)
                 if not isinstance(it, CacheError)]
        with self._cv:
            room = max(0, self.max_queued - len(self._queue))
            accepted = items[:room]
            self._queue.extend((encoder, it, caller) for it in accepted)
            self.queued += len(accepted)
            self.dropped += len(items) - len(accepted)
            self._cv.notify()
        return len(accepted), len(items) - len(accepted)

    def forget(self, encoder: str) -> None:
        """Drops the queued hints for `encoder` (being removed), counted as dropped."""
        with self._cv:
            kept = [q for q in self._queue if q[0] != encoder]
            self.dropped += len(self._queue) - len(kept)
            self._queue = deque(kept)

    def _next_group(self) -> tuple[str, Caller, list[Item]] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            name, _, caller = self._queue[0]
            limit = self.engine.batchers[name].max_batch
            group: list[Item] = []
            while self._queue and self._queue[0][0] == name and self._queue[0][2] == caller and len(group) < limit:
                group.append(self._queue.popleft()[1])
            return name, caller, group

    def _wanted(self) -> bool:
        return not self._closed

    def _run(self) -> None:
        while (next_group := self._next_group()) is not None:
            name, caller, group = next_group
            missing = [it for it in group if self.engine.find(it.key, None) is None]
            if not missing:
                continue
            for _ in missing:
                while not self._slots.acquire(timeout=0.5):
                    if self._closed:
                        return
            try:
                futures = self.engine.computer.compute(self.engine.encoder(name), missing, caller, self._wanted)
            except Exception:  # noqa: BLE001 - a hint must never take the thread down
                log.exception("prefetch of %d items failed", len(missing))
                for _ in missing:
                    self._slots.release()
                continue
            for fut in futures:
                fut.add_done_callback(lambda _: self._slots.release())

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._queue.clear()
            self._cv.notify()
        self._thread.join()
