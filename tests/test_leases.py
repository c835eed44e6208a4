"""Idle leases: kept so a re-read costs no RPC, checked against the source file on every hit, and
given back when the daemon's control page signals memory pressure, even by a client that is idle."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time

from conftest import vae_config
from PIL import Image

from cached_client import ImageSpec


def test_reread_after_views_die_costs_no_rpc(daemon, images):
    client = daemon.client()
    specs = [ImageSpec(p, (40, 40)) for p in images[:4]]
    keys = [e.key for e in client.get(specs, encoder="vae")]  # views die at once: leases go idle
    gc.collect()
    before = client.stats()
    again = client.get(specs, encoder="vae")
    after = client.stats()
    assert [e.key for e in again] == keys
    assert after["hits"] == before["hits"] and after["misses"] == before["misses"]  # no Get reached the daemon


def test_a_rewritten_source_is_noticed_by_the_handle_cache(daemon, images, tmp_path):
    path = str(tmp_path / "a.png")
    shutil.copy(images[0], path)
    client = daemon.client()
    spec = ImageSpec(path, (40, 40))
    [old] = client.get([spec], encoder="vae")
    old_key = old.key
    del old
    Image.open(images[5]).save(path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    [new] = client.get([spec], encoder="vae")
    assert new.key != old_key


HOLDER = """
import sys, time
from cached_client import CacheClient, ImageSpec
client = CacheClient(sys.argv[1])
client.get([ImageSpec(p, (64, 64), flip=f) for p in sys.argv[2:] for f in (False, True)], encoder="vae")
print("idle", flush=True)   # every view is gone: 24 idle leases, and this process makes no more calls
time.sleep(120)
"""


def test_an_idle_client_gives_leases_back_under_pressure(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae, {"client_leased_bytes": "100%"}, shm_bytes="128KiB"))  # 32 slots
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, d.address, *images], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "idle"
        client = d.client()
        assert client.stats()["leases"] == 24
        # 24 more entries than fit beside the idle 24: the daemon signals, the holder's watcher releases
        fresh = [ImageSpec(p, (72, 64), flip=f) for p in images for f in (False, True)]
        for i in range(0, len(fresh), 4):
            client.get(fresh[i:i + 4], encoder="vae")
        client.close()  # gives back this client's own idle leases
        deadline = time.monotonic() + 30
        while client.stats()["leases"] > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.stats()["leases"] == 0
        assert holder.poll() is None  # released by its watcher, not by dying
    finally:
        holder.kill()
        holder.wait()
