"""What every importer yields, and the checks they share: finding a cache file's image, reading an
image's size, and holding a latent against the size it should have."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from cached_client.specs import IMAGE_EXTENSIONS, ImageSpec

__all__ = ["ImportItem", "Skip", "Result", "Reason", "Options", "IMAGE_EXTENSIONS", "summarize", "images_by_stem",
           "image_size", "check_latent", "SkipError", "guarded", "one_image"]



class Reason:
    """Why a latent was skipped: stable strings, counted by summarize and printed by cachectl import."""

    NO_IMAGE = "no matching image"
    AMBIGUOUS = "several images match"
    UNREADABLE = "unreadable cache file"
    BAD_IMAGE = "unreadable image"
    SIZE_MISMATCH = "latent shape does not match the size"
    IMAGE_CHANGED = "image changed since it was cached"
    UNSUPPORTED = "transform cached cannot express"
    NOT_A_CACHE = "not a latent cache file"
    OTHER_ARCH = "another arch than asked for"


@dataclass(frozen=True)
class ImportItem:
    """One cached latent and the spec it answers: the daemon keys it like a computed entry."""

    cache_file: str
    image: str  # real path of the source image
    size: tuple[int, int]  # (width, height) of the encoded pixels
    crop: str | tuple[int, int, int, int]  # as ImageSpec.crop: "center", "none" or a source box
    flip: bool
    latent: torch.Tensor = field(repr=False)  # (C, H/stride, W/stride), scaled: sf * (mean - shift)

    def spec(self) -> ImageSpec:
        return ImageSpec(self.image, self.size, self.crop, self.flip)


@dataclass(frozen=True)
class Skip:
    """A cache file (or one latent in it) that was not imported, and why."""

    cache_file: str
    reason: str
    detail: str = ""


Result = ImportItem | Skip


class SkipError(Exception):
    """Raised inside an importer to skip the current file; caught where the Skip is yielded."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Options:
    image_root: str | None = None
    size: tuple[int, int] | None = None
    scaling_factor: float | None = None
    shift_factor: float = 0.0
    arch: str | None = None
    crop: str | tuple[int, int, int, int] = "center"
    stride: int = 8


def summarize(results: Iterable[Result]) -> dict[str, object]:
    """{"imported": n, "skipped": {reason: n}} of a finished import."""
    imported = 0
    skipped: Counter[str] = Counter()
    for r in results:
        if isinstance(r, Skip):
            skipped[r.reason] += 1
        else:
            imported += 1
    return {"imported": imported, "skipped": dict(skipped)}


def images_by_stem(directory: str) -> dict[str, list[str]]:
    """stem -> image files of `directory` (not recursive), by extension (case-insensitive)."""
    found: dict[str, list[str]] = {}
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return found
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(directory, name)):
            found.setdefault(stem, []).append(os.path.join(directory, name))
    return found


def one_image(candidates: list[str] | None, what: str) -> str:
    if not candidates:
        raise SkipError(Reason.NO_IMAGE, what)
    if len(candidates) > 1:
        raise SkipError(Reason.AMBIGUOUS, ", ".join(candidates))
    return os.path.realpath(candidates[0])


def image_size(path: str, exif: bool = True) -> tuple[int, int]:
    """(width, height) from the image header, after EXIF rotation when `exif`; no pixels decoded."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            rotated = exif and img.getexif().get(0x0112) in (5, 6, 7, 8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise SkipError(Reason.BAD_IMAGE, f"{path}: {exc}") from exc
    return (h, w) if rotated else (w, h)


def check_latent(latent: torch.Tensor, size: tuple[int, int] | None, opts: Options) -> tuple[int, int]:
    """The (width, height) a (C, h, w) latent encodes; SkipError if it disagrees with `size` or
    with the size the user asked for."""
    if latent.dim() != 3 or not latent.is_floating_point():
        raise SkipError(Reason.UNREADABLE, f"expected a float (C, H, W) latent, got {latent.dtype} {list(latent.shape)}")
    encoded = (latent.shape[2] * opts.stride, latent.shape[1] * opts.stride)
    for want, what in ((size, "the cache says"), (opts.size, "asked for")):
        if want is not None and tuple(want) != encoded:
            raise SkipError(Reason.SIZE_MISMATCH, f"latent {list(latent.shape)} encodes {encoded[0]}x{encoded[1]}, "
                                           f"{what} {want[0]}x{want[1]}")
    return encoded


def guarded(cache_file: str, items: Iterator[Result]) -> Iterator[Result]:
    """Yields what `items` yields; a SkipError ends it with a Skip of `cache_file`."""
    try:
        yield from items
    except SkipError as exc:
        yield Skip(cache_file, exc.reason, exc.detail)
