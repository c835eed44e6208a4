"""What a client asks for: an image with its transform, or a text.

Specs are plain, hashable, picklable values. Each knows its compact wire form, one line of JSON made
once at construction; a batch travels as those lines joined by newlines in a single bytes field, so
packing 256 specs is one join, and the daemon can remember each line's key.

Validation lives here, once, for both ends: the client checks a spec when it is made, the daemon
checks every line it decodes (`decode_spec`) with the same functions. Whatever a line holds, it costs
at most a parse bounded by its length (itself bounded before parsing) and fails with one InvalidSpec
line naming the bad value; no NUL byte, relative path or absurdly long or deep path gets past it to
the filesystem.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidSpec

__all__ = ["ImageSpec", "TextSpec", "Spec", "encode_specs", "decode_spec", "check_path", "check_text",
           "check_object_url", "is_object_url", "OBJECT_SCHEME", "line_limit", "CROPS", "MAX_SIDE", "MAX_PATH_BYTES", "MAX_PATH_DEPTH", "MAX_TEXT_BYTES",
           "MAX_LINE_BYTES", "IMAGE_EXTENSIONS"]

CROPS = ("center", "random", "none")
MAX_SIDE = 16384  # pixels; larger targets are refused as absurd
# file extensions (lower case) that directory walks (cachectl warm, importers) take for images
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Bounds on one spec: the defaults of decode_spec's parameters (the daemon's config may set its own)
# and what a spec made here is checked against.
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux: the kernel refuses a longer path anyway
MAX_PATH_DEPTH = 256   # components: realpath costs depth x length, minutes for 2M `a/` components
MAX_TEXT_BYTES = 64 << 10  # UTF-8; far above any tokenizer's max_length, far below a memory problem


def line_limit(max_path_bytes: int = MAX_PATH_BYTES, max_text_bytes: int = MAX_TEXT_BYTES) -> int:
    """The longest wire line a valid spec can have: JSON's ASCII escapes (\\u00XX, \\udcXX for a path
    byte that is not UTF-8) take at most 6 bytes per byte of path or text, plus the other fields."""
    return 6 * max(max_path_bytes, max_text_bytes) + 256


MAX_LINE_BYTES = line_limit()  # longer lines are refused before they are parsed


def _short(value: object) -> str:
    """The repr of a bad value, cut to fit in one log line."""
    text = repr(value)
    return text if len(text) <= 100 else f"{text[:100]}... ({len(text)} chars)"


def _as_str(path: object) -> str:
    try:
        p = os.fspath(path)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidSpec(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
    return os.fsdecode(p) if isinstance(p, bytes) else p


def check_path(path: object, *, max_bytes: int = MAX_PATH_BYTES, max_depth: int = MAX_PATH_DEPTH) -> str:
    """`path` when it is a path the daemon may resolve: a non-empty absolute str, no NUL byte, at most
    `max_bytes` bytes and `max_depth` components; InvalidSpec naming the value otherwise."""
    if not isinstance(path, str) or not path:
        raise InvalidSpec(f"path must be a non-empty string, got {_short(path)}")
    if "\0" in path:
        raise InvalidSpec(f"path must not contain NUL bytes, got {_short(path)}")
    if not path.startswith("/"):
        raise InvalidSpec(f"path must be absolute, got {_short(path)}")
    try:
        size = len(path) if len(path) > max_bytes else len(os.fsencode(path))
    except UnicodeEncodeError as exc:  # a lone surrogate that is no escaped byte
        raise InvalidSpec(f"path is not valid UTF-8 at character {exc.start}: {_short(path)}") from None
    if size > max_bytes:
        raise InvalidSpec(f"path is longer than {max_bytes} bytes ({size}): {_short(path)}")
    depth = path.count("/")
    if depth > max_depth:
        raise InvalidSpec(f"path is deeper than {max_depth} components ({depth}): {_short(path)}")
    return path


OBJECT_SCHEME = "s3://"  # a source in an object store: s3://bucket/key
MAX_OBJECT_KEY_BYTES = 1024  # S3's own bound on a key
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def is_object_url(path: object) -> bool:
    """Whether a source path names an object (s3://bucket/key) rather than a local file."""
    return isinstance(path, str) and path.startswith(OBJECT_SCHEME)


def check_object_url(url: object, *, max_bytes: int = MAX_PATH_BYTES, max_depth: int = MAX_PATH_DEPTH) -> str:
    """`url` when it names one object, s3://bucket/key, as written: a valid bucket name, a key of at
    most 1024 bytes with no NUL or control character and no empty, "." or ".." segment, so that the
    key is the object's literal name and a prefix of it (allowed_roots) means what it says;
    InvalidSpec naming the value otherwise."""
    if not is_object_url(url):
        raise InvalidSpec(f"object URL must start with {OBJECT_SCHEME}, got {_short(url)}")
    assert isinstance(url, str)
    bucket, _, key = url[len(OBJECT_SCHEME):].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidSpec(f"not a valid bucket name in {_short(url)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise InvalidSpec(f"object URL must not contain control characters, got {_short(url)}")
    if not key or any(part in ("", ".", "..") for part in key.split("/")):
        raise InvalidSpec(f"object key must be non-empty with no empty, '.' or '..' segment, got {_short(url)}")
    try:
        size = len(key.encode())
    except UnicodeEncodeError as exc:
        raise InvalidSpec(f"object URL is not valid UTF-8 at character {exc.start}: {_short(url)}") from None
    if size > min(MAX_OBJECT_KEY_BYTES, max_bytes):
        raise InvalidSpec(f"object key is longer than {min(MAX_OBJECT_KEY_BYTES, max_bytes)} bytes ({size}): "
                          f"{_short(url)}")
    if key.count("/") + 1 > max_depth:
        raise InvalidSpec(f"object key is deeper than {max_depth} components: {_short(url)}")
    return url


def check_text(text: object, *, max_bytes: int = MAX_TEXT_BYTES, what: str = "text") -> str:
    """`text` when it is a str of valid UTF-8 without NUL bytes, at most `max_bytes` bytes encoded;
    InvalidSpec naming `what` and the value otherwise."""
    if not isinstance(text, str):
        raise InvalidSpec(f"{what} must be a str, got {type(text).__name__}")
    if "\0" in text:
        raise InvalidSpec(f"{what} must not contain NUL bytes, got {_short(text)}")
    try:
        size = len(text) if len(text) > max_bytes else len(text.encode())
    except UnicodeEncodeError as exc:
        raise InvalidSpec(f"{what} is not valid UTF-8 (a lone surrogate at character {exc.start})") from None
    if size > max_bytes:
        raise InvalidSpec(f"{what} is longer than {max_bytes} bytes of UTF-8 ({size}): {_short(text)}")
    return text


def _check_size(size: object) -> tuple[int, int]:
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        raise InvalidSpec(f"size must be (width, height), got {_short(size)}")
    w, h = size
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (w, h)):
        raise InvalidSpec(f"size must be two ints, got {_short(size)}")
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise InvalidSpec(f"size must be within 1..{MAX_SIDE} on each side, got {_short(size)}")
    return (w, h)


def _check_crop(crop: object) -> str | tuple[int, int, int, int]:
    if isinstance(crop, str) and crop in CROPS:
        return crop
    if isinstance(crop, (tuple, list)) and len(crop) == 4 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in crop):
        left, top, right, bottom = crop
        if not (0 <= left < right and 0 <= top < bottom):
            raise InvalidSpec(f"crop box must have 0 <= left < right and 0 <= top < bottom, got {_short(crop)}")
        return (left, top, right, bottom)
    raise InvalidSpec(f"crop must be one of {CROPS} or a (left, top, right, bottom) box, got {_short(crop)}")


def _check_flip(flip: object) -> bool:
    if not isinstance(flip, bool):
        raise InvalidSpec(f"flip must be a bool, got {_short(flip)}")
    return flip


class _ByWire:
    """Equality and hash by the canonical wire line, which says everything about a spec: a spec is
    hashed on every handle-cache lookup, and bytes keep their hash."""

    _wire: bytes

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._wire == self._wire  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._wire)


@dataclass(frozen=True, eq=False)
class ImageSpec(_ByWire):
    """An image file, resized to cover `size` (width, height), cropped, optionally flipped.

    `crop` is "center", "random" (seeded from the spec: the same spec is always the same crop),
    "none" (stretch to `size`), or a (left, top, right, bottom) box in source pixels.
    The path is made absolute here, since the daemon does not share the caller's working directory;
    an object URL (s3://bucket/key) is kept as written and never touches the local filesystem.
    A bad value raises InvalidSpec (a ValueError) naming it.
    """

    path: str
    size: tuple[int, int]
    crop: str | tuple[int, int, int, int] = "center"
    flip: bool = False
    _wire: bytes = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        path = _as_str(self.path)
        path = check_object_url(path) if is_object_url(path) else check_path(os.path.abspath(path))
        self._fill(path, self.size, self.crop, self.flip)

    @classmethod
    def _of_checked_path(cls, path: str, size: object, crop: object, flip: object) -> ImageSpec:
        """A spec whose path the caller checked against its own bounds (decode_spec)."""
        spec = object.__new__(cls)
        spec._fill(path, size, crop, flip)
        return spec

    def _fill(self, path: str, size: object, crop: object, flip: object) -> None:
        size = _check_size(size)
        crop = _check_crop(crop)
        flip = _check_flip(flip)
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "flip", flip)
        wire_crop = list(crop) if isinstance(crop, tuple) else crop
        object.__setattr__(self, "_wire", _line(["i", path, size[0], size[1], wire_crop, flip]))

    def wire_json(self) -> str:
        return self._wire.decode()


@dataclass(frozen=True, eq=False)
class TextSpec(_ByWire):
    """A text prompt for a text encoder: a str of valid UTF-8, no NUL byte, at most MAX_TEXT_BYTES."""

    text: str
    _wire: bytes = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        self._fill(check_text(self.text))

    @classmethod
    def _of_checked_text(cls, text: str) -> TextSpec:
        """A spec whose text the caller checked against its own bound (decode_spec)."""
        spec = object.__new__(cls)
        spec._fill(text)
        return spec

    def _fill(self, text: str) -> None:
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "_wire", _line(["t", text]))

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
        raise InvalidSpec(f"specs must be ImageSpec or TextSpec, got {type(bad).__name__}") from None


def decode_spec(line: bytes, *, max_path_bytes: int = MAX_PATH_BYTES, max_path_depth: int = MAX_PATH_DEPTH,
                max_text_bytes: int = MAX_TEXT_BYTES) -> Spec:
    """One line of a packed batch back into a spec; InvalidSpec (a ValueError) names what is wrong.

    Paths on the wire must be absolute: the client made them so, and a relative one would resolve
    against the daemon's working directory."""
    limit = line_limit(max_path_bytes, max_text_bytes)
    if len(line) > limit:
        raise InvalidSpec(f"spec line is longer than {limit} bytes ({len(line)})")
    item = _parse(line)
    if isinstance(item, list) and len(item) == 6 and item[0] == "i":
        _, path, w, h, crop, flip = item
        if is_object_url(path):
            path = check_object_url(path, max_bytes=max_path_bytes, max_depth=max_path_depth)
        else:
            path = os.path.normpath(check_path(path, max_bytes=max_path_bytes, max_depth=max_path_depth))
        return ImageSpec._of_checked_path(path, (w, h),
                                          tuple(crop) if isinstance(crop, list) else crop, flip)
    if isinstance(item, list) and len(item) == 2 and item[0] == "t":
        return TextSpec._of_checked_text(check_text(item[1], max_bytes=max_text_bytes))
    raise InvalidSpec(f"not a spec: {_short(item)}")


def _parse(line: bytes) -> Any:
    """The JSON value of a line of UTF-8 (never another encoding json.loads would guess from bytes)."""
    try:
        return json.loads(line.decode())
    except UnicodeDecodeError as exc:
        raise InvalidSpec(f"spec line is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except RecursionError:
        raise InvalidSpec("spec line is nested too deeply to be a spec") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more digits than int() takes
        raise InvalidSpec(f"spec line is not JSON: {exc}") from None
