"""safetensors vs fastsafetensors: time to get every tensor of a weights file onto a device.

Writes a ~200 MB file shaped like a VAE's convolutions, then loads it repeatedly with each reader,
from the page cache (warm) and after evicting the file's pages (cold, posix_fadvise DONTNEED), and
reports the median of load alone and of load plus one pass over every byte (mmap-backed tensors pay
their page faults there). The fastest CPU reader is what `cached/encoders/loading.py` uses on the
CPU; CUDA devices are measured too when present. Usage:

    python bench/weights_load.py [--size-mb 200] [--repeats 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable

import torch
from common import RESULTS, machine, median, table, write_result
from safetensors.torch import load_file, save_file

from cached.encoders.loading import fastsafetensors_available, read_safetensors

Loader = Callable[[str, str], dict[str, torch.Tensor]]


def write_weights(directory: str, size_mb: int) -> str:
    """Conv weights (512, 512, 3, 3) fp32 with their biases, until the file reaches size_mb."""
    tensors, total, i = {}, 0, 0
    while total < size_mb << 20:
        tensors[f"block.{i}.conv.weight"] = torch.randn(512, 512, 3, 3)
        tensors[f"block.{i}.conv.bias"] = torch.randn(512)
        total += 512 * 512 * 9 * 4 + 512 * 4
        i += 1
    path = os.path.join(directory, "weights.safetensors")
    save_file(tensors, path)
    return path


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fast(odirect: bool) -> Loader:
    def load(path: str, device: str) -> dict[str, torch.Tensor]:
        os.environ["FASTSAFETENSORS_ODIRECT"] = "1" if odirect else "0"
        return read_safetensors([path], device, reader="fastsafetensors")
    return load


def readers() -> dict[str, Loader]:
    out: dict[str, Loader] = {"safetensors load_file": lambda p, d: load_file(p, device=d)}
    if fastsafetensors_available():
        out["fastsafetensors, O_DIRECT"] = fast(True)
        out["fastsafetensors, buffered"] = fast(False)
    return out


def touch(state: dict[str, torch.Tensor]) -> None:
    for t in state.values():
        t.view(-1)[:: max(1, 1024 // t.element_size())].sum()  # one element per 1 KiB: every page
    if any(t.is_cuda for t in state.values()):
        torch.cuda.synchronize()


def measure(load: Loader, path: str, device: str, cold: bool, repeats: int) -> tuple[float, float]:
    loads, totals = [], []
    for _ in range(repeats):
        if cold:
            evict(path)
        t0 = time.perf_counter()
        state = load(path, device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        touch(state)
        loads.append(t1 - t0)
        totals.append(time.perf_counter() - t0)
        del state
        gc.collect()
    return median(loads), median(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write the file (a disk, not tmpfs)")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="weights_load_", dir=args.dir)
    try:
        path = write_weights(work, args.size_mb)
        size = os.path.getsize(path) / (1 << 20)
        devices = ["cpu"] + ([f"cuda:{torch.cuda.current_device()}"] if torch.cuda.is_available() else [])
        rows = []
        for device in devices:
            for cold in (False, True):
                for name, load in readers().items():
                    t_load, t_all = measure(load, path, device, cold, args.repeats)
                    rows.append([device, "cold" if cold else "warm", name, f"{t_load * 1000:.0f}",
                                 f"{t_all * 1000:.0f}", f"{size / t_all / 1024:.2f}"])
                    print(" | ".join(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = ["device", "page cache", "reader", "load ms", "load + touch ms", "GiB/s"]
    info = "\n".join(f"- {k}: {v}" for k, v in machine().items())
    text = (f"# Weights load: safetensors vs fastsafetensors\n\n{size:.0f} MiB file, median of "
            f"{args.repeats}; cold = the file's pages evicted first.\n\n{info}\n\n{table(header, rows)}\n")
    print(text)
    print("wrote", write_result(RESULTS, "weights_load.md", text))


if __name__ == "__main__":
    main()
