"""The remote tier's uploads: a queue bounded in bytes, drained by a few threads that retry with backoff.

The caller of submit() is the daemon's sealing path, so submit never waits for the store and never
raises for it: it copies the tensors (the caller's shared-memory slot may be reused long before the
upload ends) and queues them, or, when the queue already holds `max_bytes`, drops the upload and
counts it. A dropped or failed upload costs nothing but a later recompute on another node: the entry
stays in this node's shared memory and disk tier.

Each upload is tried up to `attempts` times; a fault that may pass (RemoteFault.retried: a timeout,
a refused connection, a 5xx) is retried after an exponential backoff with jitter, others (denied,
4xx) fail at once. A key already queued or in flight is not queued twice.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .remoteclient import RemoteFault
from .slot import TensorBytes

__all__ = ["Upload", "UploadQueue"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    """One entry to upload, with its own copy of the tensors."""

    key: bytes
    tensors: dict[str, TensorBytes]
    meta: dict[str, str]
    nbytes: int


def _copy(tensors: dict[str, TensorBytes]) -> dict[str, TensorBytes]:
    return {name: TensorBytes(t.dtype, tuple(t.shape), memoryview(bytes(t.data))) for name, t in tensors.items()}


class UploadQueue:
    """Uploads through `perform`, which raises RemoteFault for a fault of the store (and counts it)."""

    def __init__(self, perform: Callable[[Upload], object], *, workers: int = 4, max_bytes: int = 256 << 20,
                 attempts: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 8.0,
                 name: str = "remote-upload") -> None:
        if workers <= 0 or max_bytes <= 0 or attempts <= 0:
            raise ValueError(f"workers, max_bytes and attempts must be positive, got {workers!r}, {max_bytes!r}, "
                             f"{attempts!r}")
        if backoff_s < 0 or max_backoff_s < 0:
            raise ValueError(f"backoffs must be >= 0, got {backoff_s!r}, {max_backoff_s!r}")
        self.max_bytes = max_bytes
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._perform = perform
        self._cond = threading.Condition()
        self._jobs: deque[Upload] = deque()
        self._keys: set[bytes] = set()  # queued or in flight
        self._bytes = 0
        self._closing = False
        self._stop = threading.Event()
        self.counters = dict.fromkeys(("uploads_dropped", "uploads_failed", "uploads_retried"), 0)
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, key: bytes, tensors: dict[str, TensorBytes], meta: dict[str, str]) -> bool:
        """Queues an upload of a copy of `tensors`; False when it was dropped (queue full, closed)."""
        nbytes = sum(t.nbytes for t in tensors.values())
        with self._cond:
            if key in self._keys:
                return True
            if self._closing or self._bytes + nbytes > self.max_bytes:
                self.counters["uploads_dropped"] += 1
                return False
            self._keys.add(key)
            self._bytes += nbytes  # reserved now, so that concurrent submits can't overfill the queue
        job = Upload(key, _copy(tensors), dict(meta), nbytes)
        with self._cond:
            if self._stop.is_set():  # closed while copying
                self._forget(job)
                self.counters["uploads_dropped"] += 1
                return False
            self._jobs.append(job)
            self._cond.notify()
        return True

    def _forget(self, job: Upload) -> None:
        """Releases what a job reserved (lock held)."""
        self._bytes -= job.nbytes
        self._keys.discard(job.key)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                job = self._jobs.popleft()
            try:
                self._attempt(job)
            finally:
                with self._cond:
                    self._forget(job)
                    self._cond.notify_all()

    def _attempt(self, job: Upload) -> None:
        for attempt in range(self.attempts):
            try:
                self._perform(job)
                return
            except RemoteFault as fault:
                if not fault.retried or attempt == self.attempts - 1:
                    break
            except Exception as exc:  # a bug or a bad entry must not kill the worker
                log.warning("uploading %s failed: %s: %s", job.key.hex()[:16], type(exc).__name__, exc)
                break
            self._count("uploads_retried")
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
            if self._stop.wait(delay):
                break
        self._count("uploads_failed")

    def _count(self, counter: str) -> None:
        with self._cond:
            self.counters[counter] += 1

    def depth(self) -> tuple[int, int]:
        """(uploads queued or in flight, their bytes)."""
        with self._cond:
            return len(self._keys), self._bytes

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {**self.counters, "upload_queue_depth": len(self._keys),
                    "upload_queue_bytes": self._bytes}

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every queued upload has ended (stored, raced or failed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._keys, timeout)

    def close(self, timeout: float = 10.0) -> bool:
        """Takes no more uploads, waits up to `timeout` for the queued ones, then drops the rest
        (counted) and stops the workers; True when everything queued was done. Never waits much
        longer than `timeout`: a worker stuck in a request is left to end by itself."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closing = True
        done = self.flush(timeout)
        self._stop.set()
        with self._cond:
            self.counters["uploads_dropped"] += len(self._jobs)
            for job in self._jobs:
                self._forget(job)
            self._jobs.clear()
            self._cond.notify_all()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()) + 0.1)
        return done
