"""Encoders: the `Encoder` interface and the built-in kinds. Knows nothing of gRPC or shared memory."""

from __future__ import annotations

import logging
from typing import Any

from .base import DTYPES, Encoder
from .weights import WeightDigests

__all__ = ["Encoder", "DTYPES", "build_encoder", "KINDS"]

log = logging.getLogger(__name__)

KINDS = ("diffusers-vae",)


def build_encoder(name: str, options: dict[str, Any], digests: WeightDigests | None = None) -> Encoder:
    """An encoder from its config table; ValueError names a missing or bad option."""
    opts = dict(options)
    kind = opts.pop("kind", None)
    if kind == "diffusers-vae":
        from .vae import DiffusersVAE

        known = {"path", "devices", "dtype", "sample", "scaling_factor", "shift_factor"}
        _warn_unknown(name, opts, known)
        if "path" not in opts:
            raise ValueError(f"encoder {name!r}: kind diffusers-vae needs a path")
        return DiffusersVAE(name, digests=digests, **{k: v for k, v in opts.items() if k in known})
    raise ValueError(f"encoder {name!r}: kind must be one of {KINDS}, got {kind!r}")


def _warn_unknown(name: str, opts: dict[str, Any], known: set[str]) -> None:
    for key in sorted(set(opts) - known):
        log.warning("encoder %s: option %r is not implemented in this build; ignored", name, key)
