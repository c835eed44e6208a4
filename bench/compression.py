"""Disk-tier compression: which LZ4 variant the "lz4" mode uses, and what a disk hit costs with it.

Latent kinds (one array per entry, as the tier stores them):
- VAE fp32 / bf16: the tiny random-weight AutoencoderKL of cached_testing.fixtures, run in-process in that
  dtype on synthetic photos (write_images), output scaling_factor * mean as the daemon stores it;
- noise bf16: normal noise shaped like a Flux latent (16 x 128 x 128), the statistics of a real
  scaled latent (mean 0, std 1) without a real VAE.

Variants: plain LZ4 block; byte-shuffle (compress.py: byte k of every element in plane k) then
one LZ4 block; byte-shuffle then one LZ4 block per plane, planes LZ4 cannot shrink stored raw (what
the "lz4" mode keeps). GB/s are of raw (decoded) bytes, one thread. Decompress includes unshuffling into the
final buffer. Then DiskTier.get on the same entries, compression "none" vs "lz4": warm (page cache)
and cold (each file dropped from the page cache with posix_fadvise DONTNEED first).

    python bench/compression.py [--images 16] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable

import lz4.block
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # cached_testing: tiny models

from common import RESULTS, machine, table, write_result  # noqa: E402

from cached.store import compress  # noqa: E402
from cached.store.disk import DiskTier  # noqa: E402
from cached.store.slot import TensorBytes  # noqa: E402

Items = list[np.ndarray]


def vae_latents(n: int, size: int, workdir: str) -> dict[str, tuple[Items, str]]:
    import torch
    from diffusers import AutoencoderKL
    from PIL import Image

    from cached_testing.fixtures import build_tiny_vae, write_images

    path = build_tiny_vae(os.path.join(workdir, "vae"))
    images = write_images(os.path.join(workdir, "img"), n, sizes=[(size, size)])
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32))
                          .permute(2, 0, 1) / 127.5 - 1 for p in images])
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype).eval()
        with torch.inference_mode():
            mean = torch.cat([vae.encode(pixels[i:i + 4].to(dtype)).latent_dist.mean for i in range(0, n, 4)])
        lat = (mean * vae.config.scaling_factor).to(dtype)
        raw = lat.view(torch.int16) if dtype == torch.bfloat16 else lat
        out[f"VAE {name} {tuple(lat.shape[1:])}"] = ([raw[i].numpy().copy() for i in range(n)], str(dtype)[6:])
    return out


def noise_latents(n: int) -> dict[str, tuple[Items, str]]:
    import torch

    g = torch.Generator().manual_seed(0)
    lat = torch.randn(n, 16, 128, 128, generator=g).bfloat16().view(torch.int16)
    return {"noise bf16 (16, 128, 128)": ([lat[i].numpy().copy() for i in range(n)], "bfloat16")}


def _u8(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))


def _plain(a: np.ndarray) -> list[bytes]:
    return [lz4.block.compress(a, store_size=False)]


def _plain_dec(blocks: list[bytes], a: np.ndarray) -> object:
    return lz4.block.decompress(blocks[0], uncompressed_size=a.nbytes)


def _one_block(a: np.ndarray) -> list[bytes]:
    return [lz4.block.compress(np.concatenate(compress.shuffle(_u8(a), a.itemsize)), store_size=False)]


def _one_block_dec(blocks: list[bytes], a: np.ndarray) -> object:
    planes = np.frombuffer(lz4.block.decompress(blocks[0], uncompressed_size=a.nbytes), np.uint8)
    out = bytearray(a.nbytes)
    compress.unshuffle_into(np.split(planes, a.itemsize), memoryview(out))
    return out


def _planes(a: np.ndarray) -> list[bytes]:
    return [bytes(p) for p in compress.pack([(_u8(a), a.itemsize)])[0]]


def _planes_dec(blocks: list[bytes], a: np.ndarray) -> object:
    data = memoryview(b"".join(blocks))
    return compress.unpack(data, [(a.nbytes, a.itemsize)], [len(b) for b in blocks])


Codec = tuple[Callable[[np.ndarray], list[bytes]], Callable[[list[bytes], np.ndarray], object]]
VARIANTS: dict[str, Codec] = {
    "lz4": (_plain, _plain_dec),
    "shuffle + one lz4 block": (_one_block, _one_block_dec),
    "shuffle + lz4 per plane (kept)": (_planes, _planes_dec),
}


def _best_s(fn: Callable[[], object], reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_codecs(kinds: dict[str, tuple[Items, str]]) -> list[list[object]]:
    rows = []
    for kind, (items, _) in kinds.items():
        raw = sum(a.nbytes for a in items)
        for variant, (enc, dec) in VARIANTS.items():
            blocks = [enc(a) for a in items]
            for a, b in zip(items, blocks, strict=True):
                assert bytes(dec(b, a)) == a.tobytes()
            ct = _best_s(lambda: [enc(a) for a in items])  # noqa: B023
            dt = _best_s(lambda: [dec(b, a) for a, b in zip(items, blocks, strict=True)])  # noqa: B023
            ratio = raw / sum(len(b) for bs in blocks for b in bs)
            rows.append([kind, variant, f"{ratio:.3f}", f"{raw / ct / 1e9:.2f}", f"{raw / dt / 1e9:.2f}",
                         f"{ratio * raw / dt / 1e9:.2f}"])
    return rows


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_hits(kind: str, items: Items, dtype: str, workdir: str) -> list[list[object]]:
    rows = []
    raw = sum(a.nbytes for a in items)
    for comp in ("none", "lz4"):
        directory = os.path.join(workdir, f"disk-{comp}")
        with DiskTier(directory, 1 << 34, comp) as tier:
            keys = [i.to_bytes(32, "little") for i in range(len(items))]
            for key, a in zip(keys, items, strict=True):
                tier.put(key, {"latent": TensorBytes(dtype, a.shape, memoryview(a.reshape(-1).view(np.uint8)))},
                         {"encoder": "vae", "source": ""})
            on_disk = tier.stats()["bytes"]

            def read_all() -> None:
                for key in keys:  # noqa: B023
                    tensors, _ = tier.get(key)  # noqa: B023
                    bytes(tensors["latent"].data[:1])  # touch, as a copy into shm would

            warm = _best_s(read_all)
            cold = float("inf")
            for _ in range(3):
                for key in keys:
                    _drop_cache(tier._path(key))
                cold = min(cold, _best_s(read_all, reps=1))
        for label, t in (("warm", warm), ("cold", cold)):
            rows.append([kind, comp, label, f"{on_disk / len(items) / 1024:.0f}",
                         f"{t / len(items) * 1e6:.0f}", f"{raw / t / 1e9:.2f}"])
    return rows


def decision(codec_rows: list[list[object]]) -> str:
    """Which variant wins on ratio x decode speed, among those that shrink the data at all."""
    lines = []
    for kind in dict.fromkeys(r[0] for r in codec_rows):
        rows = [r for r in codec_rows if r[0] == kind]
        growing = [str(r[1]) for r in rows if float(str(r[2])) <= 1.0]
        shrinking = [r for r in rows if float(str(r[2])) > 1.0]
        best = max(shrinking, key=lambda r: float(str(r[5])), default=None)
        verdict = f"**{best[1]}** wins ({best[2]}x, {best[4]} GB/s decode)" if best else "nothing shrinks it"
        lines.append(f"- {kind}: {verdict}; {', '.join(growing) or 'none'} grow the data (ratio <= 1), so they "
                     f"lose to storing it raw on both size and time")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        kinds = {**vae_latents(args.images, args.size, workdir), **noise_latents(args.images)}
        codec_rows = measure_codecs(kinds)
        hit_rows = []
        for kind in (k for k in kinds if "fp32" in k or "noise" in k):
            hit_rows += measure_hits(kind, *kinds[kind], workdir)
    info = machine()
    text = "\n\n".join([
        "# Disk-tier compression",
        f"`python bench/compression.py --images {args.images} --size {args.size}` on {info['cpu']}, "
        f"{info['ram']} RAM, kernel {info['kernel']}, load average {info.get('load average (1 min) at start', '?')}, "
        f"torch {info['torch']}, lz4 {lz4.library_version_string()}. {args.images} entries per kind, one thread, "
        "best of 5 passes.",
        "## Codecs\n\nGB/s of raw bytes; \"ratio x decode\" is the decoded GB/s per GB/s read from disk.",
        table(["latents", "variant", "ratio", "compress GB/s", "decompress GB/s", "ratio x decode"], codec_rows),
        "## Decision\n\n" + decision(codec_rows) + "\n\nThe `lz4` mode therefore stores byte planes, each "
        "LZ4-compressed or raw (cached/store/compress.py), and an entry that shrinks by less than 3% is "
        "stored uncompressed so its hits stay zero-copy.",
        "## DiskTier.get\n\nWarm: files in the page cache. Cold: each file dropped from the page cache "
        "(posix_fadvise DONTNEED) before the pass. GB/s of decoded bytes.",
        table(["latents", "compression", "cache", "KiB per entry on disk", "us per hit", "GB/s"], hit_rows),
    ])
    print(text)
    print("wrote", write_result(RESULTS, "compression.md", text))


if __name__ == "__main__":
    main()
