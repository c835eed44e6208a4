"""Out-of-memory splits in the batcher, in process, against a fake GPU whose memory is real: a byte
budget over the tensors its forward pass allocates and keeps alive, as a network's activations are.

A retry made while the failed attempt is still alive (inside the `except` block, where its traceback
holds its frames) finds that memory still taken, so its halves fail too, down to per-item errors; a
retry made after letting it go gets the memory back. There is no GPU here, hence the fake.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from cached.encoders import Encoder
from cached.encoders.base import Replica
from cached.engine.batcher import GROW_AFTER, Batcher, Job
from cached_client import EncoderError

LAYERS = 4
BIG = (3, 32, 32)     # 4 items fit the budget below, 8 do not
SMALL = (3, 8, 8)     # a full batch of 8 fits
BLOCKER = (3, 4, 4)   # parks one replica at the gate, so the test knows which replica runs the rest
MAX_BATCH = 8
TIMEOUT_S = 30.0


def item_bytes(shape: tuple[int, ...]) -> int:
    """Device bytes one item of `shape` takes in a forward: its input and LAYERS activations."""
    return (LAYERS + 1) * int(np.prod(shape)) * 4


class FakeGpuMemory:
    """A fake device's memory: real CPU tensors, counted while alive against a budget in bytes;
    raises torch.cuda.OutOfMemoryError, as a GPU would, when an allocation would pass the budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.live = 0
        self._mu = threading.Lock()

    def empty(self, shape: torch.Size) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * 4
        with self._mu:
            if self.live + nbytes > self.budget:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake device): {nbytes} bytes "
                                                  f"asked, {self.live} of {self.budget} live")
            self.live += nbytes
        t = torch.empty(shape)
        weakref.finalize(t, self._free, nbytes)
        return t

    def _free(self, nbytes: int) -> None:
        with self._mu:
            self.live -= nbytes


class FakeGpuMemoryEncoder(Encoder):
    """An image encoder whose replicas run on fake GPUs (`FakeGpuMemory`): each layer's activation is
    allocated there and kept referenced until the forward returns. It records each batch it runs, and
    a batch of BLOCKER-shaped inputs waits at `gate`."""

    kind = "fake-gpu"
    input = "image"
    fingerprint = "fake-gpu-memory"

    def __init__(self, budgets: list[int]) -> None:
        self.name = "fake"
        self.devices = [f"fake-gpu:{i}" for i in range(len(budgets))]
        self._replicas = [Replica(d, FakeGpuMemory(b)) for d, b in zip(self.devices, budgets, strict=True)]
        self.gate, self.at_gate = threading.Event(), threading.Event()
        self.blocked_replica = -1
        self.ran: list[tuple[int, tuple[int, ...], int]] = []  # (replica, item shape, batch size)
        self.ooms: list[tuple[int, tuple[int, ...], int]] = []

    def memory(self, replica: int) -> FakeGpuMemory:
        return self._replicas[replica].model  # type: ignore[no-any-return]

    def _encode(self, rep: Replica, batch: Any, seeds: list[int]) -> dict[str, torch.Tensor]:
        replica = self._replicas.index(rep)
        if tuple(batch.shape[1:]) == BLOCKER:
            self.blocked_replica = replica
            self.at_gate.set()
            assert self.gate.wait(TIMEOUT_S)
        try:
            out = forward(batch, rep.model)
        except torch.cuda.OutOfMemoryError:
            self.ooms.append((replica, tuple(batch.shape[1:]), len(batch)))
            raise
        self.ran.append((replica, tuple(batch.shape[1:]), len(batch)))
        return {"latent": out}


def forward(batch: torch.Tensor, memory: FakeGpuMemory | None = None) -> torch.Tensor:
    """LAYERS elementwise layers; every activation lives until the end, on `memory` when given. The
    result is copied off the device, as the engine's `.to("cpu")` does."""
    alloc = memory.empty if memory is not None else torch.empty
    acts = [alloc(batch.shape)]
    acts[0].copy_(batch)
    for layer in range(LAYERS):
        acts.append(torch.tanh(acts[-1] * (1.0 + layer / 10), out=alloc(batch.shape)))
    return acts[-1].clone()


def jobs(shape: tuple[int, ...], n: int, start: int = 0) -> list[Job]:
    rng = np.random.default_rng(start)
    return [Job(key=b"%d" % (start + i), input=rng.uniform(-1, 1, shape).astype(np.float32),
                seed=start + i, meta={"source": f"item-{start + i}"}) for i in range(n)]


@dataclass
class Rig:
    """A batcher on two fake GPUs with one replica parked at the gate: everything the test submits
    runs on the other one, `replica`."""

    encoder: FakeGpuMemoryEncoder
    batcher: Batcher
    replica: int

    def run(self, batch: list[Job]) -> list[torch.Tensor]:
        """Submit `batch` and wait for every item; raises the first failed item's error."""
        self.batcher.submit_many(batch)
        done, _ = wait([j.future for j in batch], timeout=TIMEOUT_S)
        assert len(done) == len(batch), "the batcher did not answer in time"
        return [j.future.result() for j in batch]

    def limit(self, shape: tuple[int, ...], replica: int | None = None) -> int:
        return self.batcher.limits.get(self.replica if replica is None else replica, shape)


@pytest.fixture
def rig() -> Iterator[Rig]:
    budget = 4 * item_bytes(BIG)
    encoder = FakeGpuMemoryEncoder([budget, budget])
    batcher = Batcher(encoder, lambda job, out: out["latent"], max_batch=MAX_BATCH, max_delay_s=0.001)
    parked = jobs(BLOCKER, 1, start=10_000)
    batcher.submit_many(parked)
    assert encoder.at_gate.wait(TIMEOUT_S)
    yield Rig(encoder, batcher, 1 - encoder.blocked_replica)
    encoder.gate.set()
    assert isinstance(parked[0].future.result(timeout=TIMEOUT_S), torch.Tensor)
    batcher.close()


def test_an_over_budget_batch_succeeds_in_halves(rig: Rig) -> None:
    batch = jobs(BIG, MAX_BATCH)
    results = rig.run(batch)  # an in-handler retry fails here: its halves find the memory still taken
    for job, got in zip(batch, results, strict=True):
        torch.testing.assert_close(got, forward(torch.from_numpy(job.input)[None])[0])
    assert rig.encoder.ooms == [(rig.replica, BIG, MAX_BATCH)]
    assert rig.encoder.ran == [(rig.replica, BIG, 4)] * 2
    assert rig.encoder.memory(rig.replica).live == 0
    assert (rig.batcher.items, rig.batcher.batches, rig.batcher.max_batch_seen) == (MAX_BATCH, 2, 4)


def test_the_limit_is_per_replica_and_per_shape(rig: Rig) -> None:
    rig.run(jobs(BIG, MAX_BATCH))
    assert rig.limit(BIG) == 4 and rig.batcher.fit_limit == 4
    assert rig.limit(BIG, replica=1 - rig.replica) == MAX_BATCH  # that replica never ran out of memory
    rig.encoder.ran.clear()
    rig.run(jobs(SMALL, MAX_BATCH))
    assert rig.encoder.ran == [(rig.replica, SMALL, MAX_BATCH)]  # another shape still runs full batches
    assert rig.limit(SMALL) == MAX_BATCH


def test_the_limit_grows_back_and_a_failed_probe_halves_it(rig: Rig) -> None:
    rig.run(jobs(BIG, MAX_BATCH))  # out of memory at 8, then 2 batches of 4
    rig.run(jobs(BIG, 4 * (GROW_AFTER - 2), start=100))
    assert rig.limit(BIG) == MAX_BATCH  # probing
    rig.run(jobs(BIG, MAX_BATCH, start=200))  # still does not fit: halved again, every item succeeds
    assert rig.encoder.ooms == [(rig.replica, BIG, MAX_BATCH)] * 2 and rig.limit(BIG) == 4
    rig.encoder.memory(rig.replica).budget = MAX_BATCH * item_bytes(BIG)  # memory freed by others
    rig.run(jobs(BIG, 4 * (2 * GROW_AFTER - 2), start=300))  # a failed probe doubled the wait
    assert rig.limit(BIG) == MAX_BATCH
    rig.run(jobs(BIG, MAX_BATCH, start=400))
    assert rig.encoder.ran[-1] == (rig.replica, BIG, MAX_BATCH) and len(rig.encoder.ooms) == 2


def test_an_item_too_big_alone_fails_alone(rig: Rig) -> None:
    batch = jobs(SMALL, 4)
    batch[2].input = np.full(BIG, 0.5, dtype=np.float32)  # a shape of its own: another queue
    rig.encoder.memory(rig.replica).budget = item_bytes(BIG) - 1
    with pytest.raises(EncoderError, match="out of memory"):
        rig.run(batch)
    assert [j.future.exception() is None for j in batch] == [True, True, False, True]
