"""The remote tier and s3:// sources through real daemons: two daemons sharing one bucket of moto's S3
server on loopback, a proxy in front of it that answers 500s or stalls, the server killed mid-upload,
a truncated object, cachectl's ls and evict of the remote tier."""

from __future__ import annotations

import os
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import vae_config

from cached.engine.sources import Sources
from cached.store import diskformat
from cached.store.remoteclient import ObjectReader, S3Endpoint
from cached_client import CacheMiss, ImageSpec, LimitExceeded, SourceNotAllowed
from cached_client.cachectl import main as cachectl
from cached_testing.harness import Daemon
from cached_testing.s3 import FaultProxy, MotoServer, free_port

pytest_plugins = ("cached_testing.s3fixtures",)  # aws_env, moto, proxy
pytestmark = pytest.mark.timeout(300)

SIZE = (64, 64)


@pytest.fixture
def prefix(proxy: FaultProxy) -> Iterator[str]:
    """A prefix of the bucket for this test alone; the proxy is reset after it."""
    yield f"t-{uuid.uuid4().hex[:8]}"
    proxy.reset()


def remote(moto: MotoServer, prefix: str, endpoint: str, **more: Any) -> dict[str, Any]:
    return {"remote": f"s3://{moto.bucket}/{prefix}", "remote_endpoint": endpoint, **more}


def latents(entries: list[Any]) -> list[bytes]:
    return [e["latent"].numpy().tobytes() for e in entries]


def wait_for(d: Daemon, done: Callable[[dict[str, Any]], bool], timeout: float = 90.0) -> dict[str, Any]:
    """The daemon's stats once `done` holds of them (polled, bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        s = d.client().stats()
        if done(s):
            return s
        assert time.monotonic() < deadline, {k: v for k, v in s.items() if k.startswith("remote_")}
        time.sleep(0.1)


def uploads_settled(n: int) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s["remote_uploads"] + s["remote_uploads_raced"] >= n and s["remote_upload_queue_depth"] == 0


def test_second_daemon_is_served_from_the_first_ones_uploads(daemon_factory: Any, tiny_vae: str, images: list[str],
                                                             moto: MotoServer, prefix: str) -> None:
    store = remote(moto, prefix, moto.url)
    specs = [ImageSpec(p, SIZE) for p in images[:4]]
    first = daemon_factory(vae_config(tiny_vae, **store))
    computed = latents(first.client().get(specs, encoder="vae"))
    wait_for(first, uploads_settled(len(specs)))
    assert len(moto.list_raw(f"{prefix}/entries/")) == len(specs)

    port = free_port()
    second = daemon_factory({**vae_config(tiny_vae, **store), "server": {"metrics": f"127.0.0.1:{port}"}})
    assert latents(second.client().get(specs, encoder="vae", compute=False)) == computed
    s = second.client().stats()
    assert s["remote_hits"] == len(specs) and s["hits"] == len(specs) and s["encoders"]["vae"]["items"] == 0
    assert s["tiers"]["remote"]["backend"] == store["remote"]
    # promoted from the bucket: never queued for upload again
    assert sum(s[f"remote_{k}"] for k in ("uploads", "uploads_raced", "uploads_dropped", "uploads_failed",
                                          "upload_queue_depth")) == 0
    wait_for(second, lambda s: s["tiers"]["disk"]["entries"] == len(specs))  # and written through to disk
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        metrics = page.read().decode()
    assert f'cached_hits_total{{tier="remote"}} {float(len(specs))}' in metrics
    assert "cached_remote_upload_queue 0.0" in metrics and 'cached_remote_errors_total{kind="5xx"} 0.0' in metrics


def test_a_store_answering_500s_fails_no_get_and_uploads_are_retried(daemon_factory: Any, tiny_vae: str,
                                                                    images: list[str], moto: MotoServer,
                                                                    proxy: FaultProxy, prefix: str) -> None:
    d = daemon_factory(vae_config(tiny_vae, **remote(moto, prefix, proxy.url)))
    specs = [ImageSpec(p, SIZE) for p in images[:2]]
    proxy.fail_next(6)  # both lookups, then four upload tries: fewer than the tries each upload has
    assert len(d.client().get(specs, encoder="vae")) == 2  # encoded here
    s = wait_for(d, uploads_settled(2))
    assert s["remote_uploads"] == 2 and s["remote_uploads_failed"] == 0
    assert s["remote_errors_5xx"] >= 6 and s["remote_uploads_retried"] >= 4
    assert len(moto.list_raw(f"{prefix}/entries/")) == 2


def test_a_slow_store_never_holds_up_serving(daemon_factory: Any, tiny_vae: str, images: list[str],
                                            moto: MotoServer, proxy: FaultProxy, prefix: str) -> None:
    d = daemon_factory(vae_config(tiny_vae, **remote(moto, prefix, proxy.url, remote_get_timeout=0.5)))
    specs = [ImageSpec(p, SIZE) for p in images[:2]]
    proxy.delay_s = 5.0  # longer than a lookup may take
    client = d.client()
    computed = latents(client.get(specs, encoder="vae"))
    s = client.stats()
    assert s["computed"] == 2 and s["remote_errors_timeout"] >= 1
    assert latents(d.client().get(specs, encoder="vae")) == computed  # from shared memory, store or not
    again = d.client().stats()
    assert again["computed"] == 2 and again["remote_misses"] == s["remote_misses"]  # the store was not asked
    proxy.delay_s = 0.0
    wait_for(d, uploads_settled(2))
    assert len(moto.list_raw(f"{prefix}/entries/")) == 2


def test_store_killed_mid_upload_serving_goes_on_and_nothing_half_written_is_read(
        daemon_factory: Any, tiny_vae: str, images: list[str], moto: MotoServer, proxy: FaultProxy,
        prefix: str) -> None:
    store = remote(moto, prefix, proxy.url)
    d = daemon_factory(vae_config(tiny_vae, **store))
    specs = [ImageSpec(p, SIZE) for p in images[:6]]
    client = d.client()
    proxy.delay_s = 1.0
    client.get(specs[:2], encoder="vae")
    deadline = time.monotonic() + 30
    while proxy.in_flight == 0:  # an upload is on its way through the proxy
        assert time.monotonic() < deadline, "no upload reached the store"
        time.sleep(0.01)
    moto.stop()
    assert len(client.get(specs[2:4], encoder="vae")) == 2  # the store is gone: encoded here
    moto.start()
    proxy.delay_s = 0.0
    computed = latents(client.get(specs, encoder="vae"))
    s = wait_for(d, lambda s: s["remote_upload_queue_depth"] == 0 and s["remote_uploads"] >= 1)
    assert s["remote_errors_5xx"] + s["remote_errors_connection"] >= 1
    names = moto.list_raw(f"{prefix}/entries/")
    assert names, "no upload resumed after the store came back"
    for name in names:  # every object stored is whole
        data = moto.get_raw(name)
        assert data is not None
        diskformat.decode(memoryview(data), bytes.fromhex(name.rsplit("/", 1)[1].split(".")[0]))
    other = daemon_factory(vae_config(tiny_vae, **remote(moto, prefix, moto.url))).client()
    served = 0
    for spec, expected in zip(specs, computed, strict=True):
        try:
            [e] = other.get([spec], encoder="vae", compute=False)
        except CacheMiss:
            continue
        assert latents([e]) == [expected]
        served += 1
    assert served == len(names)


def test_truncated_object_is_a_miss_and_is_deleted(daemon_factory: Any, tiny_vae: str, images: list[str],
                                                   moto: MotoServer, prefix: str) -> None:
    store = remote(moto, prefix, moto.url)
    spec = ImageSpec(images[0], SIZE)
    first = daemon_factory(vae_config(tiny_vae, **store))
    computed = latents(first.client().get([spec], encoder="vae"))
    wait_for(first, uploads_settled(1))
    [name] = moto.list_raw(f"{prefix}/entries/")
    data = moto.get_raw(name)
    assert data is not None
    moto.put_raw(name, data[: len(data) // 2])  # as a store that lost the end of a write would keep it
    second = daemon_factory(vae_config(tiny_vae, **store))
    with pytest.raises(CacheMiss):
        second.client().get([spec], encoder="vae", compute=False)
    s = second.client().stats()
    assert s["remote_corrupt"] == 1 and s["remote_hits"] == 0
    assert moto.get_raw(name) is None
    assert latents(second.client().get([spec], encoder="vae")) == computed
    wait_for(second, uploads_settled(1))
    assert moto.get_raw(name) == data  # replaced by a whole one


def test_s3_source_gives_the_local_files_key_and_latents(daemon_factory: Any, tiny_vae: str, images: list[str],
                                                        moto: MotoServer, proxy: FaultProxy, prefix: str) -> None:
    local = images[0]
    with open(local, "rb") as f:
        moto.put_raw(f"{prefix}/img/a.png", f.read())
    url = f"s3://{moto.bucket}/{prefix}/img/a.png"
    d = daemon_factory(vae_config(tiny_vae, allowed_roots=[f"s3://{moto.bucket}/{prefix}/img", os.path.dirname(local)],
                                  sources_endpoint=proxy.url))
    client = d.client()
    [from_s3] = client.get([ImageSpec(url, SIZE)], encoder="vae")
    key, latent = from_s3.key, latents([from_s3])
    client.evict(all=True)  # the local file is encoded from its own bytes, not served from the cache
    [from_file] = d.client().get([ImageSpec(local, SIZE)], encoder="vae")
    assert from_file.key == key and latents([from_file]) == latent
    assert d.client().stats()["computed"] == 2

    gets, heads = proxy.methods.get("GET", 0), proxy.methods.get("HEAD", 0)
    [again] = d.client().get([ImageSpec(url, SIZE)], encoder="vae")
    assert again.key == key
    assert (proxy.methods.get("GET", 0), proxy.methods.get("HEAD", 0)) == (gets, heads + 1)  # no download

    with open(images[1], "rb") as f:
        moto.put_raw(f"{prefix}/img/a.png", f.read())  # rewritten in place
    [changed] = d.client().get([ImageSpec(url, SIZE)], encoder="vae")
    assert changed.key != key and latents([changed]) != latent

    requests = proxy.requests
    for outside in (f"s3://other-bucket/{prefix}/img/a.png", f"s3://{moto.bucket}/{prefix}/img-other/a.png",
                    f"s3://{moto.bucket}/{prefix}/a.png", f"s3://{moto.bucket}/{prefix}/imga.png"):
        with pytest.raises(SourceNotAllowed):
            d.client().get([ImageSpec(outside, SIZE)], encoder="vae")
    assert proxy.requests == requests  # refused without asking the store


def test_object_roots_match_whole_segments_and_admit_no_local_file() -> None:
    """Checked before any request: the reader's endpoint is never reached."""
    reader = ObjectReader(S3Endpoint("http://127.0.0.1:9"))
    try:
        sources = Sources(["s3://data/train"], check_access=False, objects=reader)
        assert sources.objects.locate("s3://data/train/a/b.png") == ("data", "train/a/b.png")
        for url in ("s3://data/train-old/a.png", "s3://data/trainx", "s3://other/train/a.png", "s3://data/a.png"):
            with pytest.raises(SourceNotAllowed):
                sources.objects.locate(url)
        with pytest.raises(SourceNotAllowed):
            sources.resolve("/etc/hostname")  # s3:// roots only: no local file is allowed
        assert Sources(["s3://data"], objects=reader).objects.locate("s3://data/any/key.png") == ("data", "any/key.png")
        with pytest.raises(SourceNotAllowed):
            Sources(["/data"], objects=reader).objects.locate("s3://data/train/a.png")  # no s3:// root: no object
    finally:
        reader.close()


def test_ls_and_evict_of_the_remote_tier(daemon_factory: Any, tiny_vae: str, images: list[str], moto: MotoServer,
                                         prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    d = daemon_factory(vae_config(tiny_vae, **remote(moto, prefix, moto.url)))
    entries = d.client().get([ImageSpec(p, SIZE) for p in images[:2]], encoder="vae")
    wait_for(d, uploads_settled(2))
    capsys.readouterr()
    assert cachectl(["--address", d.address, "stats"]) == 0
    assert f"remote s3://{moto.bucket}/{prefix}: 0 hits, 2 misses, 2 uploads, 0 queued, 0 errors" in capsys.readouterr().out
    assert cachectl(["--address", d.address, "ls", "--tier", "remote", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(r["key"] for r in listed["entries"]) == sorted(e.key for e in entries)
    assert {r["tier"] for r in listed["entries"]} == {"remote"}

    assert cachectl(["--address", d.address, "evict", "--all", "--tier", "remote"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("InvalidSpec:") and "--yes" in err and len(err.strip().splitlines()) == 1
    assert len(moto.list_raw(f"{prefix}/entries/")) == 2  # nothing deleted

    assert cachectl(["--address", d.address, "evict", "--encoder", "vae", "--tier", "remote", "--yes"]) == 1
    assert "--all or --key" in capsys.readouterr().err
    assert cachectl(["--address", d.address, "evict", "--key", entries[0].key, "--tier", "remote", "--yes",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["remote_entries"] == 1
    assert cachectl(["--address", d.address, "evict", "--all", "--tier", "remote", "--yes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["remote_entries"] == 1
    assert moto.list_raw(f"{prefix}/entries/") == []
    assert d.client().stats()["tiers"]["shm"]["entries"] == 2  # the local tiers keep theirs


def test_object_source_over_the_size_bound_is_refused_unread(moto: MotoServer, proxy: FaultProxy, prefix: str) -> None:
    moto.put_raw(f"{prefix}/big.png", b"x" * 100)
    reader = ObjectReader(S3Endpoint(proxy.url))
    try:
        objects = Sources([f"s3://{moto.bucket}/{prefix}"], max_bytes=99, objects=reader).objects
        gets = proxy.methods.get("GET", 0)
        with pytest.raises(LimitExceeded, match="limits.max_source_bytes"):
            objects.fetch(f"s3://{moto.bucket}/{prefix}/big.png", always_read=False)
        assert proxy.methods.get("GET", 0) == gets  # HEAD said how large it is: never downloaded
        objects.max_bytes = 100
        digest, data = objects.fetch(f"s3://{moto.bucket}/{prefix}/big.png", always_read=False)
        assert data == b"x" * 100
        assert objects.fetch(f"s3://{moto.bucket}/{prefix}/big.png", always_read=False) == (digest, None)
        assert objects.fetch(f"s3://{moto.bucket}/{prefix}/big.png", always_read=True) == (digest, data)
    finally:
        reader.close()
