"""ai-toolkit latent caches: `<image_dir>/_latent_cache/<stem>_<hash>.safetensors`.

    <image_dir>/cat.png
    <image_dir>/_latent_cache/cat_<22 chars: urlsafe base64 of an md5, unpadded>.safetensors
        tensor "latent"  (C, H/8, W/8), scaled, in the training dtype
        metadata         the settings hashed into the name, each value a JSON string:
                         filename, scale_to_width, scale_to_height, crop_x, crop_y, crop_width,
                         crop_height, latent_space_version, latent_version, flip_x, flip_y (when set)

ai-toolkit resizes the (EXIF-rotated) image to scale_to, crops crop_width x crop_height at
(crop_x, crop_y) and flips. A centred window of a cover resize is cached's crop="center"; any other
window (random or point-of-interest crops) becomes an explicit box in source pixels, which cached
crops then resizes: the same region, up to rounding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from .base import (
    ImportItem,
    Options,
    Reason,
    Result,
    SkipError,
    check_latent,
    guarded,
    image_size,
    images_by_stem,
    one_image,
)

__all__ = ["iter_aitoolkit", "CACHE_DIR"]

CACHE_DIR = "_latent_cache"
HASH_CHARS = 22
GEOMETRY = ("scale_to_width", "scale_to_height", "crop_x", "crop_y", "crop_width", "crop_height")


def _value(meta: dict[str, str], name: str) -> object:
    raw = meta.get(name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _read(path: str) -> tuple[torch.Tensor, dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            if "latent" not in f.keys():
                raise SkipError(Reason.UNREADABLE, f"no 'latent' tensor (has {sorted(f.keys())})")
            return f.get_tensor("latent"), dict(f.metadata() or {})
    except (OSError, SafetensorError, ValueError) as exc:
        raise SkipError(Reason.UNREADABLE, str(exc)) from exc


def _image(path: str, meta: dict[str, str]) -> str:
    image_dir = os.path.dirname(os.path.dirname(path))
    filename = meta.get("filename")
    if filename:
        candidate = os.path.join(image_dir, os.path.basename(filename))
        return one_image([candidate] if os.path.isfile(candidate) else [], candidate)
    stem = os.path.basename(path)[:-len(".safetensors")][:-HASH_CHARS - 1]
    return one_image(images_by_stem(image_dir).get(stem), f"{stem}.* in {image_dir}")


def _crop(image: str, geometry: list[int]) -> str | tuple[int, int, int, int]:
    sw, sh, cx, cy, cw, ch = geometry
    w, h = image_size(image)
    if min(sw, sh, cw, ch) <= 0 or cx + cw > sw or cy + ch > sh:
        raise SkipError(Reason.UNREADABLE, f"inconsistent crop metadata {geometry}")
    cover = max(cw / w, ch / h)
    centred = abs(cx - (sw - cw) // 2) <= 1 and abs(cy - (sh - ch) // 2) <= 1
    if centred and abs(w * cover - sw) <= 2 and abs(h * cover - sh) <= 2:
        return "center"
    fx, fy = w / sw, h / sh
    box = (round(cx * fx), round(cy * fy), min(w, round((cx + cw) * fx)), min(h, round((cy + ch) * fy)))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise SkipError(Reason.UNSUPPORTED, f"crop {geometry} is empty in the {w}x{h} source")
    return box


def _file(path: str, opts: Options) -> Iterator[Result]:
    latent, meta = _read(path)
    if latent.dim() == 4 and latent.shape[0] == 1:
        latent = latent[0]
    if _value(meta, "flip_y"):
        raise SkipError(Reason.UNSUPPORTED, "vertical flip (flip_y)")
    image = _image(path, meta)
    geometry = [_value(meta, k) for k in GEOMETRY]
    if all(isinstance(v, int) for v in geometry):
        ints = [int(v) for v in geometry]  # type: ignore[call-overload]
        size = check_latent(latent, (ints[4], ints[5]), opts)
        crop: str | tuple[int, int, int, int] = _crop(image, ints)
    else:
        size = check_latent(latent, None, opts)
        crop = opts.crop
        image_size(image)  # readable at least
    yield ImportItem(path, image, size, crop, bool(_value(meta, "flip_x")), latent)


def iter_aitoolkit(root: str, opts: Options) -> Iterator[Result]:
    """Every *.safetensors in every `_latent_cache` directory under `root` (or `root` itself)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if os.path.basename(dirpath) != CACHE_DIR:
            continue
        for name in sorted(filenames):
            if name.endswith(".safetensors"):
                path = os.path.join(dirpath, name)
                yield from guarded(path, _file(path, opts))
