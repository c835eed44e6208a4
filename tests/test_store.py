"""The shared-memory store on its own: allocation, the slot format, leases, eviction, sweeping."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from cached.store import ShmStore, TensorBytes
from cached.store.alloc import Allocator
from cached.store.names import segment_name, sweep_stale
from cached.store.slot import plan_slot, read_header, write_slot
from cached_client import CapacityError, LimitExceeded


@pytest.fixture
def shm_dir():
    d = tempfile.mkdtemp(prefix="cached-test-", dir="/dev/shm")
    yield d
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    os.rmdir(d)


def tensor(n: int, value: float = 1.0) -> dict[str, TensorBytes]:
    arr = np.full(n, value, dtype=np.float32)
    return {"latent": TensorBytes("float32", (n,), memoryview(arr))}


OWNER = 1  # a session id


def test_allocator_first_fit_and_coalescing():
    a = Allocator(16 * 4096)
    offs = [a.alloc(4096) for _ in range(4)]
    assert offs == [0, 4096, 8192, 12288]
    a.free(4096, 4096)
    a.free(8192, 4096)
    assert a.alloc(8192) == 4096  # the two freed neighbours merged
    a.free(0, 4096)
    a.free(4096, 8192)
    a.free(12288, 4096)
    assert a.used == 0 and a.largest_free == 16 * 4096
    with pytest.raises(ValueError, match="multiple of 4096"):
        Allocator(1000)


def test_slot_header_golden_bytes():
    """Pins the slot format: changing it must be a deliberate format version bump."""
    tensors = {"latent": TensorBytes("float32", (2, 2), memoryview(np.arange(4, dtype=np.float32)))}
    layout, layout_json, length = plan_slot(tensors)
    buf = bytearray(length)
    write_slot(memoryview(buf), bytes(range(32)), 7, layout, layout_json, tensors)
    assert layout_json == b'[["latent","float32",[2,2],128,16]]'
    assert length == 192
    assert bytes(buf[:56]) == (b"CACHEDS\x01" + bytes(range(32)) + (7).to_bytes(8, "little")
                               + len(layout_json).to_bytes(4, "little") + b"\0\0\0\0")
    assert bytes(buf[56:56 + len(layout_json)]) == layout_json
    assert bytes(buf[56 + len(layout_json):128]) == bytes(128 - 56 - len(layout_json))
    assert np.frombuffer(bytes(buf[128:144]), dtype=np.float32).tolist() == [0, 1, 2, 3]
    assert read_header(memoryview(buf)) == (bytes(range(32)), 7, layout_json)


def test_put_lookup_and_segment_permissions(shm_dir):
    store = ShmStore(shm_dir, 1 << 20, "0123456789ab")
    try:
        entry = store.put(b"k" * 32, tensor(1000, 2.5), {"encoder": "vae", "source": "/a"})
        assert store.lookup(b"k" * 32) is entry
        path = os.path.join(shm_dir, segment_name("0123456789ab", 0))
        assert oct(os.stat(path).st_mode & 0o777) == "0o640"
        data = np.frombuffer(store.arenas[0].map, np.float32, 1000, entry.offset + 128)
        assert data[0] == 2.5 and data[-1] == 2.5
        assert store.put(b"k" * 32, tensor(1000, 9.0), {}) is entry  # sealed: never rewritten
    finally:
        store.close()
    assert os.listdir(shm_dir) == []


def test_lru_eviction_skips_leased_entries(shm_dir):
    store = ShmStore(shm_dir, 4 * 8192, "0123456789ab")  # four 2-page entries
    try:
        entries = [store.put(bytes([i]) * 32, tensor(1500), {}) for i in range(4)]
        lease = store.lease(entries[0], OWNER)
        store.lookup(bytes([1]) * 32)  # touch: now 2 is the least recently used unleased entry
        store.put(b"\x09" * 32, tensor(1500), {})
        assert store.lookup(bytes([2]) * 32) is None
        assert store.lookup(bytes([0]) * 32) is entries[0]
        assert store.stats()["evictions"] == 1
        for i in (10, 11, 12):
            store.put(bytes([i]) * 32, tensor(1500), {})
        assert store.lookup(bytes([0]) * 32) is entries[0]  # held throughout
        store.release(OWNER, [lease])  # released: now the most recently used
        for i in (0x20, 0x21, 0x22):
            store.put(bytes([i]) * 32, tensor(1500), {})
        assert store.stats()["entries"] == 4  # 0 survived three evictions
        store.put(b"\x23" * 32, tensor(1500), {})
        assert store.lookup(bytes([0]) * 32) is None
    finally:
        store.close()


def test_capacity_error_names_the_fix(shm_dir):
    store = ShmStore(shm_dir, 8192, "0123456789ab")
    try:
        store.lease(store.put(b"a" * 32, tensor(1500), {}), OWNER)
        with pytest.raises(CapacityError, match="held by clients' leases"):
            store.put(b"b" * 32, tensor(1500), {})
        with pytest.raises(CapacityError, match="more than an arena holds"):
            store.put(b"c" * 32, tensor(10_000), {})
    finally:
        store.close()
    st = os.statvfs(shm_dir)
    with pytest.raises(CapacityError, match="shm-size"):
        ShmStore(shm_dir, st.f_blocks * st.f_frsize * 2, "0123456789ab")
    assert os.listdir(shm_dir) == []


def test_evicting_a_held_entry_frees_it_on_release(shm_dir):
    store = ShmStore(shm_dir, 1 << 20, "0123456789ab")
    try:
        e = store.put(b"a" * 32, tensor(100), {"encoder": "vae"})
        lid = store.lease(e, OWNER)
        assert store.evict(lambda entry: entry.meta["encoder"] == "vae") == (1, 0, 1)
        assert store.lookup(b"a" * 32) is None
        assert store.stats()["bytes"] == 4096
        store.release(OWNER, [lid])
        assert store.stats()["bytes"] == 0
    finally:
        store.close()


def test_release_owner_drops_that_owners_leases_only(shm_dir):
    store = ShmStore(shm_dir, 1 << 20, "0123456789ab")
    try:
        e = store.put(b"a" * 32, tensor(100), {})
        gone, staying = 1, 2
        store.lease(e, gone)
        store.lease(e, gone)
        store.lease(e, staying)
        assert store.release_owner(gone) == 2
        assert store.stats()["leases"] == 1
        assert store.owners() == {staying: (1, 4096)}
    finally:
        store.close()


def test_a_batch_of_leases_is_counted_per_lease_and_given_back_once(shm_dir):
    """acquire_many and release keep their bookkeeping per batch: the same key twice is two
    leases, an id sent twice (or another owner's) is given back once (or not at all)."""
    store = ShmStore(shm_dir, 1 << 20, "0123456789ab")
    try:
        a, b = (store.put(bytes([i]) * 32, tensor(100), {}) for i in range(2))
        got = store.acquire_many([a.key, b"z" * 32, a.key, b.key], OWNER)
        assert got[1] is None
        ids = [g[1] for g in got if g is not None]
        assert len(set(ids)) == 3 and store.owners() == {OWNER: (3, 3 * 4096)}
        assert store.release(2, ids) == 0  # not that owner's
        assert store.release(OWNER, [ids[0], ids[0], 999]) == 1
        assert a.leases == 1 and store.owners() == {OWNER: (2, 2 * 4096)}
        assert store.release(OWNER, ids) == 2
        assert store.owners() == {} and store.stats()["leases"] == 0
        assert store.evict(lambda entry: True)[0] == 2  # both idle again: evictable
    finally:
        store.close()


def test_one_owner_cannot_lease_past_its_cap(shm_dir):
    store = ShmStore(shm_dir, 1 << 20, "0123456789ab", owner_cap=3 * 4096)
    try:
        entries = [store.put(bytes([i]) * 32, tensor(100), {}) for i in range(4)]
        for e in entries[:3]:
            store.lease(e, 1)
        with pytest.raises(LimitExceeded, match="client_leased_bytes"):
            store.lease(entries[3], 1)
        assert store.lease(entries[3], 2) is not None  # another client is not starved
        store.release_owner(1)
        assert store.lease(entries[3], 1) is not None
    finally:
        store.close()


def test_sweep_removes_segments_of_dead_daemons_only(shm_dir):
    live = ShmStore(shm_dir, 8192, "aaaaaaaaaaaa")
    code = ("import os, sys; from cached.store import ShmStore; "
            "ShmStore(sys.argv[1], 8192, 'bbbbbbbbbbbb'); os._exit(0)")  # dies without cleaning up
    subprocess.run([sys.executable, "-c", code, shm_dir], check=True)
    assert any("bbbbbbbbbbbb" in n for n in os.listdir(shm_dir))
    removed = sweep_stale(shm_dir)
    assert sorted(removed) == ["cached-bbbbbbbbbbbb-0000", "cached-bbbbbbbbbbbb-ctl", "cached-bbbbbbbbbbbb.lock"]
    assert sorted(os.listdir(shm_dir)) == ["cached-aaaaaaaaaaaa-0000", "cached-aaaaaaaaaaaa-ctl",
                                           "cached-aaaaaaaaaaaa.lock"]
    live.close()


def test_handle_records_keep_keys_that_end_in_zero_bytes():
    from cached_client.wire import HANDLE

    records = np.zeros(1, dtype=HANDLE)
    key = b"\x07" * 30 + b"\x00\x00"
    records["key"][0] = key
    [(got, *_)] = np.frombuffer(records.tobytes(), dtype=HANDLE).tolist()
    assert got.ljust(32, b"\0") == key  # what the client does with every key it reads
