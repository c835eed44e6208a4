"""The remote tier and S3 object reads against a real S3 endpoint: moto's server on loopback, killed and
restarted, and a proxy in front of it that answers errors or stalls."""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from cached.store import remoteclient
from cached.store.disk import DiskTier
from cached.store.remote import RemoteFault, RemoteTier
from cached.store.remoteclient import ObjectReader, S3Endpoint
from cached.store.slot import TensorBytes
from cached_client.errors import LimitExceeded, SourceError
from cached_testing.s3 import FaultProxy, MotoServer, free_port

pytest_plugins = ("cached_testing.s3fixtures",)  # aws_env, moto, proxy
pytestmark = pytest.mark.timeout(120)

FAST = {"get_timeout_s": 1.0, "backoff_s": 0.05, "max_backoff_s": 0.5, "breaker_cooldown_s": 0.3}


def key_of(i: int) -> bytes:
    return hashlib.blake2b(f"entry {i}".encode(), digest_size=32).digest()


def tb(arr: np.ndarray, dtype: str | None = None) -> TensorBytes:
    return TensorBytes(dtype or str(arr.dtype), tuple(arr.shape), memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))


def entry(i: int, shape: tuple[int, ...] = (4, 32, 32)) -> dict[str, TensorBytes]:
    rng = np.random.default_rng(i)
    n = int(np.prod(shape))
    return {"latent": tb((np.linspace(-1, 1, n) + 0.01 * rng.standard_normal(n)).astype(np.float32).reshape(shape))}


def meta_of(i: int) -> dict[str, str]:
    return {"encoder": "vae", "source": f"/data/img_{i}.png", "spec": f'["i","/data/img_{i}.png",256,256]'}


def same(a: dict[str, TensorBytes], b: dict[str, TensorBytes]) -> bool:
    return a.keys() == b.keys() and all(
        (a[n].dtype, tuple(a[n].shape), bytes(a[n].data)) == (b[n].dtype, tuple(b[n].shape), bytes(b[n].data))
        for n in a)


def took(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.monotonic()
    out = fn()
    return out, time.monotonic() - t


@pytest.fixture
def make_tier(moto: MotoServer, proxy: FaultProxy) -> Iterator[Callable[..., RemoteTier]]:
    """Tiers on a prefix of their own in the module's bucket, by default straight to moto."""
    prefix = f"t-{uuid.uuid4().hex[:8]}"
    tiers: list[RemoteTier] = []

    def make(endpoint: str | None = None, bucket: str | None = None, **kw: Any) -> RemoteTier:
        tier = RemoteTier(f"s3://{bucket or moto.bucket}/{prefix}", endpoint or moto.url, **{**FAST, **kw})
        tiers.append(tier)
        return tier

    yield make
    proxy.reset()
    for tier in tiers:
        tier.close(timeout=5)


@pytest.mark.parametrize("compression", ["none", "lz4"])
def test_round_trip_is_byte_identical(make_tier: Callable[..., RemoteTier], moto: MotoServer, compression: str) -> None:
    tier = make_tier(compression=compression)
    rng = np.random.default_rng(0)
    tensors = {**entry(1), "hidden_states": tb(rng.standard_normal((77, 64)).astype(np.float16)),
               "pooled": tb(rng.integers(0, 1 << 16, 64, dtype=np.uint16), "bfloat16"),
               "attention_mask": tb(np.ones(77, dtype=np.int64)), "flags": tb(np.array([True, False]))}
    assert tier.put(key_of(1), tensors, meta_of(1)) is True
    got = tier.get(key_of(1))
    assert got is not None
    assert same(got[0], tensors) and got[1] == meta_of(1)
    name = tier.object_key(key_of(1))
    assert re.fullmatch(rf"{tier.prefix}/entries/{key_of(1).hex()[:2]}/{key_of(1).hex()}\.safetensors", name)
    raw = moto.get_raw(name)
    assert raw is not None
    s = tier.stats()
    assert (s["hits"], s["misses"], s["uploads"], s["errors"]) == (1, 0, 1, 0)
    assert s["bytes_out"] == s["bytes_in"] == len(raw)


def test_objects_are_the_disk_tier_files(make_tier: Callable[..., RemoteTier], moto: MotoServer, tmp_path: Any) -> None:
    """Any node or tool reads an object as a disk-tier file; with no compression, as plain safetensors."""
    for i, compression in [(2, "lz4"), (3, "none")]:
        tier = make_tier(compression=compression)
        with DiskTier(str(tmp_path / compression), 1 << 30, compression, durable=False) as disk:
            disk.put(key_of(i), entry(2), meta_of(2))
            with open(disk._path(key_of(i)), "rb") as f:
                on_disk = f.read()
        assert tier.put(key_of(i), entry(2), meta_of(2))
        assert moto.get_raw(tier.object_key(key_of(i))) == on_disk
    loaded = load_safetensors(on_disk)
    assert loaded["latent"].tobytes() == bytes(entry(2)["latent"].data)


def test_missing_entry_is_a_miss(make_tier: Callable[..., RemoteTier]) -> None:
    tier = make_tier()
    assert tier.get(key_of(3)) is None
    missing_bucket = make_tier(bucket="no-such-bucket")
    assert missing_bucket.get(key_of(3)) is None
    assert (tier.stats()["misses"], tier.stats()["errors"]) == (1, 0)
    with pytest.raises(RemoteFault) as caught:
        missing_bucket.put(key_of(3), entry(3), meta_of(3))
    assert caught.value.kind == "not_found" and caught.value.retried


def test_damaged_object_is_a_miss_counted_and_replaced(make_tier: Callable[..., RemoteTier], moto: MotoServer) -> None:
    tier = make_tier()
    tier.put(key_of(4), entry(4), meta_of(4))
    name = tier.object_key(key_of(4))
    good = moto.get_raw(name)
    assert good is not None
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    tier.put(key_of(5), entry(5), meta_of(5))
    foreign = moto.get_raw(tier.object_key(key_of(5)))  # a whole, intact entry of another key
    assert foreign is not None
    for i, bad in enumerate([bytes(flipped), good[:len(good) // 2], good[:5], foreign, b""]):
        moto.put_raw(name, bad)
        assert tier.get(key_of(4)) is None
        assert tier.stats()["corrupt"] == i + 1
        assert moto.get_raw(name) is None, "a damaged object is deleted, so that an upload can replace it"
    assert tier.put(key_of(4), entry(4), meta_of(4)) is True
    got = tier.get(key_of(4))
    assert got is not None and same(got[0], entry(4))


def test_conditional_put_stores_an_entry_once(make_tier: Callable[..., RemoteTier], moto: MotoServer) -> None:
    if not moto.supports_if_none_match():
        pytest.skip("this moto does not refuse a PUT with If-None-Match: * over an existing object")
    node_a, node_b = make_tier(), make_tier()
    assert node_a.put(key_of(6), entry(6), meta_of(6)) is True
    assert node_b.put(key_of(6), entry(7), {"encoder": "other"}) is False
    got = node_b.get(key_of(6))
    assert got is not None and same(got[0], entry(6)) and got[1] == meta_of(6)
    keys = range(10, 18)
    for node in (node_a, node_b):
        for i in keys:
            node.submit(key_of(i), entry(i), meta_of(i))
    assert node_a.flush(20) and node_b.flush(20)
    a, b = node_a.stats(), node_b.stats()
    assert a["uploads"] + b["uploads"] == 1 + len(keys)
    assert a["uploads_raced"] + b["uploads_raced"] == 1 + len(keys)
    assert a["errors"] == b["errors"] == 0


def test_submit_uploads_in_the_background(make_tier: Callable[..., RemoteTier]) -> None:
    tier = make_tier()
    slowest = 0.0
    for i in range(20, 40):
        accepted, dt = took(lambda i=i: tier.submit(key_of(i), entry(i), meta_of(i)))
        assert accepted
        slowest = max(slowest, dt)
    assert tier.submit(key_of(39), entry(39), meta_of(39))  # already queued: not uploaded twice
    assert slowest < 0.1
    assert tier.flush(20)
    for i in range(20, 40):
        got = tier.get(key_of(i))
        assert got is not None and same(got[0], entry(i)) and got[1] == meta_of(i)
    s = tier.stats()
    assert (s["uploads"], s["uploads_raced"], s["upload_queue_depth"], s["upload_queue_bytes"]) == (20, 0, 0, 0)


def test_full_queue_drops_uploads_without_blocking(make_tier: Callable[..., RemoteTier], proxy: FaultProxy) -> None:
    size = entry(0)["latent"].nbytes
    tier = make_tier(proxy.url, max_queue_bytes=3 * size, upload_workers=1)
    proxy.delay_s = 0.5
    results, dt = took(lambda: [tier.submit(key_of(i), entry(i), meta_of(i)) for i in range(50, 60)])
    assert results == [True] * 3 + [False] * 7
    assert dt < 0.2
    s = tier.stats()
    assert (s["uploads_dropped"], s["upload_queue_depth"], s["upload_queue_bytes"]) == (7, 3, 3 * size)
    proxy.delay_s = 0.0
    assert tier.flush(20)
    assert tier.stats()["uploads"] == 3


def test_store_answering_errors(make_tier: Callable[..., RemoteTier], proxy: FaultProxy) -> None:
    """500s are misses for gets and retried for uploads, which go through once the store recovers;
    each kind of answer is counted as what it is."""
    tier = make_tier(proxy.url)
    tier.put(key_of(70), entry(70), meta_of(70))
    proxy.fail_next(7, 500)
    got, dt = took(lambda: tier.get(key_of(70)))
    assert got is None and dt < 1.0
    accepted, dt = took(lambda: [tier.submit(key_of(i), entry(i), meta_of(i)) for i in range(71, 74)])
    assert accepted == [True] * 3 and dt < 0.1
    assert tier.flush(20)
    for i in range(70, 74):
        got = tier.get(key_of(i))
        assert got is not None and same(got[0], entry(i))
    s = tier.stats()
    assert s["errors_5xx"] == 7 and s["uploads"] == 4 and s["uploads_retried"] >= 1 and s["uploads_failed"] == 0
    for status, kind in [(503, "5xx"), (429, "throttled"), (403, "denied"), (400, "4xx")]:
        proxy.fail_next(1, status)
        with pytest.raises(RemoteFault) as caught:
            tier.put(key_of(status), entry(1), meta_of(1))
        assert caught.value.kind == kind
    proxy.fail_next(1, 403)  # not retried: credentials do not mend by themselves
    tier.submit(key_of(75), entry(75), meta_of(75))
    assert tier.flush(10)
    s = tier.stats()
    assert (s["uploads_failed"], s["errors_denied"], s["errors_throttled"], s["errors_4xx"]) == (1, 2, 1, 1)


def test_slow_store(make_tier: Callable[..., RemoteTier], proxy: FaultProxy) -> None:
    """A store that stalls: gets are misses within their timeout, then skipped; uploads wait for it."""
    tier = make_tier(proxy.url, get_timeout_s=0.5, put_timeout_s=0.5, breaker_cooldown_s=60.0)
    tier.put(key_of(80), entry(80), meta_of(80))
    proxy.delay_s = 2.0
    for _ in range(3):
        got, dt = took(lambda: tier.get(key_of(80)))
        assert got is None and dt < 1.0
    got, dt = took(lambda: tier.get(key_of(80)))
    assert got is None and dt < 0.05, "after 3 faults in a row, gets skip the store"
    accepted, dt = took(lambda: [tier.submit(key_of(i), entry(i), meta_of(i)) for i in range(81, 84)])
    assert accepted == [True] * 3 and dt < 0.1
    s = tier.stats()
    assert s["errors_timeout"] >= 3 and s["gets_skipped"] == 1
    proxy.delay_s = 0.0
    assert tier.flush(30)
    for i in range(81, 84):  # uploaded by a retry, or by the stalled try that the store finished late
        assert tier.put(key_of(i), entry(i), meta_of(i)) is False
    assert tier.stats()["uploads_failed"] == 0


def test_store_killed_and_restarted(aws_env: None, tmp_path: Any) -> None:
    """moto keeps its state in memory: a restart is an empty store (what was stored is gone), so the
    test asserts what a node must guarantee: uploads in flight or queued while the store is down
    resume after it, gets meanwhile are quick misses, and every hit is whole and verified."""
    server = MotoServer(str(tmp_path / "moto.log")).start()
    tier = RemoteTier(f"s3://{server.bucket}/p", server.url, get_timeout_s=0.5, backoff_s=0.1, max_backoff_s=1.0,
                      upload_attempts=12, breaker_cooldown_s=0.2)
    try:
        stored = tier.put(key_of(90), entry(90), meta_of(90))
        assert stored
        early = range(91, 96)
        for i in early:
            tier.submit(key_of(i), entry(i, (16, 64, 64)), meta_of(i))
        server.stop()  # mid-upload
        late = range(96, 100)
        accepted, dt = took(lambda: [tier.submit(key_of(i), entry(i), meta_of(i)) for i in late])
        assert accepted == [True] * len(late) and dt < 0.1
        got, dt = took(lambda: tier.get(key_of(90)))
        assert got is None and dt < 1.0
        assert tier.stats()["errors_connection"] >= 1
        server.restart()
        assert tier.flush(30)
        assert tier.stats()["uploads_failed"] == 0
        for i in late:
            got = tier.get(key_of(i))
            assert got is not None and same(got[0], entry(i))
        for i in early:  # those uploaded before the kill went with moto's memory
            got = tier.get(key_of(i))
            assert got is None or same(got[0], entry(i, (16, 64, 64)))
        assert tier.get(key_of(90)) is None
    finally:
        tier.close(5)
        server.stop()


def test_close_never_waits_for_a_dead_store(aws_env: None) -> None:
    tier = RemoteTier("s3://nowhere/p", f"http://127.0.0.1:{free_port()}", get_timeout_s=0.5, backoff_s=0.2,
                      upload_attempts=50, upload_workers=1)
    for i in range(5):
        tier.submit(key_of(i), entry(i), meta_of(i))
    done, dt = took(lambda: tier.close(timeout=0.5))
    assert done is False and dt < 1.5
    s = tier.stats()
    assert s["uploads_dropped"] + s["uploads_failed"] == 5 and s["upload_queue_depth"] == 0
    assert s["errors_connection"] >= 1
    assert tier.get(key_of(0)) is None
    assert tier.submit(key_of(9), entry(9), meta_of(9)) is False


def test_list_delete_and_evict_all(make_tier: Callable[..., RemoteTier], moto: MotoServer) -> None:
    tier = make_tier()
    keys = [key_of(i) for i in range(100, 105)]
    for i, key in enumerate(keys):
        tier.put(key, entry(100 + i), meta_of(100 + i))
    rows = tier.list_entries()
    assert [r.key for r in rows] == sorted(keys)
    for r in rows:
        assert r.size == len(moto.get_raw(tier.object_key(r.key)) or b"") and r.mtime > 0
    assert [r.key for r in tier.list_entries(keys[0].hex()[:3])] == [keys[0]]
    assert [r.key for r in tier.list_entries(keys[0].hex()[:1])] == sorted(k for k in keys if k[:1] == keys[0][:1])
    assert len(tier.list_entries(limit=2)) == 2
    with pytest.raises(ValueError, match="hex"):
        tier.list_entries("XY")
    assert tier.delete(keys[:2]) == 2
    assert sorted(r.key for r in tier.list_entries()) == sorted(keys[2:])
    assert tier.get(keys[0]) is None
    assert tier.evict_all() == (3, sum(r.size for r in rows if r.key in keys[2:]))
    assert tier.list_entries() == []


def test_listing_a_store_that_is_down_says_why(aws_env: None) -> None:
    tier = RemoteTier("s3://nowhere/p", f"http://127.0.0.1:{free_port()}", put_timeout_s=1.0)
    try:
        with pytest.raises(RemoteFault) as caught:
            tier.list_entries()
        assert caught.value.kind == "connection"
    finally:
        tier.close(1)


def test_bad_arguments_are_named() -> None:
    for url in ("s3://", "http://bucket/p", "bucket/p"):
        with pytest.raises(ValueError, match="s3://bucket/prefix"):
            RemoteTier(url)
    with pytest.raises(ValueError, match="compression"):
        RemoteTier("s3://b/p", compression="zip")
    with pytest.raises(ValueError, match="get_timeout_s"):
        RemoteTier("s3://b/p", get_timeout_s=0)
    assert remoteclient.parse_url("s3://bucket/a/b/") == ("bucket", "a/b")


def test_read_object_in_concurrent_bounded_parts(moto: MotoServer, proxy: FaultProxy) -> None:
    data = os.urandom((3 << 20) + 7)
    moto.put_raw("sources/big.png", data)
    moto.put_raw("sources/empty.png", b"")
    reader = ObjectReader(S3Endpoint(proxy.url), part_bytes=256 << 10, concurrency=4)
    try:
        info = reader.head(moto.bucket, "sources/big.png")
        assert (info.etag, info.version_id, info.size) == (f'"{hashlib.md5(data).hexdigest()}"', None, len(data))
        proxy.delay_s = 0.05
        proxy.max_in_flight = 0
        assert reader.read_object(moto.bucket, "sources/big.png", len(data)) == data
        assert 2 <= proxy.max_in_flight <= 4
        proxy.delay_s = 0.0
        assert reader.read_object(moto.bucket, "sources/empty.png", 10) == b""
        with pytest.raises(LimitExceeded):
            reader.read_object(moto.bucket, "sources/big.png", len(data) - 1)
        with pytest.raises(SourceError, match="no such object"):
            reader.read_object(moto.bucket, "sources/missing.png", 10)
        moto.put_raw("sources/big.png", data[::-1])  # replaced after the HEAD
        with pytest.raises(SourceError, match="changed while being read"):
            reader.read_object(moto.bucket, "sources/big.png", len(data), info)
    finally:
        reader.close()
