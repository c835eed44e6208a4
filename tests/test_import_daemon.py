"""cachectl import through a real daemon: a kohya cache made by the same tiny VAE becomes entries
equal to what the daemon computes itself, and the import says what it skipped and why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import torch
from conftest import vae_config
from PIL import Image

from cached_client import ImageSpec


def cachectl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cached_client.cachectl", *args], capture_output=True,
                          text=True, timeout=300)


def unscaled_mean(vae_dir: str, path: str) -> np.ndarray:
    """What kohya caches for SD/SDXL: the posterior mean, unscaled, fp32."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1)
    with torch.no_grad():
        return vae.encode(x.permute(2, 0, 1)[None]).latent_dist.mean[0].numpy()


def test_import_kohya_cache_then_serve_without_computing(daemon_factory, tiny_vae, images, tmp_path):
    data = tmp_path / "set"
    data.mkdir()
    paths = []
    for i in range(3):  # images already at 64x64, so the crop is the whole image
        p = str(data / f"img{i}.png")
        Image.open(images[i]).convert("RGB").resize((64, 64)).save(p)
        paths.append(p)
        np.savez(str(data / f"img{i}_0064x0064_sdxl.npz"), latents=unscaled_mean(tiny_vae, p),
                 original_size=np.array([64, 64]), crop_ltrb=np.array([0, 0, 64, 64]))
    np.savez(str(data / "gone_0064x0064_sdxl.npz"), latents=np.zeros((4, 8, 8), np.float32),
             original_size=np.array([64, 64]), crop_ltrb=np.array([0, 0, 64, 64]))
    np.savez(str(data / "img0_0064x0064_flux.npz"), latents=np.zeros((16, 8, 8), np.float32),
             original_size=np.array([64, 64]), crop_ltrb=np.array([0, 0, 64, 64]))
    d = daemon_factory(vae_config(tiny_vae))
    r = cachectl("--address", d.address, "import", "--format", "kohya", "--encoder", "vae", "--size", "64x64",
                 str(data))
    assert r.returncode == 0, r.stderr
    assert "imported 3 of 5 cached latents" in r.stdout
    assert "skipped 1: channels" in r.stdout and "skipped 1: no matching image" in r.stdout
    client = d.client()
    specs = [ImageSpec(p, (64, 64)) for p in paths]
    imported = [e["latent"].clone() for e in client.get(specs, encoder="vae", compute=False)]
    assert client.stats()["encoders"]["vae"]["items"] == 0
    # the daemon's own computation of the same specs, in another daemon
    fresh = daemon_factory(vae_config(tiny_vae))
    for latent, e in zip(imported, fresh.client().get(specs, encoder="vae"), strict=True):
        assert torch.allclose(latent, e["latent"], rtol=1e-4, atol=1e-5)
    again = cachectl("--address", d.address, "import", "--format", "kohya", "--encoder", "vae", str(data))
    assert "(3 already cached" in again.stdout
    listing = cachectl("--address", d.address, "ls", "--tier", "shm")
    assert listing.returncode == 0 and "64x64 center" in listing.stdout and "3 of 3 entries" in listing.stdout


def test_import_refuses_paths_outside_allowed_roots(daemon_factory, tiny_vae, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root, elsewhere)
    d = daemon_factory(vae_config(tiny_vae, allowed_roots=[str(root)]))
    r = cachectl("--address", d.address, "import", "--format", "kohya", "--encoder", "vae", str(elsewhere))
    assert r.returncode == 1 and r.stderr.startswith("SourceNotAllowed:")
    r = cachectl("--address", d.address, "import", "--format", "kohya", "--encoder", "nope", str(root))
    assert r.returncode == 1 and r.stderr.startswith("UnknownEncoder:")
    assert os.path.isdir(root)
