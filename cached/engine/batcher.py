"""Dynamic batching for one encoder: misses from every client queue by input shape and are encoded
together, up to `max_batch` items, waiting at most `max_delay_s` for a batch to fill. Each replica
of the encoder (one per configured device) has a worker that takes the next batch when it is free.

A batch that runs out of device memory is split into batches of at most half its size, retried only
once the failed attempt is let go: retried inside the `except` block, its traceback would keep the
failed forward pass's frames and activations alive, so the halves would run out of memory too (the
PyTorch FAQ, "my out of memory exception handler can't allocate memory"). The largest batch that fits
is remembered per replica and input shape, and probed upwards again after a run of successes
(`FitLimits`). A batch that fails otherwise is retried item by item, so only the items that fail alone
get an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cached_client.errors import Cancelled, EncoderError

from ..encoders import Encoder

__all__ = ["Batcher", "FitLimits", "Job", "GROW_AFTER", "fail", "group_of"]

log = logging.getLogger(__name__)

# Consecutive batches that must succeed at a lowered limit before a twice larger one is tried. A failed
# probe costs one out-of-memory error and a retry of that batch, so at most about 1 batch in 16 is
# wasted, while memory that others free (another process, a healed fragmentation) is used again after
# a few seconds of steady encoding.
GROW_AFTER = 16
# Each failed probe doubles that wait, up to this many batches: a limit that is really the device's
# costs ever less to re-check; a successful probe resets the wait to GROW_AFTER.
GROW_AFTER_MAX = 1024
# A partial batch waits this long at most for jobs still being decoded for it (a request's misses
# are decoded in parallel and reach the batcher one by one); a GPU idles no longer than this.
EXPECT_WAIT_S = 0.5


@dataclass(eq=False)
class Job:
    key: bytes
    input: Any          # (3, H, W) float32 array for image encoders, str for text encoders
    seed: int
    meta: dict[str, str]
    future: Future = field(default_factory=Future)
    wanted: Callable[[], bool] = lambda: True  # False once every request waiting for it has gone

    @property
    def group(self) -> Hashable:
        return self.input.shape if isinstance(self.input, np.ndarray) else "text"


def group_of(spec: Any) -> Hashable:
    """The batching group a spec's job will have, known before it is decoded: (3, H, W) or "text"."""
    size = getattr(spec, "size", None)
    return (3, size[1], size[0]) if size is not None else "text"


def fail(fut: Future, exc: BaseException) -> None:
    """Fails a future unless it is settled already (a shutdown may cancel it at any time)."""
    try:
        fut.set_exception(exc)
    except InvalidStateError:
        pass


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _release_device_memory() -> None:
    """Hand the blocks a failed attempt freed back to the driver before its retry (fragmentation, other
    processes); only where CUDA is in use, so CPU-only machines never initialise it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass
class _Fit:
    limit: int
    patience: int = GROW_AFTER  # successes at `limit` needed before a larger batch is tried
    streak: int = 0             # consecutive successes at `limit`
    probing: bool = False       # `limit` was just raised and has not succeeded yet


class FitLimits:
    """The largest batch believed to fit, per (replica, input group): an out-of-memory error at a size
    lowers it to half that size; `GROW_AFTER` (more after failed probes) consecutive successful
    batches at it double it again, up to `max_batch`. A replica that never ran out of memory on a
    group keeps `max_batch` for it: devices and shapes differ, one encoder-wide number would not."""

    def __init__(self, encoder: str, max_batch: int) -> None:
        self.encoder = encoder
        self.max_batch = max_batch
        self._fits: dict[tuple[int, Hashable], _Fit] = {}
        self._mu = threading.Lock()  # `smallest` reads from other threads than the replica's own

    def get(self, replica: int, group: Hashable) -> int:
        with self._mu:
            fit = self._fits.get((replica, group))
            return self.max_batch if fit is None else fit.limit

    def smallest(self) -> int:
        with self._mu:
            return min((fit.limit for fit in self._fits.values()), default=self.max_batch)

    def out_of_memory(self, replica: int, group: Hashable, size: int) -> int:
        """Record that a batch of `size` ran out of memory; the limit to retry with."""
        with self._mu:
            fit = self._fits.setdefault((replica, group), _Fit(self.max_batch))
            if fit.probing:
                fit.patience = min(GROW_AFTER_MAX, fit.patience * 2)
            old, new = fit.limit, max(1, min(fit.limit, size // 2))
            fit.limit, fit.streak, fit.probing = new, 0, False
        if new != old:
            log.warning("encoder %s, replica %d, inputs %s: out of memory at batch %d; batches now <= %d",
                        self.encoder, replica, group, size, new)
        return new

    def succeeded(self, replica: int, group: Hashable, size: int) -> None:
        """Record a successful batch of `size`; after enough of them at the limit, raise it."""
        with self._mu:
            fit = self._fits.get((replica, group))
            if fit is None or size < fit.limit:
                return  # a short batch says nothing about the limit
            if fit.probing:
                fit.patience, fit.probing = GROW_AFTER, False
            fit.streak += 1
            if fit.streak < fit.patience or fit.limit >= self.max_batch:
                return
            old, new, streak = fit.limit, min(self.max_batch, fit.limit * 2), fit.streak
            fit.limit, fit.streak, fit.probing = new, 0, True
        log.info("encoder %s, replica %d, inputs %s: %d batches of %d fitted; trying batches of %d",
                 self.encoder, replica, group, streak, old, new)


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
        self.limits = FitLimits(encoder.name, max_batch)
        self._queues: dict[Hashable, deque[tuple[float, Job]]] = {}
        self._expected: dict[Hashable, int] = {}  # jobs being prepared, per group: worth waiting for
        self._waits: dict[int, list[float]] = {}  # per replica: how long its batch's jobs waited
        # (items, seconds it took, each item's wait in the queue), after every batch: for metrics
        self.on_batch: Callable[[int, float, list[float]], None] = lambda n, seconds, waits: None
        self.starved: Callable[[], bool] = lambda: False  # preparation is blocked: don't wait for it
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

    @property
    def fit_limit(self) -> int:
        """The smallest batch limit of any replica and input shape (`max_batch` until one ran out of
        memory); the limits themselves are in `limits`."""
        return self.limits.smallest()

    def expect(self, group: Hashable, n: int) -> None:
        """`n` jobs of `group` are being prepared (negative: no longer). While some are expected,
        a partial batch of that group waits for them, up to EXPECT_WAIT_S, so the misses of one
        request that are decoded in parallel still make one batch."""
        with self._cv:
            left = self._expected.get(group, 0) + n
            if left > 0:
                self._expected[group] = left
            else:
                self._expected.pop(group, None)
                self._cv.notify_all()

    def submit_many(self, jobs: list[Job], expected: bool = False) -> None:
        """Queues jobs for encoding; `expected`: they were announced with `expect`."""
        with self._cv:
            if expected:
                for job in jobs:
                    left = self._expected.get(job.group, 0) - 1
                    if left > 0:
                        self._expected[job.group] = left
                    else:
                        self._expected.pop(job.group, None)
            if self._closed:
                for job in jobs:
                    fail(job.future, Cancelled("daemon is shutting down"))
                return
            now = time.monotonic()
            for job in jobs:
                self._queues.setdefault(job.group, deque()).append((now, job))
            self._cv.notify()

    def poke(self) -> None:
        """Wakes the workers to look again (preparation became blocked)."""
        with self._cv:
            self._cv.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Stops taking jobs; queued jobs fail with Cancelled, the batch being encoded finishes
        (waited for up to `timeout` seconds)."""
        with self._cv:
            self._closed = True
            for queue in self._queues.values():
                while queue:
                    fail(queue.popleft()[1].future, Cancelled("daemon is shutting down"))
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout)

    def _next_batch(self, replica: int) -> list[Job] | None:
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
                limit = self.limits.get(replica, group)
                wait = self._wait_s(group, queue, limit)
                if wait > 0 and not self._closed:
                    self._cv.wait(wait)
                    continue
                return self._take(queue, limit, self._waits.setdefault(replica, []))

    def _wait_s(self, group: Hashable, queue: deque[tuple[float, Job]], limit: int) -> float:
        """How long a partial batch of `group` may still wait to fill (<= 0: run it now)."""
        if len(queue) >= limit:
            return 0.0
        waited = time.monotonic() - queue[0][0]
        if self._expected.get(group, 0) > 0 and not self.starved():
            return EXPECT_WAIT_S - waited
        return self.max_delay_s - waited

    @staticmethod
    def _take(queue: deque[tuple[float, Job]], limit: int, waits: list[float]) -> list[Job]:
        """Up to `limit` jobs that someone still wants (how long each waited goes to `waits`); the
        others fail with Cancelled."""
        jobs: list[Job] = []
        now = time.monotonic()
        while queue and len(jobs) < limit:
            queued, job = queue.popleft()
            if job.wanted():
                jobs.append(job)
                waits.append(now - queued)
            else:
                fail(job.future, Cancelled("every request waiting for this item has gone"))
        return jobs

    def queued(self) -> int:
        """Jobs waiting for a replica, and jobs being decoded for one."""
        with self._cv:
            return sum(len(q) for q in self._queues.values()) + sum(self._expected.values())

    def _loop(self, replica: int) -> None:
        while (jobs := self._next_batch(replica)) is not None:
            if not jobs:
                continue
            waits = self._waits.pop(replica, [])
            t0 = time.perf_counter()
            self._run(jobs, replica)
            elapsed = time.perf_counter() - t0
            with self._stats:
                self.busy_s += elapsed
            self.on_batch(len(jobs), elapsed, waits)

    def _run(self, jobs: list[Job], replica: int) -> None:
        """Encode and seal `jobs`; after a failure, retry in smaller batches."""
        try:
            outputs = self._encode(jobs, replica)
        except Exception as exc:  # noqa: BLE001 - every failure becomes retries or per-item errors below
            oom, error = _is_oom(exc), str(exc)
        else:
            self._finish(jobs, outputs, replica)
            return
        # Only here, out of the handler, are the exception, its traceback and with them the failed
        # attempt's frames and tensors gone, so the retries get the memory back.
        self._retry(jobs, replica, oom, error)

    def _retry(self, jobs: list[Job], replica: int, oom: bool, error: str) -> None:
        """After running out of memory, batches under the lowered limit; after any other error, one
        item at a time, so only items that fail alone get an error."""
        if len(jobs) == 1:
            source = jobs[0].meta.get("source", "?")
            log.warning("encoder %s failed on %s: %s", self.encoder.name, source, error)
            fail(jobs[0].future, EncoderError(f"encoder {self.encoder.name}: {error}"))
            return
        if oom:
            size = self.limits.out_of_memory(replica, jobs[0].group, len(jobs))
            _release_device_memory()
        else:
            log.warning("encoder %s: batch of %d failed (%s); retrying item by item",
                        self.encoder.name, len(jobs), error)
            size = 1
        for start in range(0, len(jobs), size):
            self._run(jobs[start:start + size], replica)

    def _finish(self, jobs: list[Job], outputs: dict[str, torch.Tensor], replica: int) -> None:
        """Count a successful batch and seal each item's outputs."""
        self.limits.succeeded(replica, jobs[0].group, len(jobs))
        with self._stats:
            self.items += len(jobs)
            self.batches += 1
            self.max_batch_seen = max(self.max_batch_seen, len(jobs))
        for i, job in enumerate(jobs):
            try:
                if not job.future.done():  # not cancelled by a shutdown meanwhile
                    job.future.set_result(self.seal(job, {k: v[i] for k, v in outputs.items()}))
            except Exception as exc:  # noqa: BLE001 - e.g. CapacityError: this item fails, not the batch
                fail(job.future, exc)

    def _encode(self, jobs: list[Job], replica: int) -> dict[str, torch.Tensor]:
        if self.encoder.input == "image":
            batch: Any = torch.from_numpy(np.stack([j.input for j in jobs]))
        else:
            batch = [j.input for j in jobs]
        out = self.encoder.encode(batch, [j.seed for j in jobs], replica=replica)
        return {k: v.detach().to("cpu") for k, v in out.items()}
