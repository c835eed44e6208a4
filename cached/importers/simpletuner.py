"""SimpleTuner VAE caches: `<cache_dir>/<subdir>/<sha256(stem)>.pt`, one per image.

    <image_root>/people/cat.png
    <cache_dir>/people/<sha256 hex of "cat">.pt      (or cat.pt when hash_filenames is off)
        torch.save of a (C, H/8, W/8) or (1, C, H/8, W/8) tensor, or of a dict holding one under
        "latents"; gzip-compressed when compress_disk_cache is on; scaled

The file records neither its image nor its transform: import hashes the stem of every image under
`image_root` to find it, takes the size from the latent (checked against --size) and the crop from
the caller (SimpleTuner's own crop settings, "center" by default); no flip.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import zlib
from collections.abc import Iterator

import torch

from .base import (
    IMAGE_EXTENSIONS,
    ImportItem,
    Options,
    Reason,
    Result,
    SkipError,
    check_latent,
    guarded,
    image_size,
    one_image,
)

__all__ = ["iter_simpletuner", "cache_names"]

GZIP_MAGIC = b"\x1f\x8b"
DICT_KEYS = ("latents", "latent")


def cache_names(image_root: str) -> dict[str, list[str]]:
    """Relative cache path (hashed and plain stem) -> the images under `image_root` that map to it."""
    names: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(image_root):
        dirnames.sort()
        sub = os.path.relpath(dirpath, image_root)
        sub = "" if sub == "." else sub
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            for cached in (hashlib.sha256(stem.encode()).hexdigest(), stem):
                names.setdefault(os.path.join(sub, cached + ".pt"), []).append(path)
    return names


def _load(path: str) -> torch.Tensor:
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == GZIP_MAGIC:
            data = gzip.decompress(data)
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, zlib.error) as exc:
        raise SkipError(Reason.UNREADABLE, f"{type(exc).__name__}: {exc}") from exc
    if isinstance(obj, dict):
        obj = next((obj[k] for k in DICT_KEYS if k in obj), obj)
    if not isinstance(obj, torch.Tensor):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise SkipError(Reason.UNREADABLE, f"no latent tensor in {keys}")
    if obj.dim() == 4 and obj.shape[0] == 1:
        obj = obj[0]
    if obj.dim() == 4:
        raise SkipError(Reason.UNSUPPORTED, f"video or batched latent {list(obj.shape)}")
    return obj


def _file(path: str, rel: str, opts: Options, names: dict[str, list[str]]) -> Iterator[Result]:
    image = one_image(names.get(rel), f"no image under {opts.image_root} hashes to {rel}")
    latent = _load(path)
    size = check_latent(latent, None, opts)
    image_size(image)  # readable at least
    yield ImportItem(path, image, size, opts.crop, False, latent)


def iter_simpletuner(cache_dir: str, opts: Options) -> Iterator[Result]:
    """Every *.pt under `cache_dir`, matched to the images under opts.image_root."""
    if not opts.image_root or not os.path.isdir(opts.image_root):
        raise ValueError(f"simpletuner import needs image_root, the directory of the images, got {opts.image_root!r}")
    return _walk(cache_dir, opts, cache_names(opts.image_root))


def _walk(cache_dir: str, opts: Options, names: dict[str, list[str]]) -> Iterator[Result]:
    for dirpath, dirnames, filenames in os.walk(cache_dir):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".pt"):
                path = os.path.join(dirpath, name)
                yield from guarded(path, _file(path, os.path.relpath(path, cache_dir), opts, names))
