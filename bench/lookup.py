"""Lookup latency from one client over UDS, all hits.

- batch RPC: client.get of 256 specs (fewer with --quick) the client holds no handles for (the daemon has them): one Get
  round trip, which also gives back the previous batch's leases as a steady-state reader does.
- cached handle: client.get of one spec whose view is alive (or whose lease is idle): no RPC.
- health RPC: the smallest round trip on the same channel, the gRPC floor under every batch.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from common import percentile, table
from methods import Latents

from cached_client import CacheClient

if TYPE_CHECKING:
    from corpus import Corpus

__all__ = ["run", "report"]

TARGETS_US = {"256-key batch RPC": 1000.0, "cached handle, view alive": 10.0,
              "cached handle, lease idle": 10.0}


def _times_us(fn: Callable[[int], object], reps: int) -> list[float]:
    out = []
    for i in range(reps):
        t0 = time.perf_counter_ns()
        fn(i)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def _batches(lat: Latents, size: int) -> list[list]:
    batches = [lat.specs[i:i + size] for i in range(0, len(lat) - size + 1, size)]
    if len(batches) < 2:
        raise ValueError(f"need at least {2 * size} latents for {size}-key batches, got {len(lat)}")
    return batches


def run(corpus: Corpus, reps: int = 200, batch: int = 256) -> dict[str, list[float]]:
    """{case: [microseconds per call]}."""
    lat: Latents = next(iter(corpus.sizes.values()))
    client = CacheClient(corpus.address)
    batches = _batches(lat, batch)
    small = _batches(lat, 32)
    enc = lat.encoder
    for b in batches:  # untimed: connects, maps the arenas
        client.get(b, encoder=enc)
    gc.disable()  # a collection inside a 5 us measurement says nothing about the client
    try:
        out = {
            "health RPC (gRPC floor)": _times_us(lambda i: client.health(), reps),
            # consecutive batches differ, so every spec's handle was given back one call earlier
            f"{batch}-key batch RPC": _times_us(lambda i: client.get(batches[i % len(batches)], encoder=enc), reps),
            "32-key batch RPC (a DataLoader batch)": _times_us(
                lambda i: client.get(small[i % len(small)], encoder=enc), reps),
        }
        held = client.get(batches[0][:1], encoder=enc)
        out["cached handle, view alive"] = _times_us(lambda i: client.get(batches[0][:1], encoder=enc), 20 * reps)
        del held
        out["cached handle, lease idle"] = _times_us(lambda i: client.get(batches[0][:1], encoder=enc), 20 * reps)
    finally:
        gc.enable()
        client.close()
    return out


def report(results: dict[str, list[float]]) -> str:
    rows = []
    for case, xs in results.items():
        target = TARGETS_US.get(case)
        p50, p90 = percentile(xs, 50), percentile(xs, 90)
        verdict = "" if target is None else (
            f"<= {target:,.0f} us: " + ("met" if p50 <= target else f"missed, {p50 / target:.1f}x the target"))
        rows.append([case, len(xs), f"{p50:,.1f}", f"{p90:,.1f}", verdict])
    return "\n\n".join([
        "### Lookup latency, one client, UDS, all hits",
        table(["case", "calls", "p50 us", "p90 us", "DESIGN.md target (p50)"], rows),
    ])
