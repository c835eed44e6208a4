"""The disk tier through a real daemon: restarts, kill -9 mid-warm, corrupted files, tiers in stats."""

from __future__ import annotations

import glob
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import vae_config

from cached_client import CacheMiss, ImageSpec

SIZES = [(64, 64), (72, 64), (64, 80), (80, 80)]


def digest(e) -> str:
    return hashlib.sha256(e["latent"].numpy().tobytes()).hexdigest()


def entry_files(d) -> list[str]:
    return glob.glob(os.path.join(d.disk_dir, "entries", "*", "*.safetensors"))


def wait_for_disk(d, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while d.client().stats()["tiers"]["disk"]["entries"] < n:
        assert time.monotonic() < deadline, "entries never reached the disk"
        time.sleep(0.1)


def test_warm_stop_start_serves_everything_without_computing(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae))
    specs = [ImageSpec(p, s) for p in images[:6] for s in SIZES]
    client = d.client()
    assert not client.warm(specs, encoder="vae").failed
    before = [digest(e) for e in client.get(specs, encoder="vae", compute=False)]
    assert d.stop() == 0  # SIGTERM finishes the disk writes in flight
    d.start()
    after = d.client().get(specs, encoder="vae", compute=False)
    assert [digest(e) for e in after] == before
    stats = d.client().stats()
    assert stats["encoders"]["vae"]["items"] == 0  # nothing was encoded after the restart
    assert stats["promotions"] == len(specs)
    assert stats["tiers"]["disk"]["entries"] == len(specs)
    assert stats["tiers"]["shm"]["entries"] == len(specs)


def test_kill_9_mid_warm_never_serves_a_partial_entry(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae))
    specs = [ImageSpec(p, (8 * k, 64)) for k in range(8, 20) for p in images]  # 144 items
    warm = subprocess.Popen([sys.executable, "-m", "cached_client.cachectl", "--address", d.address, "warm",
                             "--encoder", "vae", "--manifest", "/dev/stdin"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    import json

    warm.stdin.write("".join(json.dumps({"path": s.path, "size": list(s.size)}) + "\n" for s in specs))
    warm.stdin.close()
    wait_for_disk(d, 10)
    d.stop(signal.SIGKILL)
    warm.wait(60)
    d.start()
    client = d.client()
    survived = []
    for spec in specs:
        try:
            survived.append((spec, client.get([spec], encoder="vae", compute=False)[0]["latent"].clone()))
        except CacheMiss:
            pass
    assert 10 <= len(survived) < len(specs)
    assert not glob.glob(os.path.join(d.disk_dir, "tmp", "*"))  # the restart cleaned temporary files
    d.stop()
    # recomputing in another daemon gives the same latents (up to batch-size rounding): nothing
    # served was partial
    fresh = daemon_factory(vae_config(tiny_vae))
    for spec, served in survived[:10]:
        [e] = fresh.client().get([spec], encoder="vae")
        assert torch.allclose(e["latent"], served, rtol=1e-4, atol=1e-5)


def test_corrupted_entry_file_is_detected_and_recomputed(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae, compression="none"))
    spec = ImageSpec(images[0], (64, 64))
    [e] = d.client().get([spec], encoder="vae")
    good = e["latent"].clone()
    del e
    wait_for_disk(d, 1)
    d.stop()
    [path] = entry_files(d)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 16)
        data = f.read(8)
        f.seek(os.path.getsize(path) - 16)
        f.write(bytes(b ^ 0xFF for b in data))
    d.start()
    client = d.client()
    with pytest.raises(CacheMiss):
        client.get([spec], encoder="vae", compute=False)
    stats = client.stats()
    assert stats["disk_corrupt"] == 1 and not os.path.exists(path)
    [again] = client.get([spec], encoder="vae")
    assert torch.equal(again["latent"], good)


def test_truncated_entry_file_is_detected(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae))
    spec = ImageSpec(images[1], (64, 64))
    d.client().get([spec], encoder="vae")
    wait_for_disk(d, 1)
    d.stop()
    [path] = entry_files(d)
    os.truncate(path, os.path.getsize(path) // 2)
    d.start()
    [e] = d.client().get([spec], encoder="vae")  # recomputed, not served from the short file
    assert e["latent"].shape == (4, 8, 8)
    assert d.client().stats()["disk_corrupt"] == 1


def test_evict_tiers_and_stats_show_both(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae))
    client = d.client()
    specs = [ImageSpec(p, (64, 64)) for p in images[:4]]
    client.warm(specs, encoder="vae")
    wait_for_disk(d, 4)
    tiers = client.stats()["tiers"]
    assert tiers["shm"]["entries"] == tiers["disk"]["entries"] == 4
    assert tiers["disk"]["capacity_bytes"] == 200 << 30
    r = client.evict(all=True, tier="shm")
    assert r["entries"] == 4 and r["disk_entries"] == 0
    [e] = client.get(specs[:1], encoder="vae", compute=False)  # promoted back from disk
    del e
    r = client.evict(keys=[], source_prefix=images[1], tier="disk")
    assert r["disk_entries"] == 1 and r["entries"] == 0
    r = client.evict(all=True)
    assert r["entries"] == 1 and r["disk_entries"] == 3
    tiers = client.stats()["tiers"]
    assert tiers["shm"]["entries"] == tiers["disk"]["entries"] == 0
