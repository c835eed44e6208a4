"""Packed records that travel in GetResponse.handles and in lease releases.

A handle says where an entry's bytes are: segment id, byte offset and length of its slot, the slot's
generation, the layout id of its tensor table, and the lease the client now holds on it.

A reply that does not decode (an array of the wrong length, ids it does not define, a tensor table
that is not one) is a ProtocolError: the client and the daemon disagree about the protocol.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Collection, Container

import numpy as np

from .errors import ProtocolError

__all__ = ["HANDLE", "pack_leases", "unpack_leases", "unpack_handles", "check_handles", "encode_layout",
           "decode_layout", "Layout", "SLOT_KEY", "SLOT_GENERATION", "NO_STAMP", "pack_stamps", "unpack_stamps"]

# where a sealed slot's header keeps its key and generation (cached/store/slot.py pins the format): a
# reader checks them after copying, to know the slot was not reused under it
SLOT_KEY = slice(8, 40)
SLOT_GENERATION = slice(40, 48)

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


def unpack_handles(data: bytes, count: int, failed: Collection[int], segments: Container[int],
                   layouts: Container[int]) -> list[tuple]:
    """The `count` records of a reply's handles, as tuples (fast to unpack); see check_handles."""
    return check_handles(data, count, failed, segments, layouts).tolist()


def check_handles(data: bytes, count: int, failed: Collection[int], segments: Container[int],
                  layouts: Container[int]) -> np.ndarray:
    """The `count` records of a reply's handles, as an array; ProtocolError unless there are exactly
    that many, every failed index is an item, and every other item names a segment and a layout of
    the reply."""
    if len(data) != count * HANDLE.itemsize:
        raise ProtocolError(f"reply has {len(data)} bytes of handles for {count} items of "
                            f"{HANDLE.itemsize} bytes: client and daemon disagree about the format")
    if any(not 0 <= j < count for j in failed):
        raise ProtocolError(f"reply has errors for items {sorted(failed)[:5]}... of a batch of {count}")
    records = np.frombuffer(data, dtype=HANDLE)
    held = np.delete(records, list(failed)) if failed else records
    for name, known in (("segment", segments), ("layout", layouts)):
        unknown = [i for i in set(held[name].tolist()) if i not in known]  # a few ids: cheaper than per item
        if unknown:
            raise ProtocolError(f"reply items name {name} ids {unknown[:5]}, which the reply does not define")
    return records


NO_STAMP = (0, 0, 0, 0, 0)  # a source stamp on the wire when there is none to trust


def pack_stamps(stamps: list[tuple[int, int, int, int, int]]) -> bytes:
    """GetResponse.stamps: 5 little-endian int64s per item (cached_client/stamp.py)."""
    return struct.pack(f"<{5 * len(stamps)}q", *itertools.chain.from_iterable(stamps))


def unpack_stamps(data: bytes, count: int) -> list[tuple[int, int, int, int, int] | None]:
    """Per item its source's stamp, None where the daemon has none to trust, or where it sent none
    at all (a daemon older than the field): such items are checked with a stamp of the client's
    own next time. ProtocolError for another count."""
    if not data:
        return [None] * count
    if len(data) != count * 40:
        raise ProtocolError(f"reply has {len(data)} bytes of stamps for {count} items of 40 bytes")
    flat = iter(struct.unpack(f"<{5 * count}q", data))
    return [None if s == NO_STAMP else s for s in zip(flat, flat, flat, flat, flat, strict=True)]


def encode_layout(layout: Layout) -> str:
    return json.dumps([[n, d, list(s), o, b] for n, d, s, o, b in layout], separators=(",", ":"))


def decode_layout(text: str) -> Layout:
    """A tensor table from its JSON; ProtocolError when it is not one."""
    try:
        return tuple((str(n), str(d), tuple(int(v) for v in s), int(o), int(b)) for n, d, s, o, b in json.loads(text))
    except (ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError(f"reply has a tensor table that is not one ({exc}): {text[:80]!r}") from None
