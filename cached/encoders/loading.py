"""Loading weights onto a device: safetensors files read straight onto the target device and assigned
into a model built without weights, with the library's own `from_pretrained` as the fallback.

Readers, chosen by measurement (bench/weights_load.py, bench/results/weights_load.md):
- CUDA devices: fastsafetensors when it is installed (GPUDirect Storage when /dev/nvidia-fs0 exists,
  its `nogds` bounce-buffer copier otherwise): file -> GPU memory without a pageable CPU copy.
- everything else: safetensors (`load_file`), which beat fastsafetensors' `nogds` reads on the CPU:
  207 MiB, load + touch every page, 2-core EPYC: 8 ms vs 256 ms from the page cache, 283 ms vs
  293 ms (O_DIRECT) cold.
fastsafetensors is optional: without it CUDA devices use safetensors too.

The fast path builds the model under `accelerate.init_empty_weights` (parameters on the meta device,
buffers real), assigns the tensors read, ties weights and checks nothing is left on the meta device.
It steps aside for `from_pretrained` (then `.to(device)`) whenever it could differ from it: keys it
does not recognise (legacy names the library converts), parameters it cannot fill, or a model that
keeps some modules in fp32 at a lower dtype.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable

import torch

__all__ = ["READERS", "weight_files", "choose_reader", "fastsafetensors_available", "read_safetensors", "load_model"]

log = logging.getLogger(__name__)

READERS = ("safetensors", "fastsafetensors")

ModelFactory = Callable[[], torch.nn.Module]


def weight_files(directory: str, stem: str) -> list[str]:
    """The safetensors files a library would load from `directory`: those of `{stem}.safetensors`'s
    shard index, else `{stem}.safetensors`, else every *.safetensors there (variants such as
    `{stem}.fp16.safetensors` are not loaded next to the main file)."""
    index = os.path.join(directory, f"{stem}.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        return [os.path.join(directory, s) for s in shards]
    main = os.path.join(directory, f"{stem}.safetensors")
    if os.path.isfile(main):
        return [main]
    return sorted(glob.glob(os.path.join(directory, "*.safetensors")))


def fastsafetensors_available() -> bool:
    return importlib.util.find_spec("fastsafetensors") is not None


def choose_reader(device: str) -> str:
    """The reader for a device: fastsafetensors onto CUDA when installed, safetensors elsewhere."""
    if torch.device(device).type == "cuda" and fastsafetensors_available():
        return "fastsafetensors"
    return "safetensors"


def read_safetensors(files: list[str], device: str, reader: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of `files`, on `device`, in the files' dtypes."""
    reader = reader or choose_reader(device)
    if reader == "fastsafetensors":
        return _read_fastsafetensors(files, device)
    if reader != "safetensors":
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(path, device=device))
    return state


def _read_fastsafetensors(files: list[str], device: str) -> dict[str, torch.Tensor]:
    from fastsafetensors import fastsafe_open

    # GDS needs the nvidia-fs driver; probing cuFile without it is what fastsafetensors warns about.
    nogds = torch.device(device).type != "cuda" or not os.path.exists("/dev/nvidia-fs0")
    with fastsafe_open(list(files), framework="pt", device=device, nogds=nogds) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def load_model(build_empty: ModelFactory, from_pretrained: ModelFactory, files: list[str], device: str,
               dtype: torch.dtype, reader: str | None = None) -> torch.nn.Module:
    """A model on `device` in `dtype`, in eval mode with gradients off.

    `build_empty` builds the architecture (it is called under `init_empty_weights`);
    `from_pretrained` loads the same model the library's way, in `dtype`, on the CPU.
    """
    t0 = time.perf_counter()
    reader = reader or choose_reader(device)
    model = _load_fast(build_empty, files, device, dtype, reader)
    if model is None:
        reader = "from_pretrained"
        model = from_pretrained().to(device)
    log.info("loaded %s onto %s with %s in %.2fs", type(model).__name__, device, reader,
             time.perf_counter() - t0)
    return model.eval().requires_grad_(False)


def _load_fast(build_empty: ModelFactory, files: list[str], device: str, dtype: torch.dtype,
               reader: str) -> torch.nn.Module | None:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build_empty()
    if dtype != torch.float32 and _keeps_fp32(model):
        log.debug("%s keeps modules in fp32; loading with from_pretrained", type(model).__name__)
        return None
    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in read_safetensors(files, device, reader).items()}
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        log.info("%s: %d keys the model does not name (e.g. %s); loading with from_pretrained",
                 type(model).__name__, len(unexpected), unexpected[0])
        return None
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()
    empty = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if empty:
        log.info("%s: %d parameters missing from the files (e.g. %s); loading with from_pretrained",
                 type(model).__name__, len(empty), empty[0])
        return None
    _cast_buffers(model, dtype)
    return model.to(device)


def _cast_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating buffers in `dtype`, as from_pretrained leaves them (diffusers' `.to(dtype)` warns)."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(dtype)


def _keeps_fp32(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_keep_in_fp32_modules", None)
                or getattr(model, "_keep_in_fp32_modules_strict", None))
