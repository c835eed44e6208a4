"""Byte-shuffle + LZ4: the "lz4" compression of the disk tier.

Latents are floats whose low mantissa bytes are noise; plain LZ4 finds nothing to match in them
(bench/results/compression.md: ratio 0.996, it grows the data). Split into byte planes, the
sign/exponent bytes of all elements sit side by side, where LZ4 does find repeats:

    elements  e0 = [a0 b0 c0 d0]  e1 = [a1 b1 c1 d1]  ...      (itemsize 4, little-endian)
    planes    a0 a1 a2 ... | b0 b1 b2 ... | c0 c1 ... | d0 d1 ...  (plane k = byte k of every element)

Each plane is stored on its own, in tensor order then plane order: as one LZ4 block (no size
prefix) when that saves at least MIN_PLANE_SAVING, else raw. The stored lengths are recorded; a
plane whose stored length equals its raw length is raw. Noise planes thus cost neither the LZ4
expansion nor its decode time, and decoding touches LZ4 only for the exponent planes.
Shuffling uses whole-array shifts of unsigned views (several GB/s in numpy, GIL released).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lz4.block
import numpy as np

__all__ = ["MODES", "CODECS", "NONE", "LZ4_SHUFFLE", "MIN_PLANE_SAVING", "shuffle", "unshuffle_into", "pack", "unpack"]

NONE = "none"
LZ4_SHUFFLE = "lz4+shuffle"
CODECS = (NONE, LZ4_SHUFFLE)
MODES = {"none": NONE, "lz4": LZ4_SHUFFLE}  # config.compression -> the codec entries are written with
MIN_PLANE_SAVING = 1 / 32

_UINT: dict[int, np.dtype[Any]] = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def _bytes(buf: object) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8)  # type: ignore[call-overload]


def shuffle(src: memoryview, itemsize: int) -> list[np.ndarray]:
    """The `itemsize` byte planes of `src` (elements of `itemsize` bytes), plane 0 first."""
    raw = _bytes(src)
    if raw.size == 0:
        return [raw] * itemsize
    if itemsize == 1:
        return [raw]
    words = raw.view(_UINT[itemsize])
    return [(words >> (8 * k) if k else words).astype(np.uint8) for k in range(itemsize)]


def unshuffle_into(planes: Sequence[np.ndarray], out: memoryview) -> None:
    """Inverse of shuffle: interleaves the planes (uint8 arrays, plane 0 first) into `out`."""
    dst = _bytes(out)
    if dst.size == 0:
        return
    if len(planes) == 1:
        dst[:] = planes[0]
        return
    words = dst.view(_UINT[len(planes)])
    words[:] = planes[-1]
    for plane in reversed(planes[:-1]):
        words <<= 8
        words |= plane


def pack(chunks: Sequence[tuple[memoryview, int]]) -> tuple[list[memoryview], list[int]]:
    """The stored planes of the (buffer, itemsize) chunks, in order, and their lengths."""
    stored: list[memoryview] = []
    for buf, itemsize in chunks:
        for plane in shuffle(buf, itemsize):
            block = lz4.block.compress(plane, store_size=False) if plane.size else b""
            keep = len(block) <= plane.size * (1 - MIN_PLANE_SAVING) and len(block) < plane.size
            stored.append(memoryview(block) if keep else plane.data)
    return stored, [s.nbytes for s in stored]


def _plane(data: memoryview, stored: int, size: int) -> np.ndarray:
    if stored == size:
        return _bytes(data)
    try:
        plane = lz4.block.decompress(data, uncompressed_size=size)
    except lz4.block.LZ4BlockError as exc:
        raise ValueError(f"bad LZ4 block ({exc})") from exc
    if len(plane) != size:
        raise ValueError(f"LZ4 block decoded to {len(plane)} bytes, expected {size}")
    return _bytes(plane)


def unpack(data: memoryview, chunks: Sequence[tuple[int, int]], stored: Sequence[int]) -> memoryview:
    """Decodes pack()ed planes into one new buffer. `chunks` are each tensor's (nbytes, itemsize) in
    order, `stored` the planes' stored lengths. ValueError when they disagree or a block is bad."""
    if len(stored) != sum(itemsize for _, itemsize in chunks) or sum(stored) != data.nbytes:
        raise ValueError(f"{len(stored)} planes of {sum(stored)} bytes do not match the layout and data")
    view = np.empty(sum(nbytes for nbytes, _ in chunks), dtype=np.uint8).data  # no zero-fill
    at = off = i = 0
    for nbytes, itemsize in chunks:
        planes = []
        for _ in range(itemsize):
            planes.append(_plane(data[at:at + stored[i]], stored[i], nbytes // itemsize))
            at += stored[i]
            i += 1
        unshuffle_into(planes, view[off:off + nbytes])
        off += nbytes
    return view
