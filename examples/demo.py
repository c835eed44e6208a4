"""`make demo`: the main job end to end on an embedded default.

Builds a tiny local VAE and sample images, starts the daemon on a private socket, warms the cache
with cachectl, reads the latents from a 4-worker DataLoader, prints what happened, stops the daemon
and checks that it left nothing in shared memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import psutil
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from cached_client import CacheClient, ImageSpec  # noqa: E402
from cached_client.torch import CachedDataset  # noqa: E402
from cached_client.units import format_bytes  # noqa: E402
from cached_testing.fixtures import build_tiny_vae, write_images  # noqa: E402
from cached_testing.harness import Daemon  # noqa: E402

# this machine may have fewer cores than workers; the demo still wants four of them
warnings.filterwarnings("ignore", message=".*suggested max number of worker.*")



def config(work: str) -> dict:
    return {
        # the persistent tier lives in the demo's directory and goes with it; shared memory is a
        # private directory of /dev/shm, so the check at the end judges only this daemon's files
        "store": {"shm_bytes": "256MiB", "disk_dir": os.path.join(work, "disk"), "allowed_roots": [work]},
        "encoders": {"vae": {"kind": "diffusers-vae", "path": os.path.join(work, "vae"), "dtype": "fp32",
                             "max_batch": 16}},
    }


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def read_epochs(client: CacheClient, specs: list[ImageSpec], epochs: int) -> tuple[float, list[dict]]:
    loader = DataLoader(CachedDataset(client, specs, encoder="vae"), batch_size=16, shuffle=True,
                        num_workers=4, persistent_workers=True)
    n = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            n += batch["latent"].shape[0]
    rate = n / (time.perf_counter() - start)
    memory = []
    for w in loader._iterator._workers:  # type: ignore[union-attr]
        info = psutil.Process(w.pid).memory_full_info()
        memory.append({"pid": w.pid, "rss": info.rss, "pss": info.pss, "uss": info.uss})
    del loader
    return rate, memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="cached-demo-")
    daemon = Daemon(work, config(work))
    try:
        step(f"building a tiny AutoencoderKL and {args.images} sample images in {work}")
        build_tiny_vae(os.path.join(work, "vae"))
        paths = write_images(os.path.join(work, "images"), args.images, [(512, 512), (640, 480), (480, 640)])
        step("starting `cached serve` on a private socket")
        daemon.start()
        address = daemon.address
        try:
            step("warming: cachectl warm --encoder vae --size 256x256 --flip both")
            subprocess.run([sys.executable, "-m", "cached_client.cachectl", "--address", address, "warm",
                            "--encoder", "vae", "--size", "256x256", "--flip", "both",
                            os.path.join(work, "images")], check=True)
            specs = [ImageSpec(path, (256, 256), flip=flip) for path in paths for flip in (False, True)]
            client = CacheClient(address)
            step(f"reading {len(specs)} latents x {args.epochs} epochs through a 4-worker DataLoader")
            rate, memory = read_epochs(client, specs, args.epochs)
            stats = client.stats()
            shm = stats["tiers"]["shm"]
            [e] = client.get(specs[:1], encoder="vae")
            step("report")
            print(f"  entries in shared memory : {shm['entries']} ({format_bytes(shm['bytes'])} of "
                  f"{format_bytes(shm['capacity_bytes'])})")
            print(f"  one entry                : latent {tuple(e['latent'].shape)} {e['latent'].dtype}, "
                  f"key {e.key[:16]}...")
            print(f"  encoded by the daemon    : {stats['encoders']['vae']['items']} items in "
                  f"{stats['encoders']['vae']['batches']} batches")
            print(f"  DataLoader throughput    : {rate:,.0f} items/s (4 workers, batch 16)")
            for m in memory:
                print(f"  worker {m['pid']:>7}         : PSS {format_bytes(m['pss'])}, USS {format_bytes(m['uss'])}"
                      f" (no model, no copy of the data)")
            print(f"  daemon lookups           : {stats['hits']} hits, {stats['misses']} misses")
            del e
            client.close()
        finally:
            step("stopping the daemon (SIGTERM)")
            print(f"  exit code {daemon.stop(timeout=60)}")
        left = daemon.segments()  # this daemon's own files only: others may run on this machine
        print(f"  left in shared memory: {', '.join(left) if left else 'nothing'}")
        if left:
            raise SystemExit(1)
    finally:
        daemon.cleanup()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
