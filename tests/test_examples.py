"""The example training loop runs a few real optimizer steps on latents and text embeddings served
by a real daemon, and its loss is finite."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

from cached_testing.fixtures import build_tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_diffusers_example_runs(daemon_factory, tiny_vae, images, tmp_path):
    clip = build_tiny_clip(str(tmp_path / "clip"))
    data = tmp_path / "data"
    data.mkdir()
    for i, path in enumerate(images[:6]):
        shutil.copy(path, data / f"{i}.png")
        (data / f"{i}.txt").write_text(["a photo of a cat", "a painting of a dog", "a red ball"][i % 3])
    d = daemon_factory({"store": {"shm_bytes": "32MiB"},
                        "encoders": {"vae": {"kind": "diffusers-vae", "path": tiny_vae},
                                     "clip": {"kind": "hf-text", "path": clip}}})
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_diffusers.py"), "--address", d.address,
         "--images", str(data), "--size", "64x64", "--tiny-unet", "--steps", "4",
         "--batch-size", "4", "--workers", "2", "--log-every", "1"],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    losses = [float(line.split()[3]) for line in r.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    stats = d.client().stats()
    assert stats["encoders"]["vae"]["items"] >= 4 and stats["encoders"]["clip"]["items"] >= 1
