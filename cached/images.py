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

__all__ = ["open_image", "prepare_image", "RESIZE_FILTER", "DEFAULT_MAX_PIXELS"]

RESIZE_FILTER = "lanczos"
DEFAULT_MAX_PIXELS = 16384 * 16384

# store.max_pixels is the limit that applies, not Pillow's own 89.5 Mpx warning and 179 Mpx error:
# every image is opened here, and refused here, against the configured bound.
Image.MAX_IMAGE_PIXELS = None

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, MemoryError, Image.DecompressionBombError)


def open_image(data: bytes, path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image, its header read and checked against `max_pixels`; its pixels not decoded yet."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise SourceError(f"{path}: not a readable image ({exc})") from None
    except _DECODE_ERRORS as exc:  # truncated or corrupt headers
        raise SourceError(f"{path}: cannot decode image ({exc})") from None
    w, h = image.size
    if w * h > max_pixels:
        raise SourceError(f"{path}: {w}x{h} is more than store.max_pixels ({max_pixels}); refusing a "
                          f"possible decompression bomb")
    return image


def _decode(image: Image.Image, path: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return ImageOps.exif_transpose(image).convert("RGB")
    except _DECODE_ERRORS as exc:  # truncated or corrupt pixel data
        raise SourceError(f"{path}: cannot decode image ({exc})") from None


def _cover(img: Image.Image, width: int, height: int) -> Image.Image:
    w, h = img.size
    scale = max(width / w, height / h)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    return img if size == img.size else img.resize(size, Image.Resampling.LANCZOS)


def prepare_image(image: Image.Image, spec: ImageSpec, seed: int) -> np.ndarray:
    """(3, H, W) float32 in [-1, 1] of an opened image. `seed` picks the window of crop="random"."""
    img = _decode(image, spec.path)
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
