"""Packed records that travel in GetResponse.handles and in lease releases.

A handle says where an entry's bytes are: segment id, byte offset and length of its slot, the slot's
generation, the layout id of its tensor table, and the lease the client now holds on it.
"""

from __future__ import annotations

import json

import numpy as np

__all__ = ["HANDLE", "pack_leases", "unpack_leases", "encode_layout", "decode_layout", "Layout"]

HANDLE = np.dtype([
    ("key", "S32"),       # raw blake2b-256 digest (numpy drops its trailing zero bytes on read: pad)
    ("lease", "<u8"),     # 0: no lease (failed item, or a warm that holds nothing)
    ("generation", "<u8"),
    ("offset", "<u8"),
    ("length", "<u8"),
    ("segment", "<u4"),
    ("layout", "<u4"),
])

# (name, dtype name, shape, offset from the slot start, nbytes)
Layout = tuple[tuple[str, str, tuple[int, ...], int, int], ...]


def pack_leases(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype="<u8").tobytes()


def unpack_leases(data: bytes) -> list[int]:
    if len(data) % 8:
        raise ValueError(f"lease list must be a multiple of 8 bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<u8").tolist()


def encode_layout(layout: Layout) -> str:
    return json.dumps([[n, d, list(s), o, b] for n, d, s, o, b in layout], separators=(",", ":"))


def decode_layout(text: str) -> Layout:
    return tuple((n, d, tuple(s), o, b) for n, d, s, o, b in json.loads(text))
