"""Filling shared memory past shm_bytes: held entries stay intact, the rest is evicted LRU."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import vae_config

from cached_client import CapacityError, ImageSpec

ONE_CLIENT_MAY_HOLD_ALL = {"client_leased_bytes": "100%"}  # the default cap is half of shared memory
SIZES = [(64, 64), (64, 72), (72, 64), (80, 64), (64, 80), (88, 64)]


def all_specs(images):
    return [ImageSpec(p, s, flip=f) for p in images for s in SIZES for f in (False, True)]  # 144 entries


def test_fill_past_capacity_while_holding_views(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae, shm_bytes="256KiB"))  # 64 one-page slots
    client = d.client()
    specs = all_specs(images)
    held = client.get(specs[:20], encoder="vae")
    snapshot = [e["latent"].clone() for e in held]
    for i in range(20, len(specs), 8):
        client.get(specs[i:i + 8], encoder="vae")
        gc.collect()
    stats = client.stats()
    shm = stats["tiers"]["shm"]
    assert shm["bytes"] <= shm["capacity_bytes"] == 256 << 10
    assert stats["evictions"] >= len(specs) - 64
    for e, before in zip(held, snapshot, strict=True):
        assert torch.equal(e["latent"], before)
    # what was held was never evicted: it is still served without computing
    again = d.client().get(specs[:20], encoder="vae", compute=False)
    assert [e.key for e in again] == [e.key for e in held]


def test_capacity_error_when_every_slot_is_held(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae, ONE_CLIENT_MAY_HOLD_ALL, shm_bytes="64KiB"))  # 16 slots
    client = d.client()
    specs = all_specs(images)
    held = client.get(specs[:16], encoder="vae")
    with pytest.raises(CapacityError, match="held by clients' leases"):
        client.get(specs[16:17], encoder="vae")
    del held
    gc.collect()
    [e] = client.get(specs[16:17], encoder="vae")  # releases piggyback on this call, then it fits
    assert e["latent"].shape == (4, 8, 9)  # (72, 64) is (width, height)


def test_leases_of_a_dead_client_process_expire(daemon_factory, tiny_vae, images):
    import subprocess
    import sys
    import time

    d = daemon_factory(vae_config(tiny_vae, ONE_CLIENT_MAY_HOLD_ALL, shm_bytes="64KiB"))
    code = ("import sys; from cached_client import *; c = CacheClient(sys.argv[1]); "
            "held = c.get([ImageSpec(p, (64, 64)) for p in sys.argv[2:]], encoder='vae'); "
            "import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code, d.address, *images], check=True, timeout=120)
    client = d.client()
    deadline = time.monotonic() + 10
    while client.stats()["leases"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.stats()["leases"] == 0
