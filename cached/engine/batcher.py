"""Dynamic batching for one encoder: misses from every client queue by input shape and are encoded
together, up to `max_batch` items, waiting at most `max_delay_s` for a batch to fill. Each replica
of the encoder (one per configured device) has a worker that takes the next batch when it is free.

A batch that runs out of device memory is split in halves and retried, and the largest size that
fit is remembered; a batch that fails otherwise is retried item by item, so only the items that fail
alone get an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cached_client.errors import Cancelled, EncoderError

from ..encoders import Encoder

__all__ = ["Batcher", "Job"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    key: bytes
    input: Any          # (3, H, W) float32 array for image encoders, str for text encoders
    seed: int
    meta: dict[str, str]
    future: Future = field(default_factory=Future)

    @property
    def group(self) -> Hashable:
        return self.input.shape if isinstance(self.input, np.ndarray) else "text"


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Batcher:
    """One thread per encoder replica set; `submit` is thread-safe and never blocks on encoding."""

    def __init__(self, encoder: Encoder, seal: Callable[[Job, dict[str, torch.Tensor]], Any],
                 max_batch: int = 32, max_delay_s: float = 0.005) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch!r}")
        if max_delay_s < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {max_delay_s * 1000!r}")
        self.encoder = encoder
        self.seal = seal
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.fit_limit = max_batch  # lowered after an out-of-memory split
        self._queues: dict[Hashable, deque[tuple[float, Job]]] = {}
        self._cv = threading.Condition()
        self._closed = False
        self.items = self.batches = self.max_batch_seen = 0
        self.busy_s = 0.0
        self._stats = threading.Lock()
        # One worker per replica, each taking the next batch when it is free: an idle replica is by
        # definition the least loaded one.
        self._threads = [
            threading.Thread(target=self._loop, args=(r,), name=f"batcher-{encoder.name}-{r}", daemon=True)
            for r in range(getattr(encoder, "replicas", 1))]
        for t in self._threads:
            t.start()

    def submit_many(self, jobs: list[Job]) -> None:
        with self._cv:
            if self._closed:
                for job in jobs:
                    job.future.set_exception(Cancelled("daemon is shutting down"))
                return
            now = time.monotonic()
            for job in jobs:
                self._queues.setdefault(job.group, deque()).append((now, job))
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()

    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while True:
                queues = {g: q for g, q in self._queues.items() if q}
                if not queues:
                    if self._closed:
                        return None
                    self._cv.wait()
                    continue
                group = min(queues, key=lambda g: queues[g][0][0])  # the oldest waiting item first
                queue = queues[group]
                limit = self.fit_limit
                wait = queue[0][0] + self.max_delay_s - time.monotonic()
                if len(queue) < limit and wait > 0 and not self._closed:
                    self._cv.wait(wait)
                    continue
                return [queue.popleft()[1] for _ in range(min(limit, len(queue)))]

    def _loop(self, replica: int) -> None:
        while (jobs := self._next_batch()) is not None:
            t0 = time.perf_counter()
            self._run(jobs, replica)
            with self._stats:
                self.busy_s += time.perf_counter() - t0

    def _run(self, jobs: list[Job], replica: int) -> None:
        try:
            outputs = self._encode(jobs, replica)
        except Exception as exc:  # noqa: BLE001 - every failure becomes per-item errors below
            if len(jobs) > 1 and _is_oom(exc):
                self.fit_limit = max(1, min(self.fit_limit, len(jobs) // 2))
                log.warning("encoder %s: out of memory at batch %d; splitting, batches now <= %d",
                            self.encoder.name, len(jobs), self.fit_limit)
                half = len(jobs) // 2
                self._run(jobs[:half], replica)
                self._run(jobs[half:], replica)
            elif len(jobs) > 1:
                log.warning("encoder %s: batch of %d failed (%s); retrying item by item",
                            self.encoder.name, len(jobs), exc)
                for job in jobs:
                    self._run([job], replica)
            else:
                log.warning("encoder %s failed on %s: %s", self.encoder.name,
                            jobs[0].meta.get("source", "?"), exc)
                jobs[0].future.set_exception(EncoderError(f"encoder {self.encoder.name}: {exc}"))
            return
        with self._stats:
            self.items += len(jobs)
            self.batches += 1
            self.max_batch_seen = max(self.max_batch_seen, len(jobs))
        for i, job in enumerate(jobs):
            try:
                job.future.set_result(self.seal(job, {k: v[i] for k, v in outputs.items()}))
            except Exception as exc:  # noqa: BLE001 - e.g. CapacityError: this item fails, not the batch
                job.future.set_exception(exc)

    def _encode(self, jobs: list[Job], replica: int) -> dict[str, torch.Tensor]:
        if self.encoder.input == "image":
            batch: Any = torch.from_numpy(np.stack([j.input for j in jobs]))
        else:
            batch = [j.input for j in jobs]
        out = self.encoder.encode(batch, [j.seed for j in jobs], replica=replica)
        return {k: v.detach().to("cpu") for k, v in out.items()}
