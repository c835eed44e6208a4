"""The loader's order (loader.py's docstring says what it is): this rank's batches of an epoch, the
windows of consecutive batches resolved in one RPC each, where an iteration stands (`_Position`),
and the checks of the options that shape them. Needs numpy, not torch."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidSpec
from .specs import Spec

__all__ = ["epoch_batches"]


@dataclass(frozen=True)
class _Position:
    epoch: int
    batch: int  # batches of the epoch already yielded


def epoch_batches(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, drop_last: bool,
                  rank: int, world_size: int, batch_sampler: Any = None) -> list[np.ndarray]:
    """This rank's batches (arrays of item indices) of one epoch."""
    if batch_sampler is not None:
        if hasattr(batch_sampler, "set_epoch"):
            batch_sampler.set_epoch(epoch)
        batches = [np.asarray(b, dtype=np.int64) for b in
                   (batch_sampler.batches() if hasattr(batch_sampler, "batches") else list(batch_sampler))]
        return _share(batches, rank, world_size, drop_last)
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    mine = np.asarray(_share(order.tolist(), rank, world_size, drop_last), dtype=np.int64)
    stop = len(mine) - len(mine) % batch_size if drop_last else len(mine)
    return [mine[i:i + batch_size] for i in range(0, stop, batch_size)]


def _share(seq: list, rank: int, world_size: int, drop_last: bool) -> list:
    """Every `world_size`-th element from `rank`, each rank getting as many: the tail is dropped
    (drop_last) or padded from the start, as DistributedSampler does."""
    if world_size == 1:
        return seq
    if drop_last:
        seq = seq[:len(seq) - len(seq) % world_size]
    elif len(seq) % world_size:
        pad = world_size - len(seq) % world_size
        seq = seq + (seq * (pad // max(len(seq), 1) + 1))[:pad]
    return seq[rank::world_size]


def _window(batches: list[Any], items: int) -> tuple[list[Any], list[Any]]:
    """The first consecutive batches holding up to `items` items (at least one batch), and the rest;
    None (an epoch's end) counts as no item."""
    count = 0
    for k, b in enumerate(batches):
        count += 0 if b is None else len(b)
        if count > items and k:
            return batches[:k], batches[k:]
    return batches, []


class _Pushback:
    """An iterator of windows that can take windows back (to be split) before its next one."""

    def __init__(self, it: Iterator[list[Any]]) -> None:
        self._it = it
        self._front: list[list[Any]] = []

    def next(self) -> list[Any] | None:
        return self._front.pop(0) if self._front else next(self._it, None)

    def push(self, *windows: list[Any]) -> None:
        self._front[:0] = list(windows)


def _columns(specs: Any, encoder: str | Sequence[str] | None) -> dict[str, list[Spec]]:
    """{encoder: specs}, one spec per item for each encoder."""
    if isinstance(specs, Mapping):
        columns = {str(k): list(v) for k, v in specs.items()}
        if encoder is not None and sorted([encoder] if isinstance(encoder, str) else encoder) != sorted(columns):
            raise InvalidSpec(f"encoder {encoder!r} does not name the mapping's encoders {sorted(columns)}")
    elif isinstance(encoder, str):
        columns = {encoder: list(specs)}
    elif encoder:
        names = list(encoder)
        rows = [tuple(r) for r in specs]
        if any(len(r) != len(names) for r in rows):
            raise InvalidSpec(f"with encoders {names}, each item must be a tuple of {len(names)} specs")
        columns = {name: [r[k] for r in rows] for k, name in enumerate(names)}
    else:
        raise InvalidSpec("give an encoder name (or a list of them), or a mapping {encoder: specs}")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise InvalidSpec(f"every encoder needs one spec per item, and at least one item; got {lengths}")
    return columns


def _check(batch_size: int, rank: int, world_size: int, prefetch: int, window: int) -> None:
    if batch_size < 1:
        raise InvalidSpec(f"batch_size must be >= 1, got {batch_size!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidSpec(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
    if prefetch < 1:
        raise InvalidSpec(f"prefetch_batches must be >= 1, got {prefetch!r}")
    if window < batch_size:
        raise InvalidSpec(f"window must hold at least one batch ({batch_size}), got {window!r}")
