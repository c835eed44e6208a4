"""What a client asks for: an image with its transform, or a text.

Specs are plain, hashable, picklable values. Each knows its compact wire form, one line of JSON made
once at construction; a batch travels as those lines joined by newlines in a single bytes field, so
packing 256 specs is one join, and the daemon can remember each line's key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

__all__ = ["ImageSpec", "TextSpec", "Spec", "encode_specs", "decode_spec", "CROPS", "MAX_SIDE", "IMAGE_EXTENSIONS"]

CROPS = ("center", "random", "none")
MAX_SIDE = 16384  # pixels; larger targets are refused as absurd
# file extensions (lower case) that directory walks (cachectl warm, importers) take for images
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def _check_size(size: object) -> tuple[int, int]:
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        raise ValueError(f"size must be (width, height), got {size!r}")
    w, h = size
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (w, h)):
        raise ValueError(f"size must be two ints, got {size!r}")
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise ValueError(f"size must be within 1..{MAX_SIDE} on each side, got {size!r}")
    return (w, h)


def _check_crop(crop: object) -> str | tuple[int, int, int, int]:
    if isinstance(crop, str):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS} or a (left, top, right, bottom) box, got {crop!r}")
        return crop
    if isinstance(crop, (tuple, list)) and len(crop) == 4 and all(isinstance(v, int) for v in crop):
        left, top, right, bottom = crop
        if not (0 <= left < right and 0 <= top < bottom):
            raise ValueError(f"crop box must have 0 <= left < right and 0 <= top < bottom, got {crop!r}")
        return (left, top, right, bottom)
    raise ValueError(f"crop must be one of {CROPS} or a (left, top, right, bottom) box, got {crop!r}")


@dataclass(frozen=True)
class ImageSpec:
    """An image file, resized to cover `size` (width, height), cropped, optionally flipped.

    `crop` is "center", "random" (seeded from the spec: the same spec is always the same crop),
    "none" (stretch to `size`), or a (left, top, right, bottom) box in source pixels.
    The path is made absolute here, since the daemon does not share the caller's working directory.
    """

    path: str
    size: tuple[int, int]
    crop: str | tuple[int, int, int, int] = "center"
    flip: bool = False
    _wire: bytes = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        path = os.path.abspath(os.fspath(self.path))
        size = _check_size(self.size)
        crop = _check_crop(self.crop)
        if not isinstance(self.flip, bool):
            raise ValueError(f"flip must be a bool, got {self.flip!r}")
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "crop", crop)
        wire_crop = list(crop) if isinstance(crop, tuple) else crop
        object.__setattr__(self, "_wire", _line(["i", path, size[0], size[1], wire_crop, self.flip]))

    def wire_json(self) -> str:
        return self._wire.decode()


@dataclass(frozen=True)
class TextSpec:
    """A text prompt for a text encoder."""

    text: str
    _wire: bytes = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise ValueError(f"text must be a str, got {type(self.text).__name__}")
        object.__setattr__(self, "_wire", _line(["t", self.text]))

    def wire_json(self) -> str:
        return self._wire.decode()


Spec = ImageSpec | TextSpec


def _line(item: list) -> bytes:
    return json.dumps(item, separators=(",", ":")).encode()  # escapes newlines: one line per spec


def encode_specs(specs: list[Spec]) -> bytes:
    """The packed wire form of a batch: one JSON line per item."""
    try:
        return b"\n".join([s._wire for s in specs])
    except AttributeError:
        bad = next(s for s in specs if not isinstance(s, (ImageSpec, TextSpec)))
        raise TypeError(f"specs must be ImageSpec or TextSpec, got {type(bad).__name__}") from None


def decode_spec(line: bytes) -> Spec:
    """One line of a packed batch back into a spec; ValueError names what is wrong."""
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if isinstance(item, list) and item and item[0] == "i" and len(item) == 6:
        _, path, w, h, crop, flip = item
        if not isinstance(path, str) or not path:
            raise ValueError(f"image path must be a non-empty string, got {path!r}")
        return ImageSpec(path, (w, h), tuple(crop) if isinstance(crop, list) else crop, flip)
    if isinstance(item, list) and len(item) == 2 and item[0] == "t":
        return TextSpec(item[1])
    raise ValueError(f"not a spec: {item!r:.200}")
