"""The disk tier under real faults: a full filesystem, a read-only one, a damaged index, file modes,
and a daemon whose disk is full.

Full and read-only filesystems are real: each scenario runs in a child process in a private mount
namespace (`unshare --mount --propagation private`, as root) that mounts a 16 MiB tmpfs on a temp
directory, so the mount vanishes with the child whatever happens. The child prints one JSON line of
observations for the test to assert on. Skipped where mounting is not allowed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys

import pytest
from test_disk import key_of, latent, meta_of, run_and_kill, same

from cached.encoders import WeightDigests
from cached.store.disk import DiskTier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


@functools.cache
def _why_no_private_mounts() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("unshare") is None:
        return "needs unshare(1)"
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'd=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs "$d" && umount "$d"; rc=$?; rmdir "$d"; exit $rc'],
        capture_output=True, text=True, timeout=30)
    return f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}" if probe.returncode else None


@pytest.fixture
def private_mount(tmp_path):
    """A directory on which a child (run_private) mounts its own tmpfs."""
    reason = _why_no_private_mounts()
    if reason:
        pytest.skip(reason)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return str(mnt)


# Shared by every child: imports, a log of WARNINGs, mounting, a ballast that takes every free byte,
# and how far the index and the files agree.
PRELUDE = r'''
import gc, json, logging, os, subprocess, sys, time
sys.path[:0] = [{root!r}, {tests!r}]
from test_disk import key_of, latent, meta_of, same
from cached.store.disk import DiskTier

WARNINGS = []
class Keep(logging.Handler):
    def emit(self, record):
        WARNINGS.append(record.getMessage())
logging.getLogger().addHandler(Keep(logging.WARNING))

def mount_tmpfs(path, size="16m"):
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs", path], check=True)

def remount_read_only(path):
    subprocess.run(["mount", "-o", "remount,ro", path], check=True)

def fill(path):
    """A file that takes every free byte of its filesystem."""
    with open(path, "ab", buffering=0) as f:
        for block in (1 << 20, 4096, 1):
            try:
                while True:
                    f.write(b"\xff" * block)
            except OSError:
                pass
    return os.statvfs(path).f_bavail

def agreement(tier):
    """Rows and entry files, files without a row, rows without a file, and files left in tmp/."""
    rows = tier._index.keys()
    files = {{bytes.fromhex(n[:64]) for _, _, names in os.walk(tier._entries_dir) for n in names}}
    return {{"rows": len(rows), "files": len(files), "untracked": len(files - rows),
             "missing": len(rows - files), "tmp": len(os.listdir(tier._tmp_dir))}}

def attempt(fn, *args):
    """None, or the name of what fn raised."""
    try:
        fn(*args)
    except Exception as exc:
        return type(exc).__name__
    return None

def big(i):
    return latent(i, (4, 64, 64))  # 64 KiB

def readable(tier, keys):
    got = [tier.get(k) for k in keys]
    return all(g is not None and same(g[0], big(int.from_bytes(k[:4], "little"))) for k, g in zip(keys, got))
'''


def run_private(script: str, *args: str, timeout: float = 180) -> dict:
    """Runs PRELUDE + script in a child in a private mount namespace; the JSON it printed last."""
    code = PRELUDE.format(root=ROOT, tests=TESTS) + script
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", code, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Disk full, with disk_bytes far above the filesystem: 1. the tier alone fills it; 2. a ballast takes
# the rest while the tier's files are mapped (evicting frees nothing); 3. a ballast takes every byte
# while the tier holds less than eviction would need; 4. the space comes back, then goes again before
# close; 5. a tier whose WAL has no room to grow (no index write fits) serves reads and closes.

DISK_FULL = r'''
import tempfile
from cached.engine.tiers import Tiers
from cached.store import ShmStore
from cached.store.names import new_instance_id

mnt = sys.argv[1]
mount_tmpfs(mnt)
d = os.path.join(mnt, "disk")
out = {}
tier = DiskTier(d, 1 << 30, "none", durable=False)  # disk_bytes far above the 16 MiB filesystem

# 1. 400 puts of 64 KiB (25 MiB) through a 16 MiB filesystem
errors = [attempt(tier.put, key_of(i), big(i), meta_of(i)) for i in range(400)]
out["fill"] = {"errors": sorted({e for e in errors if e}), "failed": sum(map(bool, errors)),
               "stats": tier.stats(), "agreement": agreement(tier),
               "newest_readable": readable(tier, [key_of(i) for i in range(390, 400)])}

# 2. a ballast takes the rest while every entry is mapped: evicting frees no space
views = [tier.get(k) for k in tier._index.keys()]
fill(os.path.join(mnt, "ballast1"))
before = tier.stats()["entries"]
errors = [attempt(tier.put, key_of(i), big(i), meta_of(i)) for i in range(1000, 1100)]
out["mapped"] = {"before": before, "errors": sorted({e for e in errors if e}), "failed": sum(map(bool, errors)),
                 "stats": tier.stats(), "agreement": agreement(tier)}
del views
gc.collect()
os.unlink(os.path.join(mnt, "ballast1"))

# 3. the tier keeps 5 entries, a ballast takes every free byte, 30 entries are sealed through Tiers
keep = [e.key for e in tier.list_entries()][-5:]
tier.evict(lambda e: e.key not in keep)
tier._futile_until = 0.0  # (what step 2 taught it expires after a minute; not waiting here)
free_after_ballast = fill(os.path.join(mnt, "ballast2"))
shm_dir = tempfile.mkdtemp(prefix="cached-test-", dir="/dev/shm")
store = ShmStore(shm_dir, 64 << 20, new_instance_id())
try:
    tiers = Tiers(store, tier)
    errors = [attempt(tiers.seal, key_of(i), big(i), meta_of(i)) for i in range(2000, 2030)]
    tiers.flush(60)
    out["ballast"] = {"free": free_after_ballast, "seal_errors": [e for e in errors if e],
                      "served_from_shm": sum(tiers.acquire(key_of(i), None) is not None for i in range(2000, 2030)),
                      "counters": tiers.counter_values(), "stats": tier.stats(), "agreement": agreement(tier),
                      "kept_readable": readable(tier, keep)}
    # 4. the ballast goes: the same tier writes again; then the disk fills up again and it closes
    os.unlink(os.path.join(mnt, "ballast2"))
    out["recovered_put"] = attempt(tier.put, key_of(2999), big(2999), meta_of(2999))
    keep.append(key_of(2999))
    fill(os.path.join(mnt, "ballast3"))
    out["close"] = attempt(tiers.close)
    out["close_again"] = attempt(tier.close)
finally:
    store.close()
    os.rmdir(shm_dir)
os.unlink(os.path.join(mnt, "ballast3"))
with DiskTier(d, 1 << 30, "none", durable=False) as again:
    out["reopened"] = {"entries": again.stats()["entries"], "kept_readable": readable(again, keep),
                       "put": attempt(again.put, key_of(3000), big(3000), meta_of(3000)),
                       "agreement": agreement(again)}
keep.append(key_of(3000))

# 5. a tier opened just before the disk filled up: its WAL holds one commit, so no index write fits
t = DiskTier(d, 1 << 30, "none", durable=False, touch_interval_s=0)
fill(os.path.join(mnt, "ballast4"))
out["warnings"] = len(WARNINGS)  # of steps 1-4: 130 failed writes
WARNINGS.clear()
out["index_full"] = {"kept_readable": readable(t, keep), "put": attempt(t.put, key_of(3001), big(3001), meta_of(3001)),
                     "agreement": agreement(t), "close": attempt(t.close), "stats": t.stats()}
out["index_full"]["warnings"] = list(WARNINGS)
os.unlink(os.path.join(mnt, "ballast4"))
with DiskTier(d, 1 << 30, "none", durable=False) as again:  # the lock was released; not marked clean
    out["after_index_full"] = {"entries": again.stats()["entries"], "kept_readable": readable(again, keep),
                               "agreement": agreement(again)}
print(json.dumps(out))
'''


def test_a_full_disk_is_counted_never_raised_and_never_empties_the_tier(private_mount) -> None:
    out = run_private(DISK_FULL, private_mount)
    one = 64 << 10
    fill = out["fill"]  # the tier alone: LRU within what the filesystem really has (the WAL included)
    assert set(fill["errors"]) <= {"CapacityError"}
    assert fill["agreement"] == {**fill["agreement"], "untracked": 0, "missing": 0, "tmp": 0}
    assert fill["agreement"]["rows"] == fill["stats"]["entries"] >= (8 << 20) // one
    assert fill["newest_readable"]

    mapped = out["mapped"]  # eviction that frees no space is not chased: at most one try's worth
    assert mapped["errors"] == ["CapacityError"] and mapped["failed"] == mapped["stats"]["write_errors"] - fill["failed"]
    assert mapped["stats"]["entries"] >= mapped["before"] - (5 << 20) // one - 1 > 0
    assert mapped["agreement"]["untracked"] == 0 and mapped["agreement"]["tmp"] == 0

    ballast = out["ballast"]  # the tier is smaller than what eviction would need: nothing evicted
    assert ballast["free"] < one
    assert ballast["seal_errors"] == []  # Tiers.seal never raises for the disk
    assert ballast["served_from_shm"] == 30
    assert ballast["counters"]["disk_write_errors"] == 30
    assert ballast["stats"]["entries"] == 5 and ballast["kept_readable"]
    assert ballast["agreement"] == {"rows": 5, "files": 5, "untracked": 0, "missing": 0, "tmp": 0}

    assert out["recovered_put"] is None  # the index still takes writes once there is room again
    assert out["close"] is None and out["close_again"] is None  # close on a full disk does not raise
    reopened = out["reopened"]
    assert reopened["entries"] == 6 and reopened["kept_readable"] and reopened["put"] is None
    assert reopened["agreement"] == {"rows": 7, "files": 7, "untracked": 0, "missing": 0, "tmp": 0}

    full = out["index_full"]  # reads work while no write fits, and close neither raises nor skips a step
    assert full["kept_readable"] and full["put"] == "CapacityError" and full["close"] is None
    assert full["stats"]["write_errors"] >= 2 and full["stats"]["hits"] == 7
    assert full["agreement"] == {"rows": 7, "files": 7, "untracked": 0, "missing": 0, "tmp": 0}
    assert [w for w in full["warnings"] if "closed, but" in w] != []
    assert out["after_index_full"]["entries"] == 7 and out["after_index_full"]["kept_readable"]
    assert out["after_index_full"]["agreement"]["untracked"] == 0
    assert out["warnings"] <= 10  # a failing disk is logged at most once a minute, not once per write


# Read-only: a tier closed cleanly, one closed as kill -9 leaves it, one with a damaged index, and a
# directory that does not exist, all on a tmpfs remounted read-only.

READ_ONLY = r'''
from cached.engine.tiers import Tiers
from cached.store import ShmStore
from cached.store.names import new_instance_id
import tempfile

mnt = sys.argv[1]
mount_tmpfs(mnt)
keys = [key_of(i) for i in range(6)]
for name in ("clean", "unclean", "damaged"):
    t = DiskTier(os.path.join(mnt, name), 1 << 30, "lz4", durable=False)
    for k in keys:
        t.put(k, big(int.from_bytes(k[:4], "little")), meta_of(0))
    if name == "unclean":  # as a kill -9 leaves it: no clean-close mark
        t._index.close()
        t._release_lock()
    else:
        t.close()
with open(os.path.join(mnt, "damaged", "index.sqlite"), "r+b") as f:
    f.write(os.urandom(4096))
remount_read_only(mnt)

out = {}
for name in ("clean", "unclean", "damaged", "missing"):
    d = os.path.join(mnt, name)
    WARNINGS.clear()
    strict = attempt(DiskTier, d, 1 << 30, "lz4")
    t = DiskTier.open_or_degrade(d, 1 << 30, "lz4")
    r = {"strict": strict, "mode": t.mode, "reason": t.reason, "entries": t.stats()["entries"],
         "readable": readable(t, keys) if name != "missing" else all(t.get(k) is None for k in keys),
         "put": attempt(t.put, key_of(100), big(100), meta_of(100)), "evict_all": list(t.evict_all())}
    shm_dir = tempfile.mkdtemp(prefix="cached-test-", dir="/dev/shm")
    store = ShmStore(shm_dir, 16 << 20, new_instance_id())
    try:
        tiers = Tiers(store, t)
        r["seal"] = attempt(tiers.seal, key_of(101), big(101), meta_of(101))
        tiers.flush(30)
        r["promoted"] = tiers.promote(keys[0], None) is not None
        r["counters"] = tiers.counter_values()
        r["close"] = attempt(tiers.close)
    finally:
        store.close()
        os.rmdir(shm_dir)
    r["stats"] = t.stats()
    r["warnings"] = list(WARNINGS)
    out[name] = r
print(json.dumps(out))
'''


def test_a_read_only_disk_dir_opens_degraded_serves_reads_and_counts_writes(private_mount) -> None:
    out = run_private(READ_ONLY, private_mount)
    for name in ("clean", "unclean", "damaged"):
        r = out[name]
        assert r["strict"] is not None  # DiskTier itself refuses; open_or_degrade degrades
        assert r["mode"] == "read-only" and "Read-only file system" in r["reason"], r
        assert r["entries"] == 6 and r["readable"] and r["promoted"], r
        assert r["put"] == "CapacityError" and r["seal"] is None and r["close"] is None
        assert r["evict_all"] == [0, 0]  # nothing can be removed, so nothing is reported removed
        assert r["counters"]["disk_write_errors"] == 1 and r["counters"]["disk_read_only"] == 1
        assert r["stats"]["write_errors"] >= 2 and r["stats"]["off"] == 0
        assert any("read-only" in w and "Read-only file system" in w for w in r["warnings"]), r["warnings"]
    assert any("damaged" in w for w in out["damaged"]["warnings"])
    off = out["missing"]  # can't be created nor read: off, with the reason
    assert off["mode"] == "off" and off["readable"] and off["entries"] == 0 and off["put"] == "CapacityError"
    assert off["counters"]["disk_off"] == 1 and off["close"] is None and not off["promoted"]
    assert any(" is off " in w and "Read-only file system" in w for w in off["warnings"]), off["warnings"]


# A damaged index: moved aside, rebuilt from the verified files, one WARNING.

def _garbage(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def _half(path: str) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _other_schema(path: str) -> None:
    os.unlink(path)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE entries (name TEXT, value BLOB)")
    db.commit()
    db.close()


def _newer_version(path: str) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()


@pytest.mark.parametrize("damage", [_garbage, _half, _other_schema, _newer_version],
                         ids=["garbage", "truncated", "other-schema", "newer-version"])
def test_a_damaged_index_is_moved_aside_and_rebuilt_from_the_files(tmp_path, caplog, damage) -> None:
    d = str(tmp_path / "disk")
    with DiskTier(d, 1 << 30, "lz4", durable=False) as t:
        for i in range(200):
            t.put(key_of(i), latent(i), meta_of(i))
    damage(os.path.join(d, "index.sqlite"))
    with caplog.at_level(logging.WARNING, logger="cached.store"):
        with DiskTier(d, 1 << 30, "lz4") as t:
            assert t.stats()["entries"] == 200 and t.stats()["corrupt"] == 0
            for i in range(200):
                got, meta = t.get(key_of(i))
                assert same(got, latent(i)) and meta == meta_of(i)
    damaged = [r for r in caplog.records if "index is damaged" in r.getMessage()]
    assert len(damaged) == 1 and damaged[0].levelno == logging.WARNING
    assert [n for n in os.listdir(d) if n.startswith("index.sqlite.damaged-")] != []
    with DiskTier(d, 1 << 30, "lz4") as t:  # the rebuilt index is the index from now on
        assert t.stats()["entries"] == 200


def test_a_damaged_index_left_by_kill_9_moves_aside_with_its_wal(tmp_path) -> None:
    with DiskTier(str(tmp_path / "disk"), 1 << 30, "lz4", durable=False) as t:
        for i in range(100, 105):
            t.put(key_of(i), latent(i), meta_of(i))
    d = run_and_kill(tmp_path, "before-commit")  # 3 more entries committed to the WAL, a 4th renamed into place
    assert os.path.getsize(os.path.join(d, "index.sqlite-wal")) > 0
    _garbage(os.path.join(d, "index.sqlite"))
    with DiskTier(d, 1 << 30, "lz4") as t:
        assert t.stats()["entries"] == 9
        assert all(same(t.get(key_of(i))[0], latent(i)) for i in [0, 1, 2, 3, 100, 101, 102, 103, 104])
    aside = {n.rsplit("-", 1)[-1] for n in os.listdir(d) if n.startswith("index.sqlite.damaged-")}
    assert {"wal", "shm"} <= aside and len(aside) == 3  # the database, its WAL and its -shm


# File modes: 0640 or stricter whatever the umask.

def _modes(directory: str) -> dict[str, int]:
    out = {}
    for root, dirs, names in os.walk(directory):
        for n in dirs + names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, directory)] = os.stat(p).st_mode
    return out


def test_every_file_of_the_tier_and_the_digest_memo_is_0640_whatever_the_umask(tmp_path, tiny_vae) -> None:
    old = os.umask(0)
    try:
        d = str(tmp_path / "disk")
        with DiskTier(d, 1 << 30, "lz4") as t:
            for i in range(3):
                t.put(key_of(i), latent(i), meta_of(i))
            assert t.get(key_of(1)) is not None
            modes = _modes(d)  # while open: -wal and -shm exist
        memo = os.path.join(d, "weight-digests.json")
        WeightDigests(memo).file(os.path.join(tiny_vae, "config.json"))
        modes["weight-digests.json"] = os.stat(memo).st_mode
    finally:
        os.umask(old)
    assert {"lock", "index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "weight-digests.json"} <= modes.keys()
    files = {p: oct(m & 0o777) for p, m in modes.items() if not os.path.isdir(os.path.join(d, p))}
    assert sum(p.endswith(".safetensors") for p in files) == 3
    assert {p: m for p, m in files.items() if int(m, 8) & 0o137} == {}  # 0640 or stricter
    dirs = {p: oct(m & 0o777) for p, m in modes.items() if os.path.isdir(os.path.join(d, p))}
    assert {p: m for p, m in dirs.items() if int(m, 8) & 0o027} == {}  # 0750 or stricter


# A real daemon on a full disk: starts, serves from shared memory, stops cleanly.

DAEMON_FULL = r'''
from cached_testing.harness import Daemon
from cached_client import ImageSpec

mnt, workdir, vae = sys.argv[1:4]
images = sys.argv[4:]
mount_tmpfs(mnt)
os.makedirs(os.path.join(mnt, "disk"))
fill(os.path.join(mnt, "ballast"))
d = Daemon(workdir, {"store": {"shm_bytes": "64MiB", "disk_dir": os.path.join(mnt, "disk")},
                     "encoders": {"vae": {"kind": "diffusers-vae", "path": vae, "max_queue_delay_ms": 20}}})
out = {}
try:
    d.start(timeout=120)
    client = d.client()
    specs = [ImageSpec(p, (64, 64)) for p in images]
    first = [e["latent"].numpy().tobytes() for e in client.get(specs, encoder="vae")]
    again = [e["latent"].numpy().tobytes() for e in client.get(specs, encoder="vae", compute=False)]
    del client
    t0 = time.monotonic()
    stats = d.client().stats()
    out["stats_s"] = time.monotonic() - t0
    out["same"] = first == again
    out["stats"] = {k: v for k, v in stats.items() if k.startswith("disk_") or k == "tiers"}
    out["rc"] = d.stop()
    out["segments"] = d.segments()
    out["log"] = d.log()[-4000:]
finally:
    d.cleanup()
print(json.dumps(out))
'''


def test_a_daemon_on_a_full_disk_starts_serves_and_stops_cleanly(private_mount, tmp_path, tiny_vae, images) -> None:
    workdir = tmp_path / "daemon"
    workdir.mkdir()
    out = run_private(DAEMON_FULL, private_mount, str(workdir), tiny_vae, *images[:4], timeout=300)
    assert out["same"], out["log"]
    assert out["stats_s"] < 1.0  # still answers Stats within a second after the faults
    assert out["stats"]["disk_read_only"] == 1 and out["stats"]["tiers"]["shm"]["entries"] == 4
    assert out["rc"] == 0, out["log"]
    assert out["segments"] == []
    assert "Traceback" not in out["log"]
    assert "disk tier" in out["log"] and "read-only" in out["log"]
