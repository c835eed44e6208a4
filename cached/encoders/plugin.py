"""`python`: an encoder from user code, `factory = "module:function"`.

The factory is called once with the `options` table as keyword arguments and returns a
`torch.nn.Module` whose forward maps a float batch (B, 3, H, W) in [-1, 1] to latents: a tensor,
stored as `latent`, or a dict of named batch-first tensors. A forward with a `seeds` parameter also
gets the items' seeds (a list of ints), for reproducible sampling.

Options: `factory`; `path`, a directory put on sys.path or the .py file that defines the module
(then `module` is only a name for it); `options`; `dtype`; `devices` (one replica each, copies of the
one module the factory built).

The fingerprint covers the module's state_dict (every tensor's bytes), the factory name, its options,
the dtype and the bytes of the module's source file, so changed weights or code give new keys. Code
the module imports from elsewhere is not covered: change `options` (e.g. a `version`) when it changes.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import sys
from types import ModuleType
from typing import Any

import torch

from .base import Encoder, Replica, parse_devices, parse_dtype
from .weights import WeightDigests, json_digest, state_dict_digest

__all__ = ["PythonPlugin", "import_factory"]

log = logging.getLogger(__name__)


def import_factory(factory: str, path: str | None = None) -> tuple[Any, ModuleType]:
    """(function, module) for "module:function"; `path` is a sys.path entry or the module's file."""
    if not isinstance(factory, str) or factory.count(":") != 1 or not all(factory.split(":")):
        raise ValueError(f"factory must be 'module:function', got {factory!r}")
    module_name, func_name = factory.split(":")
    if path is not None and not os.path.exists(path):
        raise ValueError(f"plugin path {path!r} does not exist")
    if path is not None and os.path.isfile(path):
        module = _import_file(module_name, path)
    else:
        if path is not None and path not in sys.path:
            sys.path.insert(0, path)
        module = importlib.import_module(module_name)
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ValueError(f"factory {factory!r}: {module_name} has no function {func_name!r}")
    return func, module


def _import_file(module_name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"plugin path {path!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


class PythonPlugin(Encoder):
    kind = "python"
    input = "image"

    def __init__(self, name: str, factory: str, path: str | None = None,
                 options: dict[str, Any] | None = None, devices: list[str] | None = None,
                 dtype: str = "fp32", digests: WeightDigests | None = None) -> None:
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"encoder {name!r}: options must be a table, got {options!r}")
        self.name, self.factory, self.options = name, factory, dict(options or {})
        self.devices = parse_devices(devices)
        self.dtype = parse_dtype(dtype)
        func, module = import_factory(factory, path)
        model = func(**self.options)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"encoder {name!r}: factory {factory!r} returned {type(model).__name__}, "
                             "not a torch.nn.Module")
        model = model.eval().requires_grad_(False).to(dtype=self.dtype)
        self.takes_seeds = "seeds" in inspect.signature(model.forward).parameters
        self.fingerprint = json.dumps({
            "kind": self.kind, "factory": factory, "options": json_digest(self.options), "dtype": dtype,
            "state": state_dict_digest(model.state_dict()), "source": _source_digest(module),
        }, sort_keys=True)
        self._replicas = [Replica(dev, (model if i == 0 else copy.deepcopy(model)).to(dev))
                          for i, dev in enumerate(self.devices)]
        log.info("encoder %s: plugin %s on %s (%s)", name, factory, self.devices, dtype)

    def _encode(self, rep: Replica, batch: Any, seeds: list[int]) -> dict[str, torch.Tensor]:
        x = batch.to(rep.device, self.dtype)
        out = rep.model(x, seeds=list(seeds)) if self.takes_seeds else rep.model(x)
        if isinstance(out, torch.Tensor):
            out = {"latent": out}
        if not (isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in out.values())):
            raise TypeError(f"encoder {self.name!r}: forward must return a tensor or a dict of tensors, "
                            f"got {type(out).__name__}")
        bad = [k for k, v in out.items() if v.dim() == 0 or v.shape[0] != len(seeds)]
        if bad:
            raise TypeError(f"encoder {self.name!r}: outputs {bad} are not batch-first for {len(seeds)} items")
        return out



def _source_digest(module: ModuleType) -> str | None:
    try:
        source = inspect.getsourcefile(module)
    except TypeError:  # a built-in module
        return None
    if not source or not os.path.isfile(source):
        return None
    with open(source, "rb") as f:
        return hashlib.blake2b(f.read(), digest_size=16).hexdigest()
