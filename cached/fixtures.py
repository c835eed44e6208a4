"""Small real things for demos, tests and benchmarks on machines with no model weights: a tiny
AutoencoderKL with random weights saved like a real one, and synthetic photos."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["build_tiny_vae", "write_images", "TINY_VAE_CONFIG"]

# Four down blocks give the real 8x downsampling; 4 latent channels as in SD 1.5 / SDXL.
TINY_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1, "norm_num_groups": 32, "sample_size": 256, "scaling_factor": 0.13025,
}


def build_tiny_vae(path: str, seed: int = 0, **overrides: object) -> str:
    """Saves a randomly initialised AutoencoderKL (config.json + safetensors) to `path`."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**TINY_VAE_CONFIG, **overrides})
    vae.save_pretrained(path, safe_serialization=True)
    return path


def write_images(directory: str, n: int, sizes: list[tuple[int, int]] | None = None, seed: int = 0,
                 fmt: str = "png") -> list[str]:
    """`n` smooth synthetic images (gradients plus shapes and noise), cycling through `sizes`."""
    from PIL import Image, ImageDraw

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = sizes or [(256, 256)]
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin((xx + yy) / (7 + i % 13))], axis=-1)
        img = Image.fromarray((255 * (0.7 * base + 0.3 * rng.random((h, w, 3)))).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
            x1, y1 = min(w - 1, x0 + int(rng.integers(1, w // 2 + 2))), min(h - 1, y0 + int(rng.integers(1, h // 2 + 2)))
            draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = os.path.join(directory, f"img_{i:05d}.{fmt}")
        img.save(path)
        paths.append(path)
    return paths
