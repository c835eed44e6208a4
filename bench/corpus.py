"""The latents every read-path benchmark uses, held the five ways the benchmarks compare.

A daemon with two tiny VAEs computes N real latents per size and holds them in shared memory; the
same bytes are then written out as an arena file at known offsets (the design's ceiling), one
safetensors file per item (ai-toolkit) and one npz per item (kohya sd-scripts).

Realistic sizes, cheap to encode: the VAEs have a single down block (no downsampling), so a 128x64
image gives a 64x128 latent, the bytes of a real one (4x64x128 fp32 = 128 KiB, 16x64x128 = 512 KiB),
for ~20 ms of CPU instead of ~2 s for a 1024x512 image through an 8x VAE. The read path never looks
at how a latent was made, only at its bytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # cached_testing: tiny models, the daemon harness

from methods import Latents  # noqa: E402

from cached_client import CacheClient, ImageSpec  # noqa: E402
from cached_testing.fixtures import build_tiny_vae, write_images  # noqa: E402
from cached_testing.harness import Daemon  # noqa: E402

__all__ = ["Corpus", "corpus", "SIZES"]

log = logging.getLogger("bench")

IMAGE = (128, 64)  # (width, height) of the sources and the spec; the latent is (C, 64, 128)
SIZES = {"128KiB": 4, "512KiB": 16}  # name -> latent channels
_ONE_BLOCK = {"down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"],
              "block_out_channels": [8], "norm_num_groups": 8, "mid_block_add_attention": False}


@dataclass(frozen=True)
class Corpus:
    address: str
    sizes: dict[str, Latents]
    warm_s: float                # seconds the daemon took to compute every latent


@contextlib.contextmanager
def corpus(n: int, sizes: tuple[str, ...] = tuple(SIZES), backend: str = "auto") -> Iterator[Corpus]:
    """Builds everything in private temporary directories and removes it all on exit, the daemon
    stopped and its shared memory gone, whatever happened. `backend`: the daemon's store.shm_backend."""
    work = tempfile.mkdtemp(prefix="cached-bench-")
    shm = tempfile.mkdtemp(prefix="cached-bench-", dir="/dev/shm")
    daemon = None
    try:
        images = write_images(os.path.join(work, "images"), n, [IMAGE])
        encoders = {}
        for name in sizes:
            path = build_tiny_vae(os.path.join(work, f"vae-{name}"), latent_channels=SIZES[name], **_ONE_BLOCK)
            encoders[f"vae{SIZES[name]}"] = {"kind": "diffusers-vae", "path": path}
        # room for the slots (a header page each) four times over: loaders may keep a dataset resident
        # in up to half of shared memory, and other readers lease more beside them
        need = 4 * n * sum(SIZES[s] * IMAGE[0] * IMAGE[1] * 4 + 4096 for s in sizes)
        # one benchmark process plays many trainers' readers at once: it may hold every lease
        daemon = Daemon(work, {"store": {"shm_bytes": max(need, 64 << 20), "shm_backend": backend},
                               "encoders": encoders,
                               "limits": {"client_leased_bytes": "100%"}})
        daemon.start()
        client = CacheClient(daemon.address, connect_timeout=5.0)
        t0 = time.perf_counter()
        out = {}
        for name in sizes:
            specs = [ImageSpec(p, size=IMAGE) for p in images]
            warmed = client.warm(specs, encoder=f"vae{SIZES[name]}")
            if warmed.failed:
                raise RuntimeError(f"warming {name} failed: {warmed.failed[:3]}")
            out[name] = _export(client, name, specs, os.path.join(work, name), shm)
        client.close()
        yield Corpus(daemon.address, out, time.perf_counter() - t0)
    finally:
        if daemon is not None:
            try:
                daemon.stop()
            finally:
                daemon.cleanup()
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _export(client: CacheClient, name: str, specs: list[ImageSpec], out_dir: str, shm: str) -> Latents:
    """Writes the daemon's latents, byte for byte, the ways the other methods read them."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(out_dir)
    encoder = f"vae{SIZES[name]}"
    arena = os.path.join(shm, f"arena-{name}.bin")
    st_paths, npz_paths = [], []
    with open(arena, "wb") as f:
        for start in range(0, len(specs), 64):
            for i, e in enumerate(client.get(specs[start:start + 64], encoder=encoder, compute=False), start):
                latent = e["latent"].clone()
                f.write(latent.numpy().tobytes())
                st_paths.append(os.path.join(out_dir, f"{i:06d}.safetensors"))
                save_file({"latent": latent}, st_paths[-1])
                npz_paths.append(os.path.join(out_dir, f"{i:06d}.npz"))
                # what kohya writes beside each image: fp32 latents plus the bucket bookkeeping
                np.savez(npz_paths[-1], latents=latent.numpy(), original_size=np.array(IMAGE),
                         crop_ltrb=np.array([0, 0, *IMAGE]))
    shape = tuple(torch.Size(latent.shape))
    return Latents(name, encoder, shape, specs, arena, st_paths, npz_paths)  # type: ignore[arg-type]
