"""Encoders: the `Encoder` interface and the built-in kinds. Knows nothing of gRPC or shared memory.

Kinds (the `kind` of an `[encoders.NAME]` table) and their modules:
- "diffusers-vae": `vae.DiffusersVAE`, AutoencoderKL family (and other diffusers autoencoders).
- "hf-text": `text.HFText`, a transformers text encoder with its tokenizer.
- "python": `plugin.PythonPlugin`, a `torch.nn.Module` from a user factory `module:function`.
The options of a kind are the keyword arguments of its class; see each module's docstring.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any

from .base import DTYPES, Encoder, Replica
from .weights import WeightDigests

__all__ = ["Encoder", "Replica", "DTYPES", "WeightDigests", "build_encoder", "KINDS", "options_of"]

log = logging.getLogger(__name__)

# kind -> "module:Class"; modules are imported on use, so the heavy libraries load only when needed.
KINDS: dict[str, str] = {
    "diffusers-vae": "vae:DiffusersVAE",
    "hf-text": "text:HFText",
    "python": "plugin:PythonPlugin",
}

_NOT_OPTIONS = {"name", "digests"}


def build_encoder(name: str, options: dict[str, Any], digests: WeightDigests | None = None) -> Encoder:
    """An encoder from its config table; ValueError names a missing or bad option."""
    opts = dict(options)
    kind = opts.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"encoder {name!r}: kind must be one of {sorted(KINDS)}, got {kind!r}")
    cls = _encoder_class(kind)
    known = options_of(cls)
    for key in sorted(set(opts) - known):
        log.warning("encoder %s: option %r is not implemented in this build; ignored", name, key)
    missing = sorted(p.name for p in inspect.signature(cls).parameters.values()
                     if p.default is inspect.Parameter.empty and p.name not in _NOT_OPTIONS | set(opts))
    if missing:
        raise ValueError(f"encoder {name!r}: kind {kind} needs option(s) {missing}")
    return cls(name, digests=digests, **{k: v for k, v in opts.items() if k in known})


def options_of(cls: type) -> set[str]:
    """The config options an encoder class accepts: its keyword arguments."""
    return set(inspect.signature(cls).parameters) - _NOT_OPTIONS


def _encoder_class(kind: str) -> type:
    module, _, cls = KINDS[kind].partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
