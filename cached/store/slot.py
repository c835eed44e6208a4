"""The byte format of one sealed entry in a shared-memory arena.

    offset  size  field
    0       8     magic b"CACHEDS" + format version byte (1)
    8       32    key: raw blake2b-256 digest
    40      8     generation, little-endian u64 (bumped on every write of any slot)
    48      4     length of the layout JSON, little-endian u32
    52      4     reserved, zero
    56      n     layout JSON: [[name, dtype, shape, offset, nbytes], ...]
    ...           zero padding to a 64-byte boundary, then each tensor at its offset, 64-byte aligned

The header makes a slot readable on its own (cachectl inspect, debugging); clients take the layout
from the Get reply instead, parsed once per layout id, so a hit does not parse JSON.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cached_client.wire import Layout, encode_layout

__all__ = ["MAGIC", "HEADER", "TensorBytes", "plan_slot", "write_slot", "read_header"]

MAGIC = b"CACHEDS\x01"
HEADER = struct.Struct("<8s32sQII")
ALIGN = 64


@dataclass(frozen=True)
class TensorBytes:
    """A tensor as the store sees it: a dtype name (torch's, e.g. "bfloat16"), a shape, raw bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_slot(tensors: dict[str, TensorBytes]) -> tuple[Layout, bytes, int]:
    """The layout, the layout JSON and the total slot length for these tensors (in name order)."""
    # Offsets depend on the JSON length, which depends on the offsets; two passes settle it since
    # the second pass only grows the data start by a whole ALIGN step at most once.
    start = 0
    for _ in range(3):
        layout: list[tuple[str, str, tuple[int, ...], int, int]] = []
        off = start
        for name in sorted(tensors):
            t = tensors[name]
            layout.append((name, t.dtype, tuple(t.shape), off, t.nbytes))
            off = _align(off + t.nbytes)
        text = encode_layout(tuple(layout)).encode()
        needed = _align(HEADER.size + len(text))
        if needed <= start:
            return tuple(layout), text, max(off, start)
        start = needed
    raise AssertionError("slot layout did not settle")


def write_slot(buf: memoryview, key: bytes, generation: int, layout: Layout, layout_json: bytes,
               tensors: dict[str, TensorBytes]) -> None:
    """Writes header and tensors into `buf`, which is exactly the slot's bytes."""
    HEADER.pack_into(buf, 0, MAGIC, key, generation, len(layout_json), 0)
    end = HEADER.size + len(layout_json)
    buf[HEADER.size:end] = layout_json
    first = layout[0][3] if layout else end
    buf[end:first] = bytes(first - end)
    for name, _, _, off, nbytes in layout:
        buf[off:off + nbytes] = tensors[name].data.cast("B")


def read_header(buf: memoryview) -> tuple[bytes, int, bytes]:
    """(key, generation, layout JSON) of the slot at the start of `buf`; ValueError if not a slot."""
    magic, key, generation, n, _ = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ValueError(f"not a cached slot (magic {magic!r})")
    return key, generation, bytes(buf[HEADER.size:HEADER.size + n])
