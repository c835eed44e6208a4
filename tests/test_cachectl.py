"""cachectl against a real daemon: warm, stats, evict, health, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cached_client import CacheMiss, ImageSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cachectl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cached_client.cachectl", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_health(daemon):
    r = cachectl("--address", daemon.address, "health")
    assert r.returncode == 0 and r.stdout.strip() == "SERVING"


def test_warm_directory_then_stats_json(daemon, images):
    folder = os.path.dirname(images[0])
    r = cachectl("--address", daemon.address, "warm", "--encoder", "vae", "--size", "48x48",
                 "--flip", "both", folder)
    assert r.returncode == 0, r.stderr
    assert f"warmed {2 * len(images)} of {2 * len(images)}" in r.stdout
    assert "items/s" in r.stderr
    stats = json.loads(cachectl("--address", daemon.address, "stats", "--json").stdout)
    assert stats["tiers"]["shm"]["entries"] >= 2 * len(images)
    assert {"entries", "bytes", "capacity_bytes"} <= set(stats["tiers"]["shm"])
    assert {"hits", "misses", "evictions"} <= set(stats)
    again = cachectl("--address", daemon.address, "warm", "--encoder", "vae", "--size", "48x48", folder)
    assert f"0 computed, {len(images)} already cached" in again.stdout
    human = cachectl("--address", daemon.address, "stats")
    assert human.returncode == 0 and "entries" in human.stdout


def test_warm_manifest_lists_failures_and_exits_nonzero(daemon, images, tmp_path):
    manifest = tmp_path / "m.jsonl"
    lines = [{"path": images[0], "size": [40, 40]}, {"path": str(tmp_path / "gone.png"), "size": [40, 40]},
             {"path": images[1], "size": [40, 48], "flip": True, "crop": "random"}]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = cachectl("--address", daemon.address, "warm", "--encoder", "vae", "--manifest", str(manifest))
    assert r.returncode == 1
    assert "warmed 2 of 3" in r.stdout
    assert f"failed: {tmp_path / 'gone.png'}: SourceError" in r.stderr
    [e] = daemon.client().get([ImageSpec(images[1], (40, 48), crop="random", flip=True)], encoder="vae",
                              compute=False)
    assert e["latent"].shape == (4, 6, 5)


def test_evict_by_key_prefix_encoder_all(daemon, images, tmp_path):
    import shutil

    mine = [shutil.copy(images[i], tmp_path / f"{i}.png") for i in range(3)]
    client = daemon.client()
    a, b, c = client.get([ImageSpec(str(p), (32, 32)) for p in mine], encoder="vae")
    key_a = a.key
    del a
    r = cachectl("--address", daemon.address, "evict", "--key", key_a)
    assert r.returncode == 0 and "evicted 1 entries" in r.stdout
    r = cachectl("--address", daemon.address, "evict", "--source-prefix", str(mine[1]))
    assert "evicted 1 entries" in r.stdout and "1 still held" in r.stdout  # b's view is alive
    with pytest.raises(CacheMiss):
        daemon.client().get([ImageSpec(str(mine[1]), (32, 32))], encoder="vae", compute=False)
    assert float(b["latent"].abs().sum()) > 0  # still readable: its slot is freed only on release
    r = cachectl("--address", daemon.address, "evict", "--encoder", "vae", "--tier", "shm")
    assert r.returncode == 0 and "evicted" in r.stdout
    r = cachectl("--address", daemon.address, "evict", "--all")
    assert r.returncode == 0
    assert json.loads(cachectl("--address", daemon.address, "stats", "--json").stdout)["tiers"]["shm"]["entries"] == 0


@pytest.mark.parametrize("args,message", [
    (["warm", "--encoder", "nope", "--size", "64x64", "/etc/hostname"], "UnknownEncoder: no encoder named 'nope'"),
    (["warm", "--encoder", "vae", "/etc/hostname"], "ValueError: warm needs --size"),
    (["evict", "--key", "zz"], "InvalidSpec: keys must be hex"),
])
def test_errors_are_one_line(daemon, args, message):
    r = cachectl("--address", daemon.address, *args)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(message), r.stderr
    assert "Traceback" not in r.stderr


def test_unreachable_daemon_is_one_line(tmp_path):
    r = cachectl("--address", f"unix://{tmp_path}/none.sock", "--timeout", "0.5", "stats")
    assert r.returncode == 1
    assert r.stderr.startswith("DaemonUnavailable: no cached daemon answering at unix://")
    assert "Traceback" not in r.stderr
