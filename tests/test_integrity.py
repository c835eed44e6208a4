"""Never wrong data: writes into views are never read back, leases equal live entries whatever a batch
repeats, a same-size rewrite that keeps its mtime gets a new key, counters count what was served."""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cached_client import CacheClient, CacheMiss, ImageSpec
from cached_client.stamp import RACY_NS, source_stamp, stamp_of
from cached_client.torch import CachedDataset
from cached_testing.fixtures import settle


def test_a_write_into_a_dropped_view_is_never_read_again(daemon, images):
    client = daemon.client()
    spec = ImageSpec(images[0], (64, 64))
    [e] = client.get([spec], encoder="vae")
    sealed = e["latent"].clone()
    e["latent"].add_(1000)
    del e
    [again] = client.get([spec], encoder="vae")  # the handle cache serves it: no RPC, same mapping
    torch.testing.assert_close(again["latent"], sealed, rtol=0, atol=0)


def test_a_write_into_a_live_view_is_not_seen_by_a_second_read(daemon, images):
    client = daemon.client()
    spec = ImageSpec(images[1], (64, 64))
    [held] = client.get([spec], encoder="vae")
    sealed = held["latent"].clone()
    held["latent"].mul_(-3)
    [second] = client.get([spec], encoder="vae")
    torch.testing.assert_close(second["latent"], sealed, rtol=0, atol=0)
    torch.testing.assert_close(held["latent"], sealed * -3)  # the writer keeps what it wrote


def test_numpy_views_are_read_only_and_forced_writes_do_not_come_back(daemon, images):
    client = daemon.client(tensors="numpy")
    spec = ImageSpec(images[2], (64, 64))
    [e] = client.get([spec], encoder="vae")
    arr = e["latent"]
    assert arr.flags.writeable is False
    with pytest.raises(ValueError, match="read-only"):
        arr += 1
    sealed = arr.copy()
    arr.flags.writeable = True  # a caller who insists writes into its private copy of the page
    arr += 1000
    del e, arr
    [again] = client.get([spec], encoder="vae")
    np.testing.assert_array_equal(again["latent"], sealed)


class DividingDataset(CachedDataset):
    """What a careless trainer does: unscale the latent in place."""

    def __getitems__(self, indices):
        items = super().__getitems__(indices)
        for item in items:
            item["latent"].div_(0.18215)
        return items


def test_in_place_unscaling_does_not_compound_over_epochs_with_persistent_workers(daemon, images):
    client = daemon.client()
    specs = [ImageSpec(p, (64, 64)) for p in images]
    loader = DataLoader(DividingDataset(client, specs, encoder="vae"), batch_size=4, num_workers=2,
                        persistent_workers=True)
    means = [float(torch.cat([b["latent"] for b in loader]).abs().mean()) for _ in range(3)]
    assert means[0] == pytest.approx(means[1], rel=1e-6) == pytest.approx(means[2], rel=1e-6)
    [e] = client.get(specs[:1], encoder="vae")
    assert float(e["latent"].abs().mean()) * 2 < means[0]  # the daemon's copy was never divided


@pytest.fixture(scope="module")
def quiet_daemon(tiny_vae, tmp_path_factory):
    """A daemon of their own for the lease counts: no other test's client holds leases there."""
    from conftest import vae_config

    from cached_testing.harness import Daemon

    d = Daemon(str(tmp_path_factory.mktemp("daemon")), vae_config(tiny_vae)).start()
    yield d
    d.stop()
    d.cleanup()


def hot_specs(images: list[str]) -> list[ImageSpec]:
    return [ImageSpec(p, (48, 48), flip=f) for p in images for f in (False, True)]


@pytest.mark.parametrize("repeat", ["round-robin", "pairs"])
def test_duplicate_specs_hold_one_lease_per_entry(quiet_daemon, images, repeat):
    daemon = quiet_daemon
    client = daemon.client()
    hot = hot_specs(images)
    batch = [hot[i % len(hot)] for i in range(3000)] if repeat == "round-robin" else [hot[0], hot[0]] * 300
    entries = client.get(batch, encoder="vae")
    assert [e.spec for e in entries] == batch
    distinct = len(set(batch))
    watcher = CacheClient(daemon.address)
    assert watcher.stats()["leases"] == distinct
    del entries
    gc.collect()
    client.close()
    assert watcher.stats()["leases"] == 0


def test_leases_equal_live_entries_across_repeated_gets(quiet_daemon, images):
    daemon = quiet_daemon
    client = daemon.client()
    hot = hot_specs(images)[:8]
    kept = [client.get(hot + hot[:3], encoder="vae") for _ in range(5)]
    watcher = CacheClient(daemon.address)
    assert watcher.stats()["leases"] == len(hot)
    del kept
    gc.collect()
    client.close()
    assert watcher.stats()["leases"] == 0


def rewrite_same_size_keep_mtime(path: str, source: str) -> None:
    """Rewrites `path` in place with `source`'s pixels (same size in bytes), then puts the old
    mtime back, as rsync -t or cp -p do."""
    before = os.stat(path)
    Image.open(source).convert("RGB").resize(Image.open(path).size).save(path, format="BMP")
    after = os.stat(path)
    assert after.st_size == before.st_size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


REREAD = """
import sys
from cached_client import CacheClient, ImageSpec
[e] = CacheClient(sys.argv[1]).get([ImageSpec(sys.argv[2], (64, 64))], encoder="vae")
print(e.key)
"""


def test_a_same_size_rewrite_that_keeps_its_mtime_gets_a_new_key(daemon, images, tmp_path):
    path = str(tmp_path / "photo.bmp")
    Image.open(images[0]).convert("RGB").save(path, format="BMP")
    settle(path)  # an old file: every memo keyed by stamps applies to it
    client = daemon.client()
    spec = ImageSpec(path, (64, 64))
    [old] = client.get([spec], encoder="vae")
    old_key, old_latent = old.key, old["latent"].clone()
    del old
    mtime = os.stat(path).st_mtime_ns
    rewrite_same_size_keep_mtime(path, images[3])
    assert os.stat(path).st_mtime_ns == mtime
    [new] = client.get([spec], encoder="vae")  # this process's handle cache
    assert new.key != old_key
    assert not torch.allclose(new["latent"], old_latent)
    fresh = subprocess.run([sys.executable, "-c", REREAD, daemon.address, path], capture_output=True,
                           text=True, timeout=120, check=True)
    assert fresh.stdout.strip() == new.key  # a fresh process, and the daemon's own memos
    settle(path)
    rewrite_same_size_keep_mtime(path, images[0])  # back to the first pixels, once the stamp is trusted
    [back] = client.get([spec], encoder="vae")
    assert back.key == old_key


def test_a_stamp_is_not_trusted_while_its_file_is_fresh(tmp_path):
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(b"x")
    st = os.stat(path)
    assert source_stamp(path) is None  # just written: a change within the clock tick could hide
    assert stamp_of(st, now_ns=st.st_ctime_ns + RACY_NS) is not None
    assert stamp_of(st, now_ns=st.st_ctime_ns + RACY_NS)[4] == st.st_ctime_ns
    assert source_stamp(str(tmp_path / "missing")) is None


def test_counters_count_what_was_served_and_from_where(daemon_factory, tiny_vae, images, tmp_path):
    from conftest import vae_config

    d = daemon_factory(vae_config(tiny_vae))
    client = d.client()
    specs = [ImageSpec(p, (32, 32)) for p in images[:4]]
    bad = [ImageSpec(str(tmp_path / f"missing{i}.png"), (32, 32)) for i in range(3)]

    def counters() -> dict:
        s = client.stats()
        return {k: s[k] for k in ("hits", "shm_hits", "disk_hits", "misses", "errors", "computed")}

    with pytest.raises(Exception, match="no such file"):
        client.get(bad, encoder="vae")
    assert counters() == {"hits": 0, "shm_hits": 0, "disk_hits": 0, "misses": 0, "errors": 3, "computed": 0}
    client.warm(specs, encoder="vae")
    assert counters() == {"hits": 0, "shm_hits": 0, "disk_hits": 0, "misses": 4, "errors": 3, "computed": 4}
    client.warm(specs, encoder="vae")  # everything cached: served from shared memory
    assert counters()["shm_hits"] == 4 and counters()["hits"] == 4
    client.get(specs[:2], encoder="vae")
    deadline = time.monotonic() + 60
    while client.stats()["tiers"]["disk"]["entries"] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # written through in the background
    client.evict(all=True, tier="shm")
    client.get(specs[2:], encoder="vae")  # promoted from disk
    with pytest.raises(CacheMiss):
        CacheClient(d.address).get([ImageSpec(images[5], (32, 32))], encoder="vae", compute=False)
    assert counters() == {"hits": 8, "shm_hits": 6, "disk_hits": 2, "misses": 5, "errors": 4, "computed": 4}


def test_settle_waits_for_the_racy_window(tmp_path):
    src = tmp_path / "a"
    src.write_bytes(b"1")
    settle(str(tmp_path))
    assert source_stamp(str(src)) is not None
    shutil.copy(src, tmp_path / "b")
    assert source_stamp(str(tmp_path / "b")) is None
