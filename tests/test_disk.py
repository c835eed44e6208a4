"""The disk tier on a real directory: round trips, restarts, damaged files, kill -9, LRU, eviction."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from safetensors import safe_open

from cached.store import diskformat
from cached.store.disk import DiskTier
from cached.store.slot import TensorBytes
from cached_client.errors import CapacityError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPRESSIONS = ["none", "lz4"]


def key_of(i: int) -> bytes:
    return i.to_bytes(4, "little") * 8


def tb(arr: np.ndarray, dtype: str | None = None) -> TensorBytes:
    return TensorBytes(dtype or str(arr.dtype), tuple(arr.shape), memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))


def latent(i: int, shape: tuple[int, ...] = (4, 16, 16)) -> dict[str, TensorBytes]:
    """A smooth fp32 latent (compressible once shuffled) that differs per i."""
    rng = np.random.default_rng(i)
    arr = (np.linspace(-1, 1, int(np.prod(shape))) + 0.01 * rng.standard_normal(int(np.prod(shape))))
    return {"latent": tb(arr.astype(np.float32).reshape(shape))}


def meta_of(i: int, encoder: str = "vae", source: str | None = None) -> dict[str, str]:
    source = f"/data/set{i % 2}/img_{i}.png" if source is None else source
    return {"encoder": encoder, "source": source, "spec": f'["i","{source}",128,128,"center",false]'}


def same(a: dict[str, TensorBytes], b: dict[str, TensorBytes]) -> bool:
    return a.keys() == b.keys() and all(
        (a[n].dtype, tuple(a[n].shape), bytes(a[n].data)) == (b[n].dtype, tuple(b[n].shape), bytes(b[n].data))
        for n in a)


@pytest.fixture(params=COMPRESSIONS)
def tier(request: pytest.FixtureRequest, tmp_path: str):
    t = DiskTier(str(tmp_path / "disk"), 1 << 30, request.param, durable=False)
    yield t
    t.close()


def test_round_trip_is_byte_identical_for_every_dtype(tier: DiskTier) -> None:
    rng = np.random.default_rng(0)
    import torch

    bf16 = torch.randn(16, 8, 8).bfloat16().view(torch.int16).numpy()
    tensors = {
        "latent": tb(bf16, "bfloat16"),
        "hidden_states": tb(rng.standard_normal((77, 32)).astype(np.float16)),
        "pooled": tb(rng.standard_normal(32).astype(np.float64)),
        "attention_mask": tb(np.ones(77, dtype=np.int64)),
        "flags": tb(np.array([True, False, True])),
        "empty": tb(np.zeros((0, 4), dtype=np.float32)),
    }
    tier.put(key_of(1), tensors, meta_of(1))
    got, meta = tier.get(key_of(1))
    assert same(got, tensors)
    assert meta == meta_of(1)
    assert tier.contains(key_of(1)) and not tier.contains(key_of(2))
    assert tier.get(key_of(2)) is None
    s = tier.stats()
    assert (s["entries"], s["hits"], s["misses"], s["writes"]) == (1, 1, 1, 1)


def test_compression_shrinks_latents_and_plain_files_are_zero_copy(tmp_path) -> None:
    sizes = {}
    for comp in COMPRESSIONS:
        with DiskTier(str(tmp_path / comp), 1 << 30, comp, durable=False) as t:
            sizes[comp] = t.put(key_of(1), latent(1, (4, 64, 64)), meta_of(1))
            got, _ = t.get(key_of(1))
            assert same(got, latent(1, (4, 64, 64)))
            if comp == "none":
                assert got["latent"].data.readonly  # a view of the read-only mmap, not a copy
    assert sizes["lz4"] < 0.9 * sizes["none"]


def test_files_are_valid_safetensors(tier: DiskTier) -> None:
    tier.put(key_of(3), latent(3), meta_of(3))
    with safe_open(tier._path(key_of(3)), "np") as f:
        md = f.metadata()
        assert md["encoder"] == "vae" and md["cached.key"] == key_of(3).hex()
        if md["cached.codec"] == "none":
            assert f.get_tensor("latent").tobytes() == bytes(latent(3)["latent"].data)
        else:
            assert list(f.keys()) == ["cached.lz4"]


def test_a_new_instance_on_the_same_directory_sees_every_entry(tmp_path) -> None:
    d = str(tmp_path / "disk")
    with DiskTier(d, 1 << 30, "lz4", durable=False) as t:
        for i in range(20):
            t.put(key_of(i), latent(i), meta_of(i))
    with DiskTier(d, 1 << 30, "lz4") as t:
        assert t.stats()["entries"] == 20
        for i in range(20):
            got, meta = t.get(key_of(i))
            assert same(got, latent(i)) and meta == meta_of(i)


def test_a_second_tier_on_a_directory_in_use_is_refused(tmp_path) -> None:
    with DiskTier(str(tmp_path), 1 << 20, "none"):
        with pytest.raises(ValueError, match="in use by another process"):
            DiskTier(str(tmp_path), 1 << 20, "none")


@pytest.mark.parametrize("where", ["length", "header", "checksum", "data", "last"])
def test_a_flipped_byte_is_detected_removed_and_counted(tier: DiskTier, where: str) -> None:
    tier.put(key_of(5), latent(5), meta_of(5))
    path = tier._path(key_of(5))
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    head_len = int.from_bytes(blob[:8], "little")
    pos = {"length": 0, "header": blob.index(b"/data/"), "checksum": blob.index(b'"cached.xxh3":"') + 16,
           "data": 8 + head_len + 3, "last": len(blob) - 1}[where]
    blob[pos] ^= 0x01
    with open(path, "wb") as f:
        f.write(blob)
    assert tier.get(key_of(5)) is None
    assert not os.path.exists(path)
    assert not tier.contains(key_of(5))
    s = tier.stats()
    assert (s["corrupt"], s["entries"], s["bytes"]) == (1, 0, 0)
    tier.put(key_of(5), latent(5), meta_of(5))  # recomputed on demand
    assert same(tier.get(key_of(5))[0], latent(5))


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_a_truncated_file_is_detected_removed_and_counted(tier: DiskTier, keep: int) -> None:
    tier.put(key_of(6), latent(6), meta_of(6))
    path = tier._path(key_of(6))
    size = os.path.getsize(path)
    os.truncate(path, keep if keep >= 0 else size - 1)
    assert tier.get(key_of(6)) is None
    assert not os.path.exists(path)
    assert tier.stats()["corrupt"] == 1


def test_a_file_under_another_keys_name_is_rejected(tier: DiskTier) -> None:
    tier.put(key_of(1), latent(1), meta_of(1))
    tier.put(key_of(2), latent(2), meta_of(2))
    os.replace(tier._path(key_of(1)), tier._path(key_of(2)))
    assert tier.get(key_of(2)) is None
    assert tier.stats()["corrupt"] == 1


def test_a_row_whose_file_vanished_is_a_miss_and_is_dropped(tier: DiskTier) -> None:
    tier.put(key_of(7), latent(7), meta_of(7))
    os.unlink(tier._path(key_of(7)))
    assert tier.get(key_of(7)) is None
    assert not tier.contains(key_of(7))
    assert tier.stats()["corrupt"] == 0


def test_golden_bytes_of_an_uncompressed_entry() -> None:
    key = bytes(range(32))
    tensors = {"latent": tb(np.arange(8, dtype=np.float32).reshape(2, 2, 2))}
    meta = {"encoder": "vae", "source": "/data/a.png", "spec": '["i","/data/a.png",16,16,"center",false]'}
    enc = diskformat.encode(key, tensors, meta, "none")
    header = (
        b'{"__metadata__":{"cached.codec":"none","cached.format":"1",'
        b'"cached.key":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",'
        b'"cached.layout":"[[\\"latent\\",\\"float32\\",[2,2,2],0,32]]","cached.raw_bytes":"32",'
        b'"cached.xxh3":"85077f923bbb81a08f6319f23dd9c610","encoder":"vae","source":"/data/a.png",'
        b'"spec":"[\\"i\\",\\"/data/a.png\\",16,16,\\"center\\",false]"},'
        b'"latent":{"data_offsets":[0,32],"dtype":"F32","shape":[2,2,2]}}')
    expected = (len(header) + 11).to_bytes(8, "little") + header + b" " * 11 + np.arange(8, dtype=np.float32).tobytes()
    assert b"".join(bytes(c) for c in enc.chunks) == expected
    assert len(expected) % 64 == 32 and (8 + len(header) + 11) % 64 == 0


GOLDEN_LZ4_HEADER = (
    b'\xf8\x01\x00\x00\x00\x00\x00\x00{"__metadata__":{"cached.codec":"lz4+shuffle","cached.format":"1",'
    b'"cached.key":"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",'
    b'"cached.layout":"[[\\"latent\\",\\"float32\\",[64],0,256]]","cached.planes":"[64,64,64,55]",'
    b'"cached.raw_bytes":"256","cached.xxh3":"9d82e2d798ead8dea956cc652740d065","encoder":"vae",'
    b'"source":"/data/a.png","spec":"[\\"i\\",\\"/data/a.png\\",16,16,\\"center\\",false]"},'
    b'"cached.lz4":{"data_offsets":[0,247],"dtype":"U8","shape":[247]}}' + b" " * 35)
GOLDEN_LZ4_DATA = bytes.fromhex(  # three raw planes (mantissa bytes), then plane 3 as an LZ4 block
    "00a4b7c3cf108c469532f85cd82272441025b369c81015e7fc38080e2ae9a4064d39f7c238ea9f4bbcfb2831a1d09ae8"
    "5622ff24a0b4cdf45efde743237ff24b006ac781bd7c0f30460144ff5c209879681e4079b62f05a1d38737d5b4e3efde"
    "2afa713ae5bebdbbbf6da1ef03d4db13ac29559493b60cef84502c0110533a5f00d7689041f58fa87d530bff09577da6"
    "93f6409969d611d8678743f48aa97c4e0dff075b7da497f63ea26ad491d9667d44f486ab7c4a0fff055f7ea39cf73dab"
    "fa1e003e3f3dbfbebe3e3f3ebfbebf3e3f3ebebebf3d3f3ebcbebfbd3f3e3ebebfbe3f3e3fbebfbe3e3e3fbdbfbe3c2c"
    "00503ebebebf3d")


def test_golden_bytes_of_a_compressed_entry() -> None:
    """Files written by format 1 must stay readable whatever LZ4 version writes new ones."""
    arr = (np.sin(np.arange(64)) * np.array([1, 0.5] * 32)).astype(np.float32)
    tensors, meta = diskformat.decode(memoryview(GOLDEN_LZ4_HEADER + GOLDEN_LZ4_DATA), bytes(range(32)))
    assert bytes(tensors["latent"].data) == arr.tobytes()
    assert tensors["latent"].shape == (64,) and meta["source"] == "/data/a.png"
    enc = diskformat.encode(bytes(range(32)), {"latent": tb(arr)}, meta, "lz4+shuffle", min_saving=0.0)
    assert b"".join(bytes(c) for c in enc.chunks) == GOLDEN_LZ4_HEADER + GOLDEN_LZ4_DATA
    assert len(GOLDEN_LZ4_HEADER) == 512


def test_lru_eviction_keeps_the_tier_under_capacity(tmp_path) -> None:
    one = diskformat.encode(key_of(0), latent(0), meta_of(0), "none").size
    with DiskTier(str(tmp_path), 3 * one + one // 2, "none", durable=False) as t:
        for i in range(3):
            t.put(key_of(i), latent(i), meta_of(i))
        assert t.get(key_of(0)) is not None  # 0 is now the most recently used; 1 the least
        t.put(key_of(3), latent(3), meta_of(3))
        assert [t.contains(key_of(i)) for i in range(4)] == [True, False, True, True]
        assert t.stats()["bytes"] <= t.capacity
        assert not os.path.exists(t._path(key_of(1)))
        assert (t.stats()["evictions"], t.stats()["entries"]) == (1, 3)
    with DiskTier(str(tmp_path), 3 * one + one // 2, "none", durable=False) as t:  # access times persisted
        t.put(key_of(4), latent(4), meta_of(4))
        assert [t.contains(key_of(i)) for i in range(5)] == [True, False, False, True, True]


def test_a_lower_capacity_evicts_the_least_recently_used_at_open(tmp_path) -> None:
    with DiskTier(str(tmp_path), 1 << 30, "none", durable=False) as t:
        for i in range(5):
            t.put(key_of(i), latent(i), meta_of(i))
        t.get(key_of(0))
        one = t.stats()["bytes"] // 5
    with DiskTier(str(tmp_path), 2 * one, "none") as t:
        assert [t.contains(key_of(i)) for i in range(5)] == [True, False, False, False, True]
        assert t.stats()["bytes"] <= 2 * one


def test_an_entry_larger_than_the_tier_is_a_capacity_error(tmp_path) -> None:
    with DiskTier(str(tmp_path), 1000, "none", durable=False) as t:
        with pytest.raises(CapacityError, match="does not fit"):
            t.put(key_of(1), latent(1), meta_of(1))
        assert os.listdir(t._tmp_dir) == []


def test_evict_by_encoder_source_prefix_and_all(tier: DiskTier) -> None:
    for i in range(6):
        tier.put(key_of(i), latent(i), meta_of(i, encoder="vae" if i < 4 else "flux"))
    n, freed = tier.evict(lambda e: e.meta["encoder"] == "flux")
    assert n == 2 and freed > 0
    n, _ = tier.evict(lambda e: e.meta["source"].startswith("/data/set1/"))
    assert n == 2  # 1 and 3
    assert [tier.contains(key_of(i)) for i in range(6)] == [True, False, True, False, False, False]
    assert tier.evict(lambda e: e.key == key_of(2))[0] == 1
    assert tier.evict_all()[0] == 1
    assert tier.stats()["entries"] == tier.stats()["bytes"] == 0
    assert all(not os.listdir(os.path.join(tier._entries_dir, d)) for d in os.listdir(tier._entries_dir))


def test_list_entries_shows_meta_least_recently_used_first(tier: DiskTier) -> None:
    for i in range(3):
        tier.put(key_of(i), latent(i), meta_of(i))
    tier.get(key_of(0))
    entries = tier.list_entries()
    assert [e.key for e in entries] == [key_of(1), key_of(2), key_of(0)]
    assert entries[0].meta == meta_of(1) and entries[0].raw_bytes == 4 * 16 * 16 * 4


def test_concurrent_writers_and_readers_agree_with_the_index(tmp_path) -> None:
    one = diskformat.encode(key_of(0), latent(0), meta_of(0), "none").size
    t = DiskTier(str(tmp_path), 40 * one, "lz4", durable=False)
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for j in range(60):
                i = (seed * 7 + j) % 80
                t.put(key_of(i), latent(i), meta_of(i))
                got = t.get(key_of((i + 3) % 80))
                assert got is None or same(got[0], latent((i + 3) % 80))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    s = t.stats()
    files = sum(len(os.listdir(os.path.join(t._entries_dir, d))) for d in os.listdir(t._entries_dir))
    assert s["entries"] == files and s["bytes"] <= t.capacity and s["corrupt"] == 0
    t.close()
    with DiskTier(str(tmp_path), 40 * one, "lz4") as t2:
        assert t2.stats()["entries"] == s["entries"] and t2.stats()["bytes"] == s["bytes"]


# kill -9: a real child process writing, killed at a chosen point or at random

CHILD = """
import os, sys, threading, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_disk import key_of, latent, meta_of
from cached.store import disk, diskindex
mode, directory = sys.argv[1], sys.argv[2]
t = disk.DiskTier(directory, 1 << 30, "lz4", durable=True)
for i in range(3):
    t.put(key_of(i), latent(i), meta_of(i))

def hang(*a, **k):
    print("stuck", flush=True)
    time.sleep(600)

if mode == "before-rename":
    disk.os.replace = hang
elif mode == "before-commit":
    diskindex.DiskIndex.upsert = hang
else:
    def writer(base):
        for i in range(base, base + 100000, 4):
            t.put(key_of(i), latent(i, (4, 64, 64)), meta_of(i))
            if i == base + 40:
                print("going", flush=True)
    for b in range(3, 7):
        threading.Thread(target=writer, args=(b,), daemon=True).start()
    time.sleep(600)
t.put(key_of(3), latent(3), meta_of(3))
"""


def run_and_kill(tmp_path, mode: str) -> str:
    d = str(tmp_path / "disk")
    script = CHILD.format(root=ROOT, tests=os.path.join(ROOT, "tests"))
    proc = subprocess.Popen([sys.executable, "-c", script, mode, d], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        # writer threads print concurrently, so two "going"s can share a line
        assert re.fullmatch(r"stuck|(going)+", line.strip()), line
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    return d


def test_kill_9_before_the_rename_leaves_no_entry_and_no_tmp_file(tmp_path) -> None:
    d = run_and_kill(tmp_path, "before-rename")
    assert len(os.listdir(os.path.join(d, "tmp"))) == 1  # the fsynced, never renamed write
    with DiskTier(d, 1 << 30, "lz4") as t:
        assert os.listdir(os.path.join(d, "tmp")) == []
        assert [t.contains(key_of(i)) for i in range(4)] == [True, True, True, False]
        assert t.get(key_of(3)) is None
        assert same(t.get(key_of(2))[0], latent(2))


def test_kill_9_between_rename_and_commit_adopts_the_whole_file(tmp_path) -> None:
    d = run_and_kill(tmp_path, "before-commit")
    with DiskTier(d, 1 << 30, "lz4") as t:
        assert t.stats()["entries"] == 4
        assert same(t.get(key_of(3))[0], latent(3))


def test_kill_9_mid_warm_serves_nothing_partial(tmp_path) -> None:
    d = run_and_kill(tmp_path, "random")
    files = {f for s in os.listdir(os.path.join(d, "entries")) for f in os.listdir(os.path.join(d, "entries", s))}
    with DiskTier(d, 1 << 30, "lz4") as t:
        assert os.listdir(os.path.join(d, "tmp")) == []
        s = t.stats()
        assert s["entries"] >= 3 + 11 and s["corrupt"] == 0
        assert len(files) == s["entries"]
        for e in t.list_entries():
            i = int.from_bytes(e.key[:4], "little")
            got = t.get(e.key)
            assert got is not None and same(got[0], latent(i, (4, 64, 64)) if i >= 3 else latent(i))


def test_reopen_after_unclean_close_is_cheap_when_nothing_is_wrong(tmp_path) -> None:
    d = str(tmp_path)
    t = DiskTier(d, 1 << 30, "none", durable=False)
    for i in range(10):
        t.put(key_of(i), latent(i), meta_of(i))
    t._index.close()  # as a kill -9 would: no clean flag
    t._release_lock()
    with DiskTier(d, 1 << 30, "none") as t2:
        counts = t2.reconcile()
        assert counts == {"files": 10, "rows": 10, "adopted": 0, "removed": 0, "dropped_rows": 0}


def test_a_deleted_index_is_rebuilt_from_the_files(tmp_path) -> None:
    d = str(tmp_path)
    with DiskTier(d, 1 << 30, "lz4", durable=False) as t:
        for i in range(5):
            t.put(key_of(i), latent(i), meta_of(i))
    for name in os.listdir(d):
        if name.startswith("index.sqlite"):
            os.unlink(os.path.join(d, name))
    with DiskTier(d, 1 << 30, "lz4") as t:
        assert t.stats()["entries"] == 5
        got, meta = t.get(key_of(4))
        assert same(got, latent(4)) and meta == meta_of(4)
        assert t.list_entries()[0].meta["encoder"] == "vae"


def test_bad_arguments_name_the_bad_value(tmp_path) -> None:
    with pytest.raises(ValueError, match="disk_bytes must be a positive int, got 0"):
        DiskTier(str(tmp_path), 0)
    with pytest.raises(ValueError, match="compression must be one of .* got 'zstd'"):
        DiskTier(str(tmp_path), 1 << 20, "zstd")
    with DiskTier(str(tmp_path), 1 << 20, "none") as t:
        with pytest.raises(ValueError, match="key must be 32 bytes"):
            t.put(b"short", latent(1), meta_of(1))
        with pytest.raises(ValueError, match="meta key 'cached.key' is reserved"):
            t.put(key_of(1), latent(1), {"cached.key": "x"})
        bad = {"latent": TensorBytes("float32", (3,), memoryview(b"12345678"))}
        with pytest.raises(ValueError, match="8 bytes do not hold float32"):
            t.put(key_of(1), bad, meta_of(1))
    with pytest.raises(ValueError, match="is closed"):
        t.get(key_of(1))


def test_many_hits_write_access_times_in_batches(tmp_path) -> None:
    with DiskTier(str(tmp_path), 1 << 30, "none", durable=False, touch_interval_s=3600) as t:
        t.put(key_of(1), latent(1), meta_of(1))
        calls = []
        real = t._index.touch
        t._index.touch = lambda atimes: (calls.append(len(atimes)), real(atimes))  # type: ignore[method-assign]
        for _ in range(2000):
            assert t.get(key_of(1)) is not None
        assert calls == []  # no index write per hit
        before = time.time()
        t.put(key_of(2), latent(2), meta_of(2))
        assert calls == [] and [e.key for e in t.list_entries()] == [key_of(1), key_of(2)]
        assert calls == [1] and t.list_entries()[0].atime < before
