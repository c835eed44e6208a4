"""kohya sd-scripts latent caches: `<stem>_<W>x<H>_<arch>.npz` beside each image.

    <dir>/cat.png
    <dir>/cat_1024x0768_sdxl.npz     W x H of the bucket (zero-padded to 4 digits by sd-scripts)
        latents            (C, H/8, W/8) fp32      the bucket's latent
        original_size      (2,) int                (width, height) of the image when it was cached
        crop_ltrb          (4,) int                SDXL conditioning (not the crop)
        latents_flipped    (C, H/8, W/8), optional the horizontally flipped image's latent
    Multi-resolution caches suffix every key with the latent size: latents_96x128 (h x w), ...

sd-scripts resizes each image to cover its bucket and crops the centre (caching refuses
random_crop), which is cached's crop="center". SD, SDXL and SD3 latents are stored unscaled
(the VAE's mean), so import applies scaling_factor * (mean - shift_factor); Flux's are stored scaled.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Iterator

import numpy as np
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

__all__ = ["iter_kohya", "STORED_UNSCALED", "STORED_SCALED"]

STORED_UNSCALED = ("sd", "sdxl", "sd3")
STORED_SCALED = ("flux",)
NAME = re.compile(r"^(?P<stem>.+)_(?P<w>\d+)x(?P<h>\d+)_(?P<arch>[A-Za-z0-9_]+)\.npz$")
KEY = re.compile(r"^latents(?P<flipped>_flipped)?(?P<reso>_\d+x\d+)?$")


def _scale(latents: np.ndarray, arch: str, opts: Options) -> torch.Tensor:
    t = torch.from_numpy(np.array(latents))
    if arch in STORED_SCALED:
        return t
    if opts.scaling_factor is None:
        raise ValueError(f"kohya {arch!r} latents are stored unscaled: pass the encoder's scaling_factor")
    return (t.float() - opts.shift_factor) * opts.scaling_factor


def _read(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k]) for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SkipError(Reason.UNREADABLE, f"{exc}") from exc


def _check_original(arrays: dict[str, np.ndarray], suffix: str, image: str) -> None:
    original = arrays.get("original_size" + suffix)
    if original is None:
        return
    orig = tuple(int(v) for v in np.asarray(original).reshape(-1)[:2])
    now = image_size(image, exif=False)
    if orig not in (now, now[::-1]):  # either side of an EXIF rotation
        raise SkipError(Reason.IMAGE_CHANGED, f"cached from a {orig[0]}x{orig[1]} image, {image} is {now[0]}x{now[1]} now")


def _file(path: str, opts: Options, stems: dict[str, list[str]]) -> Iterator[Result]:
    m = NAME.match(os.path.basename(path))
    if m is None:
        raise SkipError(Reason.NOT_A_CACHE, "name is not <stem>_<W>x<H>_<arch>.npz")
    arch = m["arch"]
    if opts.arch is not None and arch != opts.arch:
        raise SkipError(Reason.OTHER_ARCH, f"{arch!r}, not {opts.arch!r}")
    if arch not in STORED_UNSCALED + STORED_SCALED:
        raise SkipError(Reason.UNSUPPORTED, f"unknown arch {arch!r}: its scaling convention is not known")
    image = one_image(stems.get(m["stem"]), f"{m['stem']}.* beside the cache file")
    arrays = _read(path)
    keys = sorted(k for k in arrays if KEY.match(k))
    if not keys:
        raise SkipError(Reason.UNREADABLE, f"no latents in {sorted(arrays)}")
    bucket = (int(m["w"]), int(m["h"]))
    for key in keys:
        km = KEY.match(key)
        assert km is not None
        suffix = km["reso"] or ""
        _check_original(arrays, suffix, image)
        latent = _scale(arrays[key], arch, opts)
        size = check_latent(latent, None if suffix else bucket, opts)
        yield ImportItem(path, image, size, "center", bool(km["flipped"]), latent)


def iter_kohya(root: str, opts: Options) -> Iterator[Result]:
    """Every *.npz under `root` (recursively)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        stems = None
        for name in sorted(filenames):
            if name.endswith(".npz"):
                stems = images_by_stem(dirpath) if stems is None else stems
                path = os.path.join(dirpath, name)
                yield from guarded(path, _file(path, opts, stems))
