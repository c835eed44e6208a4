"""Cluster warm (issue 12's benchmark): a second node's cold start from the object store, and s3://
sources against the same files on local disk.

An S3 server runs on loopback (SeaweedFS's `weed mini`, as in tests/test_cluster.py). A first node
encodes N images and uploads them to the bucket. Then, each on a fresh daemon (nothing in shared
memory or on its disk):
1. cold start of a second node: `warm --from-remote` (entries fetched from the bucket, verified,
   promoted into shared memory) against encoding the same N images again on a node without the bucket;
2. sources: the same encode of N images read from `s3://` against the files on local disk.
Methods run interleaved round after round (the order alternates) and the tables show each one's
median, so drift on a shared machine touches all alike. Writes <out>/cluster.md.

The encoder is the one-block tiny VAE of corpus.py: a latent the size of a real one (4 x 64 x 128
fp32, 128 KiB) for ~20 ms of CPU. A real VAE costs far more per image, so "encode again" here is the
cheapest it can be. A loopback store shows the request and verification costs, not a network's
latency or bandwidth: over a real network each GET adds its round trip (the tier fetches misses in
parallel, so throughput, not latency, bounds a warm of many items).

    .venv/bin/python bench/cluster.py [--images 256] [--rounds 3] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # cached_testing: tiny models, the daemon and S3 harnesses

from common import RESULTS, machine, median, table, write_result  # noqa: E402
from corpus import _ONE_BLOCK, IMAGE  # noqa: E402

from cached_client import CacheClient, ImageSpec  # noqa: E402
from cached_testing.fixtures import build_tiny_vae, settle, write_images  # noqa: E402
from cached_testing.harness import Daemon  # noqa: E402
from cached_testing.s3 import CREDENTIALS, OTHER_AWS, SeaweedServer  # noqa: E402

METHODS = ("from the object store (--from-remote)", "encode again (local files)", "encode again (s3:// sources)")


class Bench:
    """The store, the encoder, the images (local and in the bucket) and fresh daemons on demand."""

    def __init__(self, work: str, n: int) -> None:
        self.work = work
        self.store = SeaweedServer(os.path.join(work, "weed")).start()
        self.vae = build_tiny_vae(os.path.join(work, "vae"), **_ONE_BLOCK)
        paths = write_images(os.path.join(work, "images"), n, [IMAGE])
        settle(*paths)
        for p in paths:
            with open(p, "rb") as f:
                self.store.put_raw(f"src/{os.path.basename(p)}", f.read())
        self.local = [ImageSpec(p, IMAGE) for p in paths]
        self.remote = [ImageSpec(f"s3://{self.store.bucket}/src/{os.path.basename(p)}", IMAGE) for p in paths]
        self.daemons: list[Daemon] = []
        self.entry_bytes = 0

    def node(self, remote: bool) -> CacheClient:
        """A fresh daemon; with the bucket's cache prefix as its remote tier when `remote`."""
        store: dict[str, Any] = {"shm_bytes": max(64 << 20, 4 * len(self.local) * (IMAGE[0] * IMAGE[1] * 16 + 4096)),
                                 "allowed_roots": [os.path.join(self.work, "images"), f"s3://{self.store.bucket}/src"]}
        if remote:
            store |= {"remote": f"s3://{self.store.bucket}/cache", "remote_endpoint": self.store.url,
                      "remote_region": CREDENTIALS["AWS_REGION"]}
        else:
            store["sources_endpoint"] = self.store.url
        os.makedirs(os.path.join(self.work, "nodes"), exist_ok=True)
        d = Daemon(tempfile.mkdtemp(dir=os.path.join(self.work, "nodes")), {
            "store": store, "limits": {"client_leased_bytes": "100%"},
            "encoders": {"vae": {"kind": "diffusers-vae", "path": self.vae, "max_queue_delay_ms": 10}}})
        self.daemons.append(d)
        d.start()
        return d.client(timeout=600)

    def done(self) -> None:
        """Stops the daemons started so far and removes their shared memory."""
        for d in self.daemons:
            try:
                d.stop()
            finally:
                d.cleanup()
        self.daemons = []

    def seed(self) -> float:
        """The first node: encodes every image and uploads it; seconds until the bucket has them all."""
        client = self.node(remote=True)
        t0 = time.perf_counter()
        _check(client.warm(self.local, encoder="vae"), len(self.local), computed=True)
        deadline = time.monotonic() + 300
        while True:
            s = client.stats()
            if s["remote_upload_queue_depth"] == 0 and s["remote_uploads"] + s["remote_uploads_raced"] >= len(self.local):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"uploads not done within 300 s: {s}")
            time.sleep(0.05)
        self.entry_bytes = s["remote_bytes_out"] // max(1, s["remote_uploads"])
        self.done()
        return time.perf_counter() - t0

    def measure(self, method: str) -> float:
        """items/s of `method` on a fresh node."""
        client = self.node(remote=method == METHODS[0])
        specs = self.remote if method == METHODS[2] else self.local
        t0 = time.perf_counter()
        result = client.warm(specs, encoder="vae", compute=method != METHODS[0])
        took = time.perf_counter() - t0
        _check(result, len(specs), computed=method != METHODS[0])
        if method == METHODS[0] and client.stats()["computed"]:
            raise RuntimeError("the node encoded while promoting from the object store")
        self.done()
        return len(specs) / took


def _check(result: Any, n: int, computed: bool) -> None:
    if result.failed or (result.computed if computed else result.cached) != n:
        raise RuntimeError(f"expected {n} {'computed' if computed else 'promoted'}: {result.total} total, "
                           f"{result.computed} computed, {result.cached} cached, failed {result.failed[:3]}")


def run(bench: Bench, rounds: int, log: Callable[[str], None]) -> dict[str, list[float]]:
    per: dict[str, list[float]] = {m: [] for m in METHODS}
    for r in range(rounds):
        for m in METHODS if r % 2 == 0 else METHODS[::-1]:
            per[m].append(bench.measure(m))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{m} {per[m][-1]:,.0f}/s" for m in METHODS))
    return per


def report(per: dict[str, list[float]], n: int, rounds: int, seed_s: float, entry_bytes: int, command: str) -> str:
    info = machine()
    fetch, encode, s3 = (median(per[m]) for m in METHODS)
    cold = [[m, f"{median(per[m]):,.0f}", f"{n / median(per[m]):.2f}", f"{min(per[m]):,.0f} - {max(per[m]):,.0f}"]
            for m in METHODS[:2]]
    sources = [[m.removeprefix("encode again ").strip("()"), f"{median(per[m]):,.0f}",
                f"{min(per[m]):,.0f} - {max(per[m]):,.0f}"] for m in METHODS[1:]]
    return "\n\n".join([
        "# Cluster warm: a second node's cold start, and s3:// sources",
        f"`{command}` on {info['cpu']}, {info['ram']} RAM, no GPU (the tiny VAE encodes on CPU), kernel "
        f"{info['kernel']}, load average {info['load average (1 min) at start']} at start. Object store: "
        f"SeaweedFS `weed mini` on loopback (same 2 cores). {n} images of {IMAGE[0]}x{IMAGE[1]} px; each entry "
        f"{entry_bytes / 1024:.0f} KiB in the bucket (4 x 64 x 128 fp32, lz4). The first node encoded and "
        f"uploaded them in {seed_s:.1f} s. Each number is a fresh daemon; median of {rounds} round(s).",
        "## Cold start of a second node: serve N warmed items",
        table(["method", "items/s", f"s for {n}", "range items/s"], cold),
        f"From the store: {fetch / encode:.1f}x the items/s of encoding again with this tiny VAE on CPU; a real "
        "VAE's encode costs far more, a fetch costs the same. Both exclude the daemon's start, the same for each.",
        "## Sources: encode N images read from s3:// vs local disk",
        table(["source", "items/s", "range items/s"], sources),
        f"s3:// sources: {s3 / encode:.2f}x local files (one HEAD and one ranged GET per image on loopback, "
        "then the same decode and encode).",
        "A loopback store shows request and verification costs only: over a network, each GET adds a round "
        "trip and the bandwidth bounds bytes/s, so measure on the real store before sizing a cluster.",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="32 images, one round: a smoke run")
    ap.add_argument("--out", help="results directory (default: bench/results)")
    args = ap.parse_args(argv)
    n, rounds = (32, 1) if args.quick else (args.images, args.rounds)
    os.environ.update(CREDENTIALS)  # the daemons inherit the store's credentials
    for k in OTHER_AWS:
        os.environ.pop(k, None)
    work = tempfile.mkdtemp(prefix="cached-bench-cluster-")
    bench = None
    try:
        bench = Bench(work, n)
        print(f"== seeding the bucket with {n} entries", flush=True)
        seed_s = bench.seed()
        print(f"== {rounds} round(s) of {', '.join(METHODS)}", flush=True)
        per = run(bench, rounds, lambda line: print(line, flush=True))
    finally:
        if bench is not None:
            bench.done()
            bench.store.stop()
        shutil.rmtree(work, ignore_errors=True)
    command = ".venv/bin/python bench/cluster.py" + (" --quick" if args.quick else f" --images {n} --rounds {rounds}")
    text = report(per, n, rounds, seed_s, bench.entry_bytes, command)
    print(text)
    print("wrote", write_result(args.out or RESULTS, "cluster.md", text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
