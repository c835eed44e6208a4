"""What the engine needs of an encoder, whatever model family is behind it.

Interface for the engine (the batcher):

- `encoder.input` is "image" or "text": image encoders take a float tensor (B, 3, H, W) in [-1, 1],
  text encoders a list of B strings.
- `encoder.encode(batch, seeds, replica=0) -> dict[str, Tensor]` returns named batch-first tensors
  (the engine stores `out[name][i]` for item i). `seeds` holds one int (0 <= seed < 2**64) per item,
  derived from the item's key; every random draw depends on the item's seed only, so an entry is the
  same whatever batch or replica computed it, and after a restart.
- Replicas: `encoder.replicas` is `len(encoder.devices)`; replica `r` is a model of its own on
  `encoder.devices[r]` (a device listed twice gets two copies). `encode(..., replica=r)` runs on that
  replica and may be called from one thread per replica concurrently; calls to the same replica are
  serialised by a lock inside the encoder. Outputs come back on the replica's device; the engine moves
  them to the CPU. The batcher keeps one worker per replica and hands each batch to the least loaded.
- `encoder.fingerprint` is part of every entry key; `encoder.describe()` is {kind, fingerprint, devices}.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = ["Encoder", "Replica", "DTYPES", "parse_dtype", "parse_devices", "parse_flag"]

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def parse_flag(option: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be true or false, got {value!r}")
    return value


def parse_devices(devices: list[str] | str | None) -> list[str]:
    """Validated device names; ValueError names a malformed or absent device."""
    if devices is None:
        return ["cpu"]
    if isinstance(devices, str) or not isinstance(devices, (list, tuple)) or not devices:
        raise ValueError(f"devices must be a non-empty list such as ['cuda:0'], got {devices!r}")
    return [_check_device(d) for d in devices]


def _check_device(name: Any) -> str:
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {name!r} is not a torch device name") from exc
    if dev.type == "cuda":
        count = torch.cuda.device_count()
        if (dev.index or 0) >= count:
            raise ValueError(f"device {name!r} is not available here ({count} CUDA devices)")
    elif dev.type != "cpu" and not _backend_available(dev.type):
        raise ValueError(f"device {name!r} is not available here")
    return str(name)


def _backend_available(kind: str) -> bool:
    backend = getattr(torch, kind, None)
    return bool(backend is not None and getattr(backend, "is_available", lambda: False)())


@dataclass(eq=False)
class Replica:
    """One copy of an encoder's model on one device; `lock` serialises calls to it."""

    device: str
    model: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


class Encoder(ABC):
    """A named model that turns a batch of inputs into named, batch-first output tensors.

    `fingerprint` is part of every entry key: it must change whenever the outputs could (weights,
    dtype, normalisation, sample mode), so a swapped model never serves stale entries.
    Built-in kinds fill `self._replicas` (one per device) and implement `_encode`; a subclass may
    instead override `encode` itself (one replica per device is then its own business).
    """

    name: str
    kind: str
    input: Literal["image", "text"]
    fingerprint: str
    devices: list[str]
    _replicas: list[Replica]

    @property
    def replicas(self) -> int:
        """How many replicas `encode(..., replica=r)` accepts: one per entry of `devices`."""
        return len(getattr(self, "_replicas", None) or self.devices)

    def encode(self, batch: Any, seeds: list[int], replica: int = 0) -> dict[str, torch.Tensor]:
        """Outputs for a batch: image encoders get a float tensor (B, 3, H, W) in [-1, 1], text
        encoders a list of strings. `seeds` (one per item, from its key) drive any sampling."""
        if not 0 <= replica < len(self._replicas):
            raise ValueError(f"encoder {self.name!r}: replica must be in [0, {len(self._replicas)}), "
                             f"got {replica!r}")
        if len(seeds) != len(batch):
            raise ValueError(f"encoder {self.name!r}: {len(seeds)} seeds for a batch of {len(batch)}")
        rep = self._replicas[replica]
        with rep.lock, torch.inference_mode():
            return self._encode(rep, batch, seeds)

    def _encode(self, rep: Replica, batch: Any, seeds: list[int]) -> dict[str, torch.Tensor]:
        """`encode` on one replica, already under its lock and inference mode."""
        raise NotImplementedError(f"{type(self).__name__} implements neither encode nor _encode")

    def describe(self) -> dict[str, Any]:
        """kind, fingerprint and devices: exactly the fields of the Stats RPC's EncoderStats (the
        fingerprint, JSON for the built-in kinds, carries every other setting)."""
        return {"kind": self.kind, "fingerprint": self.fingerprint, "devices": list(self.devices)}
