"""Byte-shuffle + LZ4 round trips, damaged blocks, and the per-entry fallback to no compression."""

from __future__ import annotations

import lz4.block
import numpy as np
import pytest

from cached.store import compress, diskformat
from cached.store.slot import TensorBytes


def _join(stored: list[memoryview]) -> memoryview:
    return memoryview(b"".join(bytes(s) for s in stored))


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32, np.float64])
def test_shuffle_splits_bytes_into_planes_and_back(dtype: type) -> None:
    arr = np.random.default_rng(0).standard_normal(1001).astype(dtype)
    planes = compress.shuffle(memoryview(arr).cast("B"), arr.itemsize)
    as_bytes = arr.view(np.uint8).reshape(-1, arr.itemsize)
    assert len(planes) == arr.itemsize
    for k, plane in enumerate(planes):  # plane k holds byte k of every element
        assert np.array_equal(plane, as_bytes[:, k])
    out = bytearray(arr.nbytes)
    compress.unshuffle_into(planes, memoryview(out))
    assert bytes(out) == arr.tobytes()


def test_pack_and_unpack_mixed_itemsizes_at_unaligned_offsets() -> None:
    rng = np.random.default_rng(1)
    parts = [np.array([True, False, True]), np.linspace(0, 1, 33, dtype=np.float32),
             rng.standard_normal(7).astype(np.float16), np.arange(5, dtype=np.int64), np.zeros(0, np.float32)]
    stored, lengths = compress.pack([(memoryview(p.reshape(-1).view(np.uint8)), p.itemsize) for p in parts])
    assert len(lengths) == 1 + 4 + 2 + 8 + 4
    out = compress.unpack(_join(stored), [(p.nbytes, p.itemsize) for p in parts], lengths)
    assert bytes(out) == b"".join(p.tobytes() for p in parts)


def test_noise_planes_are_stored_raw_and_exponent_planes_compressed() -> None:
    import torch

    noise = torch.randn(4, 64, 64).numpy()
    _, lengths = compress.pack([(memoryview(noise.reshape(-1).view(np.uint8)), 4)])
    plane = noise.size
    assert lengths[:3] == [plane] * 3  # mantissa bytes: LZ4 would only grow them
    assert lengths[3] < 0.8 * plane  # sign and exponent


def test_damaged_planes_are_a_value_error() -> None:
    data = np.linspace(0, 1, 4096, dtype=np.float32)
    stored, lengths = compress.pack([(memoryview(data).cast("B"), 4)])
    joined = bytes(_join(stored))
    with pytest.raises(ValueError, match="do not match"):
        compress.unpack(memoryview(joined[:-5]), [(data.nbytes, 4)], lengths)
    k = next(i for i, n in enumerate(lengths) if n < data.size)  # an LZ4 plane
    lengths[k] -= 5
    with pytest.raises(ValueError):
        compress.unpack(memoryview(joined[:-5]), [(data.nbytes, 4)], lengths)
    with pytest.raises(ValueError, match="do not match"):
        compress.unpack(memoryview(joined), [(data.nbytes, 2)], lengths)


def test_shuffling_is_what_makes_float_latents_compress() -> None:
    import torch

    noise = torch.randn(16, 64, 64).bfloat16().view(torch.int16).numpy()
    raw = memoryview(noise.reshape(-1).view(np.uint8))
    plain = lz4.block.compress(raw, store_size=False)
    _, lengths = compress.pack([(raw, 2)])
    assert len(plain) >= 0.99 * raw.nbytes  # LZ4 alone finds nothing in float bytes
    assert sum(lengths) < 0.9 * raw.nbytes


def test_an_entry_that_does_not_compress_is_stored_plain() -> None:
    noise = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8)
    t = {"x": TensorBytes("uint8", (4096,), memoryview(noise))}
    enc = diskformat.encode(bytes(32), t, {}, compress.LZ4_SHUFFLE)
    assert enc.codec == compress.NONE
    smooth = np.linspace(0, 1, 4096, dtype=np.float32)
    t = {"x": TensorBytes("float32", (4096,), memoryview(smooth).cast("B"))}
    enc = diskformat.encode(bytes(32), t, {}, compress.LZ4_SHUFFLE)
    assert enc.codec == compress.LZ4_SHUFFLE and enc.size < enc.raw_bytes
    tensors, _ = diskformat.decode(memoryview(b"".join(bytes(c) for c in enc.chunks)), bytes(32))
    assert bytes(tensors["x"].data) == smooth.tobytes()
