"""Loading weights onto a device: safetensors files read straight onto the target device and assigned
into a model built without weights, with the library's own `from_pretrained` as the fallback.

Readers, chosen by measurement (bench/weights_load.py, bench/results/weights_load.md):
- CUDA devices: fastsafetensors when it is installed (the optional `gds` extra) and has not failed in
  this process (GPUDirect Storage when /dev/nvidia-fs0 exists, its `nogds` bounce-buffer copier
  otherwise): file -> GPU memory without a pageable CPU copy.
- everything else: safetensors (`load_file`), which beat fastsafetensors' `nogds` reads on the CPU:
  207 MiB, load + touch every page, 2-core EPYC: 8 ms vs 256 ms from the page cache, 283 ms vs
  293 ms (O_DIRECT) cold.
fastsafetensors is optional and may not work where it is installed: its extension loads the
unversioned `libcudart.so`, which pip's CUDA wheels do not ship. When it fails to import or to read
(any error), the load goes on with safetensors, and so does every later load of the process, after
one warning that says why. A reader named explicitly (`reader=`, for benchmarks) is used as named.

fastsafetensors makes the device it reads onto the CUDA current device of the thread it runs on
(`torch.cuda.set_device`); it runs on a short-lived private thread, so the caller's thread (the
daemon's main thread, a reload thread) keeps its current device.

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
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["READERS", "weight_files", "choose_reader", "fastsafetensors_available", "read_safetensors", "load_model"]

log = logging.getLogger(__name__)

READERS = ("safetensors", "fastsafetensors")

ModelFactory = Callable[[], torch.nn.Module]
State = dict[str, torch.Tensor]

# Why fastsafetensors failed in this process, once it has: every later automatic choice is safetensors.
_fastsafetensors_failure: str | None = None
_failure_lock = threading.Lock()


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
    """Whether fastsafetensors is installed; it may still fail to load here (see the module docstring)."""
    return importlib.util.find_spec("fastsafetensors") is not None


def choose_reader(device: str) -> str:
    """The reader for a device: fastsafetensors onto CUDA when installed and not failed in this
    process, safetensors otherwise."""
    if (torch.device(device).type == "cuda" and _fastsafetensors_failure is None
            and fastsafetensors_available()):
        return "fastsafetensors"
    return "safetensors"


def read_safetensors(files: list[str], device: str, reader: str | None = None) -> State:
    """Every tensor of `files`, on `device`, in the files' dtypes. Without `reader`, the one
    `choose_reader` picks, falling back to safetensors when fastsafetensors fails."""
    return _read(files, device, reader)[0]


def _read(files: list[str], device: str, reader: str | None) -> tuple[State, str]:
    """The tensors of `files` and the reader that read them."""
    if reader is None:
        return _read_chosen(files, device)
    if reader not in _READ:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    return _READ[reader](files, device), reader


def _read_chosen(files: list[str], device: str) -> tuple[State, str]:
    if choose_reader(device) == "fastsafetensors":
        try:
            return _read_fastsafetensors(files, device), "fastsafetensors"
        except Exception as exc:  # noqa: BLE001 - ImportError, OSError (no libcudart.so), ...
            _give_up_fastsafetensors(exc)
    # Read after the handler, so whatever the failed attempt holds (device buffers) is freed first.
    return _read_safetensors(files, device), "safetensors"


def _give_up_fastsafetensors(exc: Exception) -> None:
    """Choose safetensors from now on; say why once per process."""
    global _fastsafetensors_failure
    reason = f"{type(exc).__name__}: {exc}"
    with _failure_lock:
        first = _fastsafetensors_failure is None
        if first:
            _fastsafetensors_failure = reason
    if first:
        log.warning("fastsafetensors cannot load weights here (%s); this process loads them with "
                    "safetensors instead", reason)


def _read_safetensors(files: list[str], device: str) -> State:
    from safetensors.torch import load_file

    state: State = {}
    for path in files:
        state.update(load_file(path, device=device))
    return state


def _read_fastsafetensors(files: list[str], device: str) -> State:
    # fastsafetensors calls torch.cuda.set_device(device) on its thread (FileLoader.copy_files_to_device):
    # a private thread, joined before returning, leaves the caller's current device as it was.
    with ThreadPoolExecutor(1, thread_name_prefix="fastsafetensors") as pool:
        return pool.submit(_fastsafetensors_read, files, device).result()


def _fastsafetensors_read(files: list[str], device: str) -> State:
    from fastsafetensors import fastsafe_open

    # GDS needs the nvidia-fs driver; probing cuFile without it is what fastsafetensors warns about.
    nogds = torch.device(device).type != "cuda" or not os.path.exists("/dev/nvidia-fs0")
    with fastsafe_open(list(files), framework="pt", device=device, nogds=nogds) as f:
        return {name: f.get_tensor(name) for name in f.keys()}


_READ: dict[str, Callable[[list[str], str], State]] = {
    "safetensors": _read_safetensors, "fastsafetensors": _read_fastsafetensors}


def load_model(build_empty: ModelFactory, from_pretrained: ModelFactory, files: list[str], device: str,
               dtype: torch.dtype, reader: str | None = None) -> torch.nn.Module:
    """A model on `device` in `dtype`, in eval mode with gradients off.

    `build_empty` builds the architecture (it is called under `init_empty_weights`);
    `from_pretrained` loads the same model the library's way, in `dtype`, on the CPU.
    """
    t0 = time.perf_counter()
    loaded = _load_fast(build_empty, files, device, dtype, reader)
    model, used = loaded if loaded is not None else (from_pretrained().to(device), "from_pretrained")
    log.info("loaded %s onto %s with %s in %.2fs", type(model).__name__, device, used,
             time.perf_counter() - t0)
    return model.eval().requires_grad_(False)


def _load_fast(build_empty: ModelFactory, files: list[str], device: str, dtype: torch.dtype,
               reader: str | None) -> tuple[torch.nn.Module, str] | None:
    """The model and the reader that read its weights, or None where `from_pretrained` must load it."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build_empty()
    if dtype != torch.float32 and _keeps_fp32(model):
        log.debug("%s keeps modules in fp32; loading with from_pretrained", type(model).__name__)
        return None
    state, reader = _read(files, device, reader)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
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
    return model.to(device), reader


def _cast_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating buffers in `dtype`, as from_pretrained leaves them (diffusers' `.to(dtype)` warns)."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(dtype)


def _keeps_fp32(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_keep_in_fp32_modules", None)
                or getattr(model, "_keep_in_fp32_modules_strict", None))
