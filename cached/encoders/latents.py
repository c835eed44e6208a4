"""From a VAE's posterior to what is stored: normalisation, seeded sampling, posterior parameters.

Normalisation maps raw latents to what a diffusion model is trained on: `(z - shift) * scale`, where
`shift` and `scale` are scalars (SD 1.5/SDXL: shift 0, scale `scaling_factor`; SD3/Flux: `shift_factor`
and `scaling_factor`) or per channel (Wan / Qwen-Image: shift `latents_mean`, scale `1 / latents_std`).

Sample modes and the tensors they store:
- "mean" (default): `latent` = normalise(mean).
- "sample": `latent` = normalise(mean + std * eps), where eps for each item is drawn on the CPU by a
  `torch.Generator` seeded with that item's seed, so it is the same whatever batch, replica or device
  computed it, and after a restart.
- "posterior": `mean` and `logvar`, both already normalised, so that a trainer gets a fresh latent on
  the same scale as "mean" mode with
      latent = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
  (normalised mean = (mean - shift) * scale, normalised logvar = logvar + 2 * log|scale|).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SAMPLE_MODES", "Normalisation", "normalisation_from_config", "posterior_outputs"]

SAMPLE_MODES = ("mean", "sample", "posterior")


@dataclass(frozen=True)
class Normalisation:
    """`(z - shift) * scale`, scalars or per-channel lists."""

    shift: float | tuple[float, ...]
    scale: float | tuple[float, ...]

    def describe(self) -> dict[str, Any]:
        return {"shift": self.shift, "scale": self.scale}

    def tensors(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """shift and scale as float32 tensors broadcastable over `like` (B, C, ...)."""
        view = (1, -1) + (1,) * (like.dim() - 2)
        shift = torch.tensor(self.shift, dtype=torch.float32, device=like.device)
        scale = torch.tensor(self.scale, dtype=torch.float32, device=like.device)
        if shift.dim():
            shift = shift.view(view)
        if scale.dim():
            scale = scale.view(view)
        return shift, scale


def normalisation_from_config(config: Any, scaling_factor: float | None = None,
                              shift_factor: float | None = None) -> Normalisation:
    """From the model config, with scalar overrides; per-channel stats when the config has them."""
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    cfg_scale = getattr(config, "scaling_factor", None)
    if scaling_factor is None and shift_factor is None and cfg_scale is None and mean and std:
        if any(float(s) <= 0 for s in std):
            raise ValueError(f"latents_std must be positive, got {list(std)!r}")
        return Normalisation(tuple(float(m) for m in mean), tuple(1.0 / float(s) for s in std))
    scale = scaling_factor if scaling_factor is not None else cfg_scale
    shift = shift_factor if shift_factor is not None else getattr(config, "shift_factor", None)
    for name, value in (("scaling_factor", scale), ("shift_factor", shift)):
        if value is not None and not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if scale is not None and float(scale) == 0:
        raise ValueError(f"scaling_factor must not be 0, got {scale!r}")
    return Normalisation(float(shift or 0.0), float(1.0 if scale is None else scale))


def posterior_outputs(mean: torch.Tensor, logvar: torch.Tensor, mode: str, norm: Normalisation,
                      seeds: list[int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors for `mode` from a posterior N(mean, exp(logvar)), computed in float32."""
    mean, logvar = mean.float(), logvar.float()
    shift, scale = norm.tensors(mean)
    if mode == "mean":
        return {"latent": ((mean - shift) * scale).to(dtype)}
    if mode == "sample":
        eps = seeded_normal(mean.shape[1:], seeds).to(mean.device)
        return {"latent": ((mean + torch.exp(0.5 * logvar) * eps - shift) * scale).to(dtype)}
    if mode == "posterior":
        return {"mean": ((mean - shift) * scale).to(dtype),
                "logvar": (logvar + 2.0 * torch.log(scale.abs())).to(dtype)}
    raise ValueError(f"sample must be one of {SAMPLE_MODES}, got {mode!r}")


def seeded_normal(shape: torch.Size | tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """(len(seeds), *shape) standard normals; row i depends on seeds[i] only."""
    rows = []
    for seed in seeds:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
        rows.append(torch.randn(tuple(shape), generator=gen, dtype=torch.float32))
    return torch.stack(rows)
