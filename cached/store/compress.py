"""Byte-shuffle + LZ4: the "lz4" compression of the disk tier.

Latents are floats whose low mantissa bytes are noise; plain LZ4 finds almost nothing to match in them
(bench/results/compression.md: ratio ~0.996, i.e. it grows the data). Splitting each tensor into byte
planes first puts the sign/exponent bytes of all elements side by side, where LZ4 does find repeats:

    elements  e0 = [a0 b0 c0 d0]  e1 = [a1 b1 c1 d1]  ...       (itemsize 4, little-endian)
    shuffled  a0 a1 a2 ... | b0 b1 b2 ... | c0 c1 ... | d0 d1 ...   (plane k = byte k of every element)

Every tensor is shuffled with its own itemsize, the shuffled tensors are laid back to back in layout
order, and the whole is one LZ4 block with no size prefix (the caller records the raw length).
Shuffling works on whole-array shifts of unsigned views, several GB/s in numpy, so decoding stays
faster than the disk it reads from.
"""

from __future__ import annotations

from collections.abc import Sequence

import lz4.block
import numpy as np

__all__ = ["CODECS", "NONE", "LZ4_SHUFFLE", "shuffle_into", "unshuffle_into", "pack", "unpack"]

NONE = "none"
LZ4_SHUFFLE = "lz4+shuffle"
CODECS = (NONE, LZ4_SHUFFLE)

_UINT = {2: np.dtype("<u2"), 4: np.dtype("<u4"), 8: np.dtype("<u8")}


def _bytes(buf: object) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.uint8)  # type: ignore[call-overload]


def shuffle_into(src: memoryview, itemsize: int, out: np.ndarray) -> None:
    """Writes the byte planes of `src` (elements of `itemsize` bytes) into the uint8 array `out`."""
    raw = _bytes(src)
    if itemsize == 1 or raw.size == 0:
        out[:] = raw
        return
    words = raw.view(_UINT[itemsize])
    n = words.size
    for k in range(itemsize):
        out[k * n:(k + 1) * n] = words >> (8 * k) if k else words  # assignment truncates to the low byte


def unshuffle_into(planes: np.ndarray, itemsize: int, out: memoryview) -> None:
    """Inverse of shuffle_into: interleaves the planes in `planes` back into elements in `out`."""
    dst = _bytes(out)
    if itemsize == 1 or dst.size == 0:
        dst[:] = planes
        return
    words = dst.view(_UINT[itemsize])
    n = words.size
    words[:] = planes[(itemsize - 1) * n:]
    for k in range(itemsize - 2, -1, -1):
        words <<= 8
        words |= planes[k * n:(k + 1) * n]


def pack(chunks: Sequence[tuple[memoryview, int]]) -> bytes:
    """One LZ4 block of the shuffled (buffer, itemsize) chunks, laid back to back."""
    total = sum(buf.nbytes for buf, _ in chunks)
    staged = np.empty(total, dtype=np.uint8)
    off = 0
    for buf, itemsize in chunks:
        shuffle_into(buf, itemsize, staged[off:off + buf.nbytes])
        off += buf.nbytes
    return lz4.block.compress(staged, store_size=False)


def unpack(block: memoryview, chunks: Sequence[tuple[int, int, int]], raw_bytes: int) -> bytearray:
    """Decodes a pack() block into one new buffer; `chunks` are (offset, nbytes, itemsize) in order.

    ValueError if the block is not valid LZ4 or does not decode to exactly `raw_bytes`.
    """
    try:
        planes = lz4.block.decompress(block, uncompressed_size=raw_bytes)
    except lz4.block.LZ4BlockError as exc:
        raise ValueError(f"bad LZ4 block ({exc})") from exc
    if len(planes) != raw_bytes:
        raise ValueError(f"LZ4 block decoded to {len(planes)} bytes, expected {raw_bytes}")
    src = _bytes(planes)
    out = bytearray(raw_bytes)
    view = memoryview(out)
    for off, nbytes, itemsize in chunks:
        unshuffle_into(src[off:off + nbytes], itemsize, view[off:off + nbytes])
    return out
