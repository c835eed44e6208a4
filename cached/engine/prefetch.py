"""Prefetch: non-blocking hints that compute (or promote) what the next batches will need.

A hint is parsed and queued at once; a background thread feeds the queue to the engine in groups of
the encoder's batch size, with at most `window` items in flight, so a hint for a whole epoch can't
fill memory with decoded images. A full queue drops new items (counted), never blocks the caller.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING

from cached_client.errors import CacheError

if TYPE_CHECKING:
    from .engine import Engine, Item

__all__ = ["Prefetcher"]

log = logging.getLogger(__name__)


class Prefetcher:
    def __init__(self, engine: Engine, window: int = 256, max_queued: int = 1_000_000) -> None:
        self.engine = engine
        self.max_queued = max_queued
        self._queue: deque[tuple[str, Item]] = deque()
        self._cv = threading.Condition()
        self._slots = threading.Semaphore(window)
        self._closed = False
        self.queued = self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def submit(self, encoder: str, specs: bytes) -> tuple[int, int]:
        """(queued, dropped). Bad items are skipped: a hint never fails for one bad spec."""
        enc = self.engine.encoder(encoder)
        items = [it for it in self.engine.parse(specs, enc) if not isinstance(it, CacheError)]
        with self._cv:
            room = max(0, self.max_queued - len(self._queue))
            accepted = items[:room]
            self._queue.extend((encoder, it) for it in accepted)
            self.queued += len(accepted)
            self.dropped += len(items) - len(accepted)
            self._cv.notify()
        return len(accepted), len(items) - len(accepted)

    def _next_group(self) -> tuple[str, list[Item]] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            name = self._queue[0][0]
            limit = self.engine.batchers[name].max_batch
            group: list[Item] = []
            while self._queue and self._queue[0][0] == name and len(group) < limit:
                group.append(self._queue.popleft()[1])
            return name, group

    def _run(self) -> None:
        while (next_group := self._next_group()) is not None:
            name, group = next_group
            missing = [it for it in group if self.engine.find(it.key, None) is None]
            if not missing:
                continue
            for _ in missing:
                self._slots.acquire()
            try:
                futures = self.engine.compute(self.engine.encoder(name), missing)
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
