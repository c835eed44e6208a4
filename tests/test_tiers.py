"""Shared memory in front of the disk tier, on their own: write-through under concurrent evictions."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cached.engine.selection import Selection
from cached.engine.tiers import MAX_PENDING_WRITES, Tiers
from cached.store import ShmStore, TensorBytes
from cached.store.disk import DiskTier
from cached.store.names import new_instance_id


class SlowDisk(DiskTier):
    """A disk tier whose writes take 2 ms each, so writes are in flight when evictions come."""

    def put(self, key, tensors, meta):
        time.sleep(0.002)
        return super().put(key, tensors, meta)


@pytest.fixture
def tiers(tmp_path):
    shm_dir = tempfile.mkdtemp(prefix="cached-test-", dir="/dev/shm")
    store = ShmStore(shm_dir, 64 << 20, new_instance_id())
    t = Tiers(store, SlowDisk(str(tmp_path / "disk"), 1 << 30, "none", durable=False))
    yield t
    t.close()
    store.close()
    os.rmdir(shm_dir)


def entry(i: int) -> dict[str, TensorBytes]:
    return {"latent": TensorBytes("float32", (256,), memoryview(np.full(256, i, dtype=np.float32)))}


def test_concurrent_evictions_with_writes_in_flight_finish(tiers):
    n = MAX_PENDING_WRITES + 200  # more than the write queue holds: sealing waits for the disk too
    with ThreadPoolExecutor(4) as pool:
        seals = [pool.submit(tiers.seal, i.to_bytes(32, "little"), entry(i), {"encoder": "vae"}) for i in range(n)]
        time.sleep(0.2)  # let the queue fill
        evicts = [threading.Thread(target=tiers.evict, args=(Selection(everything=True), "all"))
                  for _ in range(3)]
        for t in evicts:
            t.start()
        for t in evicts:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in evicts), "evictions deadlocked on the pending writes"
        for f in seals:
            f.result(timeout=60)
    tiers.flush(timeout=60)
    assert tiers.disk is not None and tiers.disk.stats()["entries"] <= n


def test_flush_waits_only_for_writes_sealed_before_it(tiers):
    for i in range(50):
        tiers.seal(i.to_bytes(32, "little"), entry(i), {})
    tiers.flush(timeout=30)
    assert tiers.disk is not None and tiers.disk.stats()["entries"] == 50
