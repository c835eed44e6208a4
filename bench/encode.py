"""Encoding through the daemon against the same encoder called in-process (issue 3's benchmark).

1. Encode throughput: 1, 4 and 8 concurrent client processes, each asking for distinct misses in
   small batches, against the encoder called in-process with full batches of the same tensors.
2. `cachectl warm` of N images against an in-process loop that decodes and encodes them the same way.

Each daemon measurement uses a fresh daemon, so every item is a miss. The methods run interleaved,
round after round, and the table shows each method's median over the rounds, so drift on a shared
machine touches all of them alike. Writes results/encode.md.

    python bench/encode.py [--images 400] [--rounds 3] [--size 128] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # cached_testing: tiny models, the daemon harness

from common import RESULTS, machine, table, write_result  # noqa: E402

from cached_testing.fixtures import build_tiny_vae, write_images  # noqa: E402
from cached_testing.harness import Daemon  # noqa: E402

MAX_BATCH = 16


def _in_process(vae_dir: str, paths: list[str], size: int, decode: bool) -> float:
    """items/s of the encoder called in-process with full batches (decoding included if asked)."""
    import numpy as np
    import torch

    from cached.encoders import build_encoder
    from cached.images import open_image, prepare_image
    from cached_client import ImageSpec

    enc = build_encoder("vae", {"kind": "diffusers-vae", "path": vae_dir})

    def load(p: str) -> np.ndarray:
        with open(p, "rb") as f:
            return prepare_image(open_image(f.read(), p), ImageSpec(p, (size, size)), 0)

    tensors = None if decode else [load(p) for p in paths]
    enc.encode(torch.from_numpy(np.stack([load(paths[0])])), [0])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(paths), MAX_BATCH):
        chunk = [load(p) for p in paths[i:i + MAX_BATCH]] if decode else tensors[i:i + MAX_BATCH]
        enc.encode(torch.from_numpy(np.stack(chunk)), [0] * len(chunk))
    return len(paths) / (time.perf_counter() - start)


def _client(address: str, paths: list[str], size: int, batch: int, ready, go, done) -> None:
    from cached_client import CacheClient, ImageSpec

    client = CacheClient(address)
    client.stats()  # imported and connected before the clock starts
    ready.put(os.getpid())
    go.wait()
    for i in range(0, len(paths), batch):
        client.get([ImageSpec(p, (size, size)) for p in paths[i:i + batch]], encoder="vae")
    done.put(time.perf_counter())


def _daemon(work: str, vae_dir: str) -> Daemon:
    return Daemon(tempfile.mkdtemp(dir=work), {
        "store": {"shm_bytes": "512MiB"},
        "encoders": {"vae": {"kind": "diffusers-vae", "path": vae_dir, "max_batch": MAX_BATCH,
                             "max_queue_delay_ms": 10}}}).start()


def _through_daemon(work: str, vae_dir: str, paths: list[str], size: int, clients: int) -> tuple[float, float]:
    """(items/s, mean batch size) with `clients` processes splitting `paths` between them."""
    daemon = _daemon(work, vae_dir)
    try:
        ctx = mp.get_context("spawn")
        ready, go, done = ctx.Queue(), ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_client, args=(daemon.address, paths[k::clients], size, 4, ready, go, done))
                 for k in range(clients)]
        for p in procs:
            p.start()
        for _ in procs:
            ready.get()
        start = time.perf_counter()
        go.set()
        end = max(done.get() for _ in procs)
        for p in procs:
            p.join()
        rate = len(paths) / (end - start)
        enc = daemon.client().stats()["encoders"]["vae"]
        return rate, enc["items"] / max(1, enc["batches"])
    finally:
        daemon.stop()
        daemon.cleanup()


def _warm(work: str, vae_dir: str, image_dir: str, n: int, size: int) -> float:
    daemon = _daemon(work, vae_dir)
    try:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cached_client.cachectl", "--address", daemon.address, "warm",
                        "--encoder", "vae", "--size", f"{size}x{size}", image_dir],
                       check=True, capture_output=True)
        return n / (time.perf_counter() - start)
    finally:
        daemon.stop()
        daemon.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args()
    n, rounds = (64, 1) if args.quick else (args.images, args.rounds)
    runs: dict[str, list[float]] = {}
    batches: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="cached-bench-encode-") as work:
        vae = build_tiny_vae(os.path.join(work, "vae"))
        image_dir = os.path.join(work, "images")
        paths = write_images(image_dir, n, [(args.size, args.size)])
        _in_process(vae, paths[:MAX_BATCH], args.size, decode=False)  # warm-up, not timed
        for _ in range(rounds):
            runs.setdefault("full", []).append(_in_process(vae, paths, args.size, decode=False))
            for clients in (1, 4, 8):
                rate, mean_batch = _through_daemon(work, vae, paths, args.size, clients)
                runs.setdefault(f"daemon{clients}", []).append(rate)
                batches.setdefault(clients, []).append(mean_batch)
            runs.setdefault("loop", []).append(_in_process(vae, paths, args.size, decode=True))
            runs.setdefault("warm", []).append(_warm(work, vae, image_dir, n, args.size))
    med = {k: statistics.median(v) for k, v in runs.items()}
    full, loop = med["full"], med["loop"]
    rows = [[f"in-process, full batches of {MAX_BATCH} (encode only)", f"{full:.1f}", str(MAX_BATCH), "1.00",
             f"{full / loop:.2f}"]]
    for clients in (1, 4, 8):
        rate = med[f"daemon{clients}"]
        rows.append([f"daemon, {clients} client process(es), batches of 4", f"{rate:.1f}",
                     f"{statistics.median(batches[clients]):.1f}", f"{rate / full:.2f}", f"{rate / loop:.2f}"])
    rows += [[f"in-process decode + encode loop, {n} images", f"{loop:.1f}", str(MAX_BATCH), f"{loop / full:.2f}",
              "1.00"],
             [f"cachectl warm, {n} images", f"{med['warm']:.1f}", "", f"{med['warm'] / full:.2f}",
              f"{med['warm'] / loop:.2f}"]]
    info = machine()
    text = "\n".join([
        f"# Encoding through the daemon ({n} images, {args.size}x{args.size}, tiny VAE on CPU, "
        f"median of {rounds} interleaved rounds)", "",
        f"Machine: {info['cpu']}, {info['ram']}, torch {info['torch']}; no GPU.", "",
        "Target (DESIGN.md): daemon >= 0.9 x in-process full batches; warm >= 0.9 x in-process loop.", "",
        table(["method", "items/s", "mean batch", "vs encode only", "vs decode + encode"], rows), "",
        "On a CPU-only machine the daemon's image decoding shares the cores with its encoder, so the fair "
        "in-process reference is the decode + encode loop; on a GPU, decoding overlaps encoding.", "",
        f"Command: `python bench/encode.py --images {args.images} --rounds {args.rounds} --size {args.size}`"])
    print(text)
    write_result(args.out, "encode.md", text)


if __name__ == "__main__":
    main()
