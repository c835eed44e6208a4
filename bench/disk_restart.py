"""Disk tier restart: how long until a tier of N entries serves its first verified hit again.

Fills a DiskTier with N small latents (4 x 16 x 16 fp32, a 128 px image; compression "lz4"), then
measures, median of a few trials:
- clean restart: close(), then a new DiskTier on the directory and one get (checksum verified);
- unclean restart: a child process opens the tier, writes, and is killed with SIGKILL; the next open
  finds no clean-close mark and runs reconcile (one names-only listing of the shard directories);
- the same with the index file dropped from the page cache first (posix_fadvise DONTNEED);
- then hit latency on random keys and write-through cost (durable: fsync of file and directory).

    python bench/disk_restart.py [--entries 100000]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import RESULTS, machine, percentile, table, write_result  # noqa: E402

from cached.store.disk import DiskTier  # noqa: E402
from cached.store.slot import TensorBytes  # noqa: E402

SHAPE = (4, 16, 16)
TARGET_S = 2.0


def key_of(i: int) -> bytes:
    return i.to_bytes(8, "little") * 4


def entry(i: int) -> tuple[dict[str, TensorBytes], dict[str, str]]:
    rng = np.random.default_rng(i)
    arr = rng.standard_normal(SHAPE).astype(np.float32)
    source = f"/data/set{i % 16}/img_{i:06d}.png"
    meta = {"encoder": "vae", "source": source, "spec": f'["i","{source}",128,128,"center",false]'}
    return {"latent": TensorBytes("float32", SHAPE, arr.reshape(-1).view(np.uint8).data)}, meta


def fill(directory: str, n: int) -> float:
    t0 = time.perf_counter()
    with DiskTier(directory, 1 << 40, "lz4", durable=False) as tier:
        for i in range(n):
            tier.put(key_of(i), *entry(i))
            if i and i % 20000 == 0:
                print(f"  {i} entries, {time.perf_counter() - t0:.0f} s", flush=True)
    return time.perf_counter() - t0


def first_hit_s(directory: str, n: int) -> tuple[float, float, int]:
    """(open s, open + first verified get s, entries)."""
    t0 = time.perf_counter()
    tier = DiskTier(directory, 1 << 40, "lz4")
    t1 = time.perf_counter()
    got = tier.get(key_of(random.randrange(n)))
    t2 = time.perf_counter()
    assert got is not None
    entries = tier.stats()["entries"]
    tier.close()
    return t1 - t0, t2 - t0, entries


CHILD = """
import os, signal, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
from disk_restart import DiskTier, entry, key_of
tier = DiskTier(sys.argv[1], 1 << 40, "lz4")
for i in range({n}, {n} + 10):
    tier.put(key_of(i), *entry(i))
os.kill(os.getpid(), signal.SIGKILL)
"""


def crash(directory: str, n: int) -> None:
    """A daemon that writes 10 more entries and is killed with SIGKILL (no clean close)."""
    code = CHILD.format(root=ROOT, bench=os.path.join(ROOT, "bench"), n=n)
    rc = subprocess.run([sys.executable, "-c", code, directory]).returncode
    assert rc == -signal.SIGKILL, rc


def drop_index_cache(directory: str) -> None:
    for name in os.listdir(directory):
        if name.startswith("index.sqlite"):
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def restarts(directory: str, n: int, trials: int) -> list[list[object]]:
    rows = []
    cases = {"clean": lambda: None, "clean, index not in page cache": lambda: drop_index_cache(directory),
             "after kill -9 (reconcile)": lambda: crash(directory, n)}
    for case, before in cases.items():
        opens, firsts = [], []
        for _ in range(trials):
            before()
            o, f, entries = first_hit_s(directory, n)
            opens.append(o)
            firsts.append(f)
        med = statistics.median(firsts)
        rows.append([case, entries, f"{statistics.median(opens) * 1e3:.0f}", f"{med * 1e3:.0f}",
                     f"{max(firsts) * 1e3:.0f}", "yes" if max(firsts) < TARGET_S else "NO"])
    return rows


def hits_and_writes(directory: str, n: int) -> list[list[object]]:
    rows = []
    with DiskTier(directory, 1 << 40, "lz4") as tier:
        keys = [key_of(random.randrange(n)) for _ in range(5000)]
        lat = []
        for k in keys:
            t0 = time.perf_counter_ns()
            assert tier.get(k) is not None
            lat.append((time.perf_counter_ns() - t0) / 1e3)
        rows.append(["get (hit, random key, page cache warm)", f"{statistics.median(lat):.0f}",
                     f"{percentile(lat, 99):.0f}"])
        for durable in (False, True):
            tier.durable = durable
            lat = []
            for i in range(n + 100, n + 600):
                t0 = time.perf_counter_ns()
                tier.put(key_of(i), *entry(i))
                lat.append((time.perf_counter_ns() - t0) / 1e3)
            rows.append([f"put ({'fsync file + directory' if durable else 'no fsync'})",
                         f"{statistics.median(lat):.0f}", f"{percentile(lat, 99):.0f}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to build the tier (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        directory = os.path.join(workdir, "disk")
        print(f"filling {args.entries} entries ...", flush=True)
        fill_s = fill(directory, args.entries)
        restart_rows = restarts(directory, args.entries, args.trials)
        latency_rows = hits_and_writes(directory, args.entries)
        du = sum(e.stat().st_size for s in os.scandir(os.path.join(directory, "entries")) for e in os.scandir(s.path))
        index = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.startswith("index"))
    info = machine()
    text = "\n\n".join([
        "# Disk tier restart",
        f"`python bench/disk_restart.py --entries {args.entries}` on {info['cpu']}, {info['ram']} RAM, kernel "
        f"{info['kernel']}, load average {info.get('load average (1 min) at start', '?')}. Filesystem of "
        f"{workdir}. {args.entries} entries of {SHAPE} fp32 ({du / args.entries / 1024:.1f} KiB each on disk, "
        f"index {index / 2**20:.1f} MiB), filled in {fill_s:.0f} s without fsync. Median of {args.trials} trials.",
        f"## Restart to first verified hit (target < {TARGET_S:.0f} s)",
        table(["restart", "entries", "open ms", "open + first get ms", "worst ms", f"< {TARGET_S:.0f} s"],
              restart_rows),
        "## Hit and write-through latency (us)",
        table(["operation", "p50 us", "p99 us"], latency_rows),
    ])
    print(text)
    print("wrote", write_result(RESULTS, "disk_restart.md", text))


if __name__ == "__main__":
    main()
