"""The file of one disk-tier entry: a valid safetensors file, self-describing and checksummed.

    offset  size  field
    0       8     N: header length, little-endian u64 (as safetensors)
    8       N     header: compact JSON, keys sorted, padded with spaces so that 8 + N is a multiple of 64
    8 + N   D     data section

Header with codec "none": an ordinary safetensors file (`safetensors.safe_open` reads every tensor):

    {"__metadata__":{...},"latent":{"data_offsets":[0,16384],"dtype":"F32","shape":[4,32,32]}}

Header with codec "lz4+shuffle": still valid safetensors, one U8 tensor holds the stored byte planes
of every tensor (compress.py), each an LZ4 block or raw, back to back:

    {"__metadata__":{...},"cached.lz4":{"data_offsets":[0,D],"dtype":"U8","shape":[D]}}

`__metadata__` (every value a string, as safetensors requires):

    cached.format     "1"
    cached.key        the entry key, 64 hex digits; also the file name
    cached.codec      "none" | "lz4+shuffle"
    cached.layout     JSON [[name, dtype, shape, offset, nbytes], ...], name order, packed back to back
                      from 0 in the decoded data (which is the data section itself for "none")
    cached.raw_bytes  length of the decoded data
    cached.planes     "lz4+shuffle" only: JSON [stored length of each plane], tensors in layout order,
                      planes 0..itemsize-1 within each; equal to the raw plane length means raw
    cached.xxh3       XXH3-128 (32 hex digits) of the whole file as written with these 32 digits as "0"s
    anything else     the entry's meta (encoder, source, spec, ...), verbatim

The checksum covers the length prefix, every header byte (padding included) and the data, so any
flipped or missing byte is caught. XXH3 hashes at ~30-60 GB/s here, blake2b at ~0.4 GB/s: a 256 KiB
latent costs ~5-10 us to verify.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass

import xxhash

from . import compress
from .slot import TensorBytes

__all__ = ["FORMAT", "Encoded", "CorruptEntry", "encode", "decode", "DTYPES", "ALIGN"]

FORMAT = "1"
ALIGN = 64
MAX_HEADER = 1 << 24
PREFIX = struct.Struct("<Q")
SUM_KEY = "cached.xxh3"
ZERO_SUM = "0" * 32
LZ4_TENSOR = "cached.lz4"

# torch dtype name -> (safetensors dtype, itemsize)
DTYPES: dict[str, tuple[str, int]] = {
    "float64": ("F64", 8), "float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2),
    "float8_e4m3fn": ("F8_E4M3", 1), "float8_e5m2": ("F8_E5M2", 1),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1),
    "uint64": ("U64", 8), "uint32": ("U32", 4), "uint16": ("U16", 2), "uint8": ("U8", 1), "bool": ("BOOL", 1),
}

Layout = list[tuple[str, str, tuple[int, ...], int, int]]


class CorruptEntry(ValueError):
    """The bytes are not a whole, intact entry file (truncated, flipped, foreign or misnamed)."""


@dataclass(frozen=True)
class Encoded:
    """An entry ready to write: `chunks` in order make the file; `size` is their total."""

    chunks: list[memoryview]
    size: int
    raw_bytes: int
    codec: str


def _layout(tensors: dict[str, TensorBytes]) -> Layout:
    layout: Layout = []
    off = 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype must be one of {sorted(DTYPES)}, got {t.dtype!r}")
        shape = tuple(int(d) for d in t.shape)
        if t.nbytes != math.prod(shape) * DTYPES[t.dtype][1]:
            raise ValueError(f"tensor {name!r}: {t.nbytes} bytes do not hold {t.dtype} {list(shape)}")
        layout.append((name, t.dtype, shape, off, t.nbytes))
        off += t.nbytes
    return layout


def _flat(data: memoryview) -> memoryview:
    if data.nbytes == 0:
        return memoryview(b"")
    return data if data.ndim == 1 and data.format == "B" else data.cast("B")


def _check_meta(meta: dict[str, str]) -> None:
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"meta must map str to str, got {k!r}: {v!r:.80}")
        if k.startswith(("cached.", "__")):
            raise ValueError(f"meta key {k!r} is reserved (cached.* and __*)")


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"))


def _header(key: bytes, layout: Layout, meta: dict[str, str], codec: str, planes: list[int]) -> bytes:
    raw = sum(e[4] for e in layout)
    stored = sum(planes) if codec != compress.NONE else raw
    md = {**meta, "cached.format": FORMAT, "cached.key": key.hex(), "cached.codec": codec,
          "cached.layout": _compact([list(e) for e in layout]), "cached.raw_bytes": str(raw), SUM_KEY: ZERO_SUM}
    if codec != compress.NONE:
        md["cached.planes"] = _compact(planes)
    head: dict[str, object] = {"__metadata__": md}
    if codec == compress.NONE:
        for name, dtype, shape, off, nbytes in layout:
            head[name] = {"data_offsets": [off, off + nbytes], "dtype": DTYPES[dtype][0], "shape": list(shape)}
    else:
        head[LZ4_TENSOR] = {"data_offsets": [0, stored], "dtype": "U8", "shape": [stored]}
    text = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    pad = -(PREFIX.size + len(text)) % ALIGN
    return PREFIX.pack(len(text) + pad) + text + b" " * pad


def _sum_field(digest: str) -> bytes:
    return f'"{SUM_KEY}":"{digest}"'.encode()


def encode(key: bytes, tensors: dict[str, TensorBytes], meta: dict[str, str], codec: str,
           min_saving: float = 0.03) -> Encoded:
    """The file bytes of an entry. With "lz4+shuffle", an entry that compresses by less than
    `min_saving` is stored with codec "none" instead, so its reads stay zero-copy."""
    if len(key) != 32:
        raise ValueError(f"key must be 32 bytes, got {len(key)}")
    if codec not in compress.CODECS:
        raise ValueError(f"codec must be one of {compress.CODECS}, got {codec!r}")
    _check_meta(meta)
    layout = _layout(tensors)
    raw = sum(e[4] for e in layout)
    data = [_flat(tensors[e[0]].data) for e in layout]
    planes: list[int] = []
    if codec != compress.NONE and raw:
        packed, planes = compress.pack([(buf, DTYPES[e[1]][1]) for buf, e in zip(data, layout, strict=True)])
        if sum(planes) <= raw * (1 - min_saving):
            data = packed
        else:
            codec = compress.NONE
    else:
        codec = compress.NONE
    stored = sum(d.nbytes for d in data)
    head = _header(key, layout, meta, codec, planes)
    h = xxhash.xxh3_128(head)
    for d in data:
        h.update(d)
    head = head.replace(_sum_field(ZERO_SUM), _sum_field(h.hexdigest()), 1)
    return Encoded([memoryview(head), *data], len(head) + stored, raw, codec)


def _parse_header(buf: memoryview) -> tuple[int, bytes, dict]:
    if buf.nbytes < PREFIX.size:
        raise CorruptEntry(f"truncated: {buf.nbytes} bytes")
    (n,) = PREFIX.unpack_from(buf, 0)
    if n > min(MAX_HEADER, buf.nbytes - PREFIX.size):
        raise CorruptEntry(f"header length {n} does not fit a {buf.nbytes}-byte file")
    text = bytes(buf[PREFIX.size:PREFIX.size + n])
    try:
        head = json.loads(text)
        md = head["__metadata__"]
        if md["cached.format"] != FORMAT:
            raise CorruptEntry(f"format {md['cached.format']!r}, expected {FORMAT!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptEntry(f"unreadable header ({exc})") from exc
    return PREFIX.size + n, text, head


def _stored_bytes(head: dict, codec: str) -> int:
    if codec == compress.NONE:
        return int(head["__metadata__"]["cached.raw_bytes"])
    if codec == compress.LZ4_SHUFFLE:
        return int(head[LZ4_TENSOR]["data_offsets"][1])
    raise CorruptEntry(f"unknown codec {codec!r}")


def _verify(buf: memoryview, start: int, text: bytes, digest: str) -> None:
    field = _sum_field(digest)
    if not re.fullmatch(r"[0-9a-f]{32}", digest) or text.count(field) != 1:
        raise CorruptEntry("checksum field is damaged")
    h = xxhash.xxh3_128(buf[:PREFIX.size])
    h.update(text.replace(field, _sum_field(ZERO_SUM)))
    h.update(buf[start:])
    if h.hexdigest() != digest:
        raise CorruptEntry(f"checksum mismatch (stored {digest}, computed {h.hexdigest()})")


def _read_layout(md: dict, raw_bytes: int) -> Layout:
    layout: Layout = []
    off = 0
    for name, dtype, shape, start, nbytes in json.loads(md["cached.layout"]):
        if dtype not in DTYPES or start != off or nbytes != math.prod(shape) * DTYPES[dtype][1]:
            raise CorruptEntry(f"inconsistent layout entry {name!r}")
        layout.append((name, dtype, tuple(shape), start, nbytes))
        off += nbytes
    if off != raw_bytes:
        raise CorruptEntry(f"layout covers {off} bytes, raw_bytes says {raw_bytes}")
    return layout


def decode(buf: memoryview, key: bytes | None = None) -> tuple[dict[str, TensorBytes], dict[str, str]]:
    """Tensors and meta of the entry file in `buf`; CorruptEntry unless it is whole and intact.

    With codec "none" the tensors are views of `buf` (no copy); with "lz4+shuffle" they are views of
    one new buffer the block is decoded into.
    """
    start, text, head = _parse_header(buf)
    md = head["__metadata__"]
    try:
        codec = md["cached.codec"]
        stored = _stored_bytes(head, codec)
        raw_bytes = int(md["cached.raw_bytes"])
        if start + stored != buf.nbytes:
            raise CorruptEntry(f"file is {buf.nbytes} bytes, header says {start + stored}")
        _verify(buf, start, text, md[SUM_KEY])
        if key is not None and md["cached.key"] != key.hex():
            raise CorruptEntry(f"file holds key {md['cached.key']}, expected {key.hex()}")
        layout = _read_layout(md, raw_bytes)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        if isinstance(exc, CorruptEntry):
            raise
        raise CorruptEntry(f"bad header field ({exc!r})") from exc
    data = buf[start:]
    if codec == compress.LZ4_SHUFFLE:
        chunks = [(nbytes, DTYPES[dtype][1]) for _, dtype, _, _, nbytes in layout]
        try:
            data = compress.unpack(data, chunks, json.loads(md["cached.planes"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptEntry(f"bad compressed data ({exc})") from exc
    tensors = {name: TensorBytes(dtype, shape, data[off:off + nbytes])
               for name, dtype, shape, off, nbytes in layout}
    return tensors, {k: v for k, v in md.items() if not k.startswith("cached.")}
