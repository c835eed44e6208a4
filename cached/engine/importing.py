"""Imports another trainer's latent cache into the tiers, keyed as if the named encoder computed it.

The formats don't record the VAE, so the caller names the encoder; its normalisation converts
caches stored unscaled, its channel count and dtype check and cast what is imported, and its
fingerprint goes into every key. Sources must be inside allowed_roots, like any request.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from cached_client.errors import CacheError, InvalidSpec

from ..importers import ImportItem, iter_import
from .caller import Caller
from .engine import Engine, tensor_bytes
from .keys import entry_key

__all__ = ["import_cache"]

EXAMPLES_PER_REASON = 3


def _scalar_norm(enc: Any) -> tuple[float, float]:
    norm = getattr(enc, "norm", None)
    if norm is None or getattr(enc, "sample", "mean") != "mean":
        raise InvalidSpec(f"encoder {enc.name!r}: import needs a diffusers-vae encoder with sample = \"mean\"")
    if not isinstance(norm.scale, float) or not isinstance(norm.shift, float):
        raise InvalidSpec(f"encoder {enc.name!r} normalises per channel; the trainer formats store "
                          f"scalar-scaled latents only")
    return norm.scale, norm.shift


def import_cache(engine: Engine, encoder: str, fmt: str, path: str, size: tuple[int, int] | None,
                 image_root: str | None, arch: str | None, crop: str, caller: Caller) -> Iterator[dict[str, Any]]:
    """Progress dicts (seen, imported, already, skipped, examples) about every 0.25 s, and a last one.
    The caller must be able to search the cache directory, and to read each image it imports."""
    enc = engine.encoder(encoder)
    scale, shift = _scalar_norm(enc)
    if engine.sources.check_access and not engine.sources.access.searchable(caller, os.path.join(path, "")):
        raise engine.sources.refuse(path)
    root = engine.sources.resolve(image_root) if image_root else None
    try:
        results = iter_import(fmt, engine.sources.resolve(path), image_root=root, size=size,
                              scaling_factor=scale, shift_factor=shift, arch=arch or None, crop=crop or "center")
    except ValueError as exc:
        raise InvalidSpec(str(exc)) from None
    p: dict[str, Any] = {"seen": 0, "imported": 0, "already": 0, "skipped": Counter(), "examples": []}
    last = time.monotonic()
    for result in results:
        p["seen"] += 1
        if isinstance(result, ImportItem):
            outcome = _store(engine, enc, result, caller)
        else:
            outcome = (result.reason, f"{result.cache_file}: {result.reason}: {result.detail}")
        if outcome is None:
            p["imported"] += 1
        elif outcome[0] == "already":
            p["already"] += 1
        else:
            reason, example = outcome
            p["skipped"][reason] += 1
            if p["skipped"][reason] <= EXAMPLES_PER_REASON:
                p["examples"].append(example)
        if time.monotonic() - last > 0.25:
            yield _snapshot(p)
            last = time.monotonic()
    yield _snapshot(p)


def _store(engine: Engine, enc: Any, item: ImportItem, caller: Caller) -> tuple[str, str] | None:
    """None when imported, else (reason, example line)."""
    channels = getattr(enc, "latent_channels", None)
    if channels and item.latent.shape[0] != channels:
        return ("channels", f"{item.cache_file}: channels: {item.latent.shape[0]} latent channels, "
                            f"encoder {enc.name!r} makes {channels} (another VAE?)")
    spec = item.spec()
    try:
        digest = engine.sources.digest(spec.path, caller).digest
    except CacheError as exc:
        return (type(exc).__name__, f"{item.cache_file}: {type(exc).__name__}: {exc}")
    key = entry_key(digest, spec, enc.fingerprint)
    if engine.find(key, None) is not None:
        return ("already", "")
    latent = item.latent.to(getattr(enc, "dtype", torch.float32)).contiguous()
    meta = {"encoder": enc.name, "source": item.image, "spec": spec.wire_json(), "imported_from": item.cache_file}
    engine.tiers.seal(key, {"latent": tensor_bytes(latent)}, meta)
    return None


def _snapshot(p: dict[str, Any]) -> dict[str, Any]:
    snap = {**p, "skipped": dict(p["skipped"]), "examples": list(p["examples"])}
    p["examples"].clear()
    return snap
