"""`diffusers-vae`: an AutoencoderKL from a local directory (config.json + *.safetensors).

The default output is what trainers feed the model: scaling_factor * (mean - shift_factor), in the
configured dtype.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from typing import Any

import torch

from .base import Encoder, parse_dtype
from .weights import WeightDigests

__all__ = ["DiffusersVAE"]

log = logging.getLogger(__name__)

SAMPLE_MODES = ("mean",)


class DiffusersVAE(Encoder):
    kind = "diffusers-vae"
    input = "image"

    def __init__(self, name: str, path: str, devices: list[str] | None = None, dtype: str = "fp32",
                 sample: str = "mean", scaling_factor: float | None = None,
                 shift_factor: float | None = None, digests: WeightDigests | None = None) -> None:
        from diffusers import AutoencoderKL  # heavy; only the daemon ever imports it

        if sample not in SAMPLE_MODES:
            raise ValueError(f"encoder {name!r}: sample must be one of {SAMPLE_MODES}, got {sample!r}")
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ValueError(f"encoder {name!r}: {path!r} has no config.json")
        weights = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not weights:
            raise ValueError(f"encoder {name!r}: {path!r} has no *.safetensors weights")
        self.name = name
        self.devices = list(devices or ["cpu"])
        self.dtype = parse_dtype(dtype)
        self.sample = sample
        model = AutoencoderKL.from_pretrained(path, torch_dtype=self.dtype, local_files_only=True)
        self.model = model.to(self.devices[0]).eval().requires_grad_(False)
        cfg = self.model.config
        self.scaling = float(cfg.scaling_factor if scaling_factor is None else scaling_factor)
        default_shift = getattr(cfg, "shift_factor", None) or 0.0
        self.shift = float(default_shift if shift_factor is None else shift_factor)
        digests = digests or WeightDigests()
        with open(config_path, "rb") as f:
            config_digest = hashlib.blake2b(f.read(), digest_size=16).hexdigest()
        self.fingerprint = json.dumps({
            "kind": self.kind, "weights": digests.files(weights), "config": config_digest,
            "dtype": dtype, "sample": sample, "scaling": self.scaling, "shift": self.shift,
        }, sort_keys=True)
        log.info("encoder %s: AutoencoderKL from %s on %s (%s), scaling %.6g shift %.6g",
                 name, path, self.devices[0], dtype, self.scaling, self.shift)

    @torch.inference_mode()
    def encode(self, batch: Any, seeds: list[int]) -> dict[str, torch.Tensor]:
        x = batch.to(self.devices[0], self.dtype)
        dist = self.model.encode(x).latent_dist
        latent = (dist.mean - self.shift) * self.scaling
        return {"latent": latent.to(self.dtype)}
