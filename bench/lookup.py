"""Lookup latency from one process over UDS, all hits.

- resolve: client.resolve of 256 (and 32) specs the daemon holds, handles back as arrays with a
  lease each (the loader's path; issue 10's "256-key resolution" target), one Get round trip.
- get, handles not cached: client.get of 256 specs that the daemon holds and this process has no
  handles for: one Get round trip plus a view per item. The process's idle handles are given back
  between calls (close), and an untimed one-spec call first keeps the connection up.
- cached handle: client.get of one spec whose view is alive (or whose lease is idle): no RPC.
- health RPC: the smallest round trip on a channel, the gRPC floor under every batch.
- stats of the sources: a stat of each of a batch's source files in this process, the other floor
  (the daemon stats every remembered source once per lookup, so a changed file is never served).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from common import percentile, table
from methods import Latents

from cached_client import CacheClient

if TYPE_CHECKING:
    from corpus import Corpus

__all__ = ["run", "report"]

TARGETS_US = {"256-key resolve": 1000.0, "cached handle, view alive": 10.0,
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


def _batch_rpc(address: str, encoder: str, batches: list[list], reps: int) -> list[float]:
    out = []
    for i in range(reps):
        client = CacheClient(address)
        try:
            client.get(batches[(i + 1) % len(batches)][:1], encoder=encoder)  # untimed: connects, maps
            t0 = time.perf_counter_ns()
            client.get(batches[i % len(batches)], encoder=encoder)
            out.append((time.perf_counter_ns() - t0) / 1000)
        finally:
            client.close()
    return out


def _resolve(client: CacheClient, encoder: str, batches: list[list], reps: int) -> list[float]:
    """`resolve` round trips (handles as arrays: the loader's path), each giving back the previous
    one's leases, as the loader does."""
    lines = [b"\n".join(s._wire for s in batch) for batch in batches]
    held: list[int] = []
    out = []
    for i in range(reps):
        t0 = time.perf_counter_ns()
        r = client.resolve(lines[i % len(lines)], encoder, release=held)
        out.append((time.perf_counter_ns() - t0) / 1000)
        held = r.lease_ids
    client.release(held)
    return out


def _stats(batches: list[list], reps: int) -> list[float]:
    """One os.stat of each source of a batch, in this process: what the daemon's staleness check of
    a remembered spec costs per item (the floor under a resolve beside the gRPC one)."""
    paths = [[s.path for s in batch] for batch in batches]
    return _times_us(lambda i: [os.stat(p) for p in paths[i % len(paths)]], reps)


def run(corpus: Corpus, reps: int = 200, batch: int = 256) -> dict[str, list[float]]:
    """{case: [microseconds per call]}."""
    lat: Latents = next(iter(corpus.sizes.values()))
    enc, addr = lat.encoder, corpus.address
    client = CacheClient(addr)
    spec = lat.specs[:1]
    client.get(spec, encoder=enc)  # untimed: connects, maps the arenas
    gc.disable()  # a collection inside a 5 us measurement says nothing about the client
    try:
        out = {
            "health RPC (gRPC floor)": _times_us(lambda i: client.health(), reps),
            f"{batch} stats of the sources (the check each hit costs)": _stats(_batches(lat, batch), reps),
            f"{batch}-key resolve": _resolve(client, enc, _batches(lat, batch), reps),
            "32-key resolve": _resolve(client, enc, _batches(lat, 32), reps),
            f"{batch}-key get (views), handles not cached": _batch_rpc(addr, enc, _batches(lat, batch), reps),
            "32-key get (views), handles not cached": _batch_rpc(addr, enc, _batches(lat, 32), reps),
        }
        held = client.get(spec, encoder=enc)
        out["cached handle, view alive"] = _times_us(lambda i: client.get(spec, encoder=enc), 20 * reps)
        del held
        out["cached handle, lease idle"] = _times_us(lambda i: client.get(spec, encoder=enc), 20 * reps)
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
        "### Lookup latency, one process, UDS, all hits",
        table(["case", "calls", "p50 us", "p90 us", "DESIGN.md target (p50)"], rows),
    ])
