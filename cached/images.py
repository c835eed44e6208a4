"""Image preprocessing, exactly as DESIGN.md fixes it: EXIF transpose, RGB, resize so the image covers
the target (Lanczos), crop, flip, scale to [-1, 1], CHW float32. A source already at the target size
is not resampled."""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cached_client.errors import InvalidSpec, SourceError
from cached_client.specs import ImageSpec

__all__ = ["prepare_image", "RESIZE_FILTER", "DEFAULT_MAX_PIXELS"]

RESIZE_FILTER = "lanczos"
DEFAULT_MAX_PIXELS = 16384 * 16384


def _open(data: bytes, path: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
            w, h = opened.size
            if w * h > max_pixels:
                raise SourceError(f"{path}: {w}x{h} is more than max_pixels ({max_pixels}); "
                                  f"refusing a possible decompression bomb")
            return ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SourceError(f"{path}: not a readable image ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt files
        raise SourceError(f"{path}: cannot decode image ({exc})") from exc


def _cover(img: Image.Image, width: int, height: int) -> Image.Image:
    w, h = img.size
    scale = max(width / w, height / h)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    return img if size == img.size else img.resize(size, Image.Resampling.LANCZOS)


def prepare_image(data: bytes, spec: ImageSpec, seed: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """(3, H, W) float32 in [-1, 1]. `seed` picks the window of crop="random"."""
    img = _open(data, spec.path, max_pixels)
    width, height = spec.size
    crop = spec.crop
    if isinstance(crop, tuple):
        left, top, right, bottom = crop
        if right > img.width or bottom > img.height:
            raise InvalidSpec(f"{spec.path}: crop box {crop} is outside the {img.width}x{img.height} image")
        img = img.crop(crop)
        crop = "center"
    if crop == "none":
        if img.size != (width, height):
            img = img.resize((width, height), Image.Resampling.LANCZOS)
    else:
        img = _cover(img, width, height)
        spare_x, spare_y = img.width - width, img.height - height
        if crop == "random":
            rng = random.Random(seed)
            left, top = rng.randint(0, spare_x), rng.randint(0, spare_y)
        else:
            left, top = spare_x // 2, spare_y // 2
        if spare_x or spare_y:
            img = img.crop((left, top, left + width, top + height))
    if spec.flip:
        img = ImageOps.mirror(img)
    arr = np.asarray(img, dtype=np.float32)
    return np.ascontiguousarray((arr / 127.5 - 1.0).transpose(2, 0, 1))
