"""Importers of the latent caches other trainers wrote, so their users keep the hours they spent.

Each parser walks a trainer's cache, finds the image every cached latent was made from, recovers the
transform (size, crop, flip) and normalises the latent to cached's convention, scaling_factor *
(mean - shift_factor), in fp32 or the dtype it was stored in. It yields an ImportItem per latent or a
Skip saying why not (no matching image, a shape that disagrees with the size, an unreadable file, a
transform cached cannot express, ...). The formats do not record the VAE: the caller names the encoder,
and the daemon keys each item as if that encoder had computed it.

    for r in iter_import("kohya", "/data/set", size=(1024, 1024), scaling_factor=0.13025):
        ...  # ImportItem: r.spec(), r.latent  |  Skip: r.cache_file, r.reason, r.detail
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from .aitoolkit import iter_aitoolkit
from .base import ImportItem, Options, Reason, Result, Skip, summarize
from .kohya import iter_kohya
from .simpletuner import iter_simpletuner

__all__ = ["iter_import", "ImportItem", "Skip", "Reason", "Result", "FORMATS", "summarize"]

FORMATS: dict[str, Callable[[str, Options], Iterator[Result]]] = {
    "ai-toolkit": iter_aitoolkit,
    "kohya": iter_kohya,
    "simpletuner": iter_simpletuner,
}


def iter_import(format: str, path: str, *, image_root: str | None = None, size: tuple[int, int] | None = None,
                scaling_factor: float | None = None, shift_factor: float = 0.0, arch: str | None = None,
                crop: str | tuple[int, int, int, int] = "center", stride: int = 8) -> Iterator[Result]:
    """ImportItem or Skip for every latent of a `format` cache under `path`.

    image_root: where the images are (SimpleTuner only; the others keep caches beside the images).
    size: (width, height) to import; latents of another size are skipped. None takes each latent's.
    scaling_factor, shift_factor: the encoder's, applied to caches stored unscaled (kohya SD/SDXL/SD3).
    arch: kohya only, import just the files of this arch suffix ("sdxl", "flux", ...).
    crop: the crop to record where the cache does not say (SimpleTuner, ai-toolkit without metadata).
    stride: the VAE's downsampling factor.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
    if not os.path.isdir(path):
        raise ValueError(f"{format} cache {path!r} is not a directory")
    if size is not None and not (len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ValueError(f"size must be (width, height) in pixels, got {size!r}")
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride!r}")
    opts = Options(image_root, (size[0], size[1]) if size else None, scaling_factor, shift_factor, arch, crop, stride)
    return FORMATS[format](path, opts)
