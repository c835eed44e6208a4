"""`diffusers-vae`: an AutoencoderKL-family model, from a local directory or a single-file checkpoint.

Options (the config table of the encoder):
- `path`: a directory in diffusers layout (config.json + *.safetensors), or one `.safetensors` file
  (an original single-file checkpoint), which then needs `config`, a local directory holding the
  matching config.json (loaded offline with `from_single_file(path, config=...)`).
- `diffusers_class`: the diffusers class to load, "AutoencoderKL" by default; any diffusers model
  whose `encode(x).latent_dist` is a diagonal Gaussian works (e.g. AutoencoderKLWan,
  AutoencoderKLQwenImage).
- `dtype` ("fp32" | "fp16" | "bf16"), `devices` (one replica each).
- `sample`: "mean" | "sample" | "posterior"; see `latents.py` for what each stores (`latent`, or
  `mean` + `logvar`) and how a trainer resamples from a posterior.
- `scaling_factor`, `shift_factor`: override the config's; a config with `latents_mean` and
  `latents_std` but no `scaling_factor` (Wan, Qwen-Image) is normalised per channel.
- `enable_tiling`, `enable_slicing`: diffusers' memory savers for large images (tiling changes the
  numbers slightly, so both are part of the fingerprint).

Video autoencoders (any with a Conv3d, e.g. Wan and Qwen-Image) take (B, C, T, H, W): an image is
encoded as one frame, T = 1, and that frame axis is dropped from the outputs, so every entry is
(C, H/f, W/f) like any image latent (a Qwen-Image or Wan trainer adds it back with `unsqueeze(1)`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from .base import Encoder, Replica, parse_devices, parse_dtype, parse_flag
from .latents import SAMPLE_MODES, normalisation_from_config, posterior_outputs
from .loading import load_model, weight_files
from .weights import WeightDigests

__all__ = ["DiffusersVAE", "resolve_diffusers_class"]

log = logging.getLogger(__name__)


def resolve_diffusers_class(name: str) -> Any:
    """A diffusers model class by name; ValueError when there is none or it cannot encode."""
    import diffusers
    from diffusers import ModelMixin

    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin) and hasattr(cls, "encode")):
        raise ValueError(f"diffusers_class must name a diffusers autoencoder with an encode method, "
                         f"got {name!r}")
    return cls


class DiffusersVAE(Encoder):
    kind = "diffusers-vae"
    input = "image"

    def __init__(self, name: str, path: str, devices: list[str] | None = None, dtype: str = "fp32",
                 sample: str = "mean", scaling_factor: float | None = None,
                 shift_factor: float | None = None, digests: WeightDigests | None = None,
                 config: str | None = None, diffusers_class: str = "AutoencoderKL",
                 enable_tiling: bool = False, enable_slicing: bool = False) -> None:
        if sample not in SAMPLE_MODES:
            raise ValueError(f"encoder {name!r}: sample must be one of {SAMPLE_MODES}, got {sample!r}")
        self.name, self.sample = name, sample
        self.devices = parse_devices(devices)
        self.dtype = parse_dtype(dtype)
        self.cls = resolve_diffusers_class(diffusers_class)
        self.path, self.config_dir, files = _locate(name, path, config)
        self.single_file = os.path.isfile(self.path)
        self.tiling = parse_flag("enable_tiling", enable_tiling)
        self.slicing = parse_flag("enable_slicing", enable_slicing)
        self._replicas = [Replica(dev, self._load(dev, files)) for dev in self.devices]
        model = self._replicas[0].model
        self.video = any(isinstance(m, torch.nn.Conv3d) for m in model.modules())
        self.norm = normalisation_from_config(model.config, scaling_factor, shift_factor)
        digests = digests or WeightDigests()
        self.fingerprint = json.dumps({
            "kind": self.kind, "class": self.cls.__name__, "weights": digests.files(files),
            "config": digests.file(os.path.join(self.config_dir, "config.json")), "dtype": dtype,
            "sample": sample, "norm": self.norm.describe(), "tiling": self.tiling,
            "slicing": self.slicing, "frames": 1 if self.video else None,
        }, sort_keys=True)
        log.info("encoder %s: %s from %s on %s (%s, %s), normalisation %s", name, self.cls.__name__,
                 path, self.devices, dtype, sample, self.norm.describe())

    @property
    def latent_channels(self) -> int | None:
        config = self._replicas[0].model.config
        return getattr(config, "latent_channels", None) or getattr(config, "z_dim", None)

    def _load(self, device: str, files: list[str]) -> torch.nn.Module:
        if self.single_file:
            model = self.cls.from_single_file(self.path, config=self.config_dir, torch_dtype=self.dtype,
                                              local_files_only=True)
            model = model.to(device).eval().requires_grad_(False)
        else:
            cls, where = self.cls, self.path
            model = load_model(lambda: cls.from_config(cls.load_config(where)),
                               lambda: cls.from_pretrained(where, torch_dtype=self.dtype, local_files_only=True),
                               files, device, self.dtype)
        for flag, method in ((self.tiling, "enable_tiling"), (self.slicing, "enable_slicing")):
            if flag:
                if not hasattr(model, method):
                    raise ValueError(f"encoder {self.name!r}: {self.cls.__name__} has no {method}")
                getattr(model, method)()
        return model

    def _encode(self, rep: Replica, batch: Any, seeds: list[int]) -> dict[str, torch.Tensor]:
        x = batch.to(rep.device, self.dtype)
        if self.video:
            x = x.unsqueeze(2)
        dist = getattr(rep.model.encode(x), "latent_dist", None)
        if dist is None:
            raise TypeError(f"encoder {self.name!r}: {self.cls.__name__}.encode returns no latent_dist")
        mean, logvar = dist.mean, dist.logvar
        if self.video:
            mean, logvar = mean.squeeze(2), logvar.squeeze(2)
        return posterior_outputs(mean, logvar, self.sample, self.norm, seeds, self.dtype)



def _locate(name: str, path: str, config: str | None) -> tuple[str, str, list[str]]:
    """(path, config dir, weight files): a diffusers directory, or a single file plus its config."""
    if not isinstance(path, str) or not os.path.exists(path):
        raise ValueError(f"encoder {name!r}: path {path!r} does not exist")
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise ValueError(f"encoder {name!r}: a single-file checkpoint must be .safetensors, got {path!r}")
        if not config:
            raise ValueError(f"encoder {name!r}: single-file checkpoint {path!r} needs config = a "
                             "directory with its config.json")
        if not os.path.isfile(os.path.join(config, "config.json")):
            raise ValueError(f"encoder {name!r}: config {config!r} has no config.json")
        return path, config, [path]
    if config is not None:
        raise ValueError(f"encoder {name!r}: config is for single-file checkpoints; {path!r} is a "
                         f"directory, got config {config!r}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"encoder {name!r}: {path!r} has no config.json")
    weights = weight_files(path, "diffusion_pytorch_model")
    if not weights:
        raise ValueError(f"encoder {name!r}: {path!r} has no *.safetensors weights")
    return path, path, weights
