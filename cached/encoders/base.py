"""What the engine needs of an encoder, whatever model family is behind it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

import torch

__all__ = ["Encoder", "DTYPES", "parse_dtype"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


class Encoder(ABC):
    """A named model that turns a batch of inputs into named, batch-first output tensors.

    `fingerprint` is part of every entry key: it must change whenever the outputs could (weights,
    dtype, normalisation, sample mode), so a swapped model never serves stale entries.
    """

    name: str
    kind: str
    input: Literal["image", "text"]
    fingerprint: str
    devices: list[str]

    @abstractmethod
    def encode(self, batch: Any, seeds: list[int]) -> dict[str, torch.Tensor]:
        """Outputs for a batch: image encoders get a float tensor (B, 3, H, W) in [-1, 1], text
        encoders a list of strings. `seeds` (one per item, from its key) drive any sampling."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "fingerprint": self.fingerprint, "devices": list(self.devices)}
