"""What operators ask the daemon about: its client processes, one entry, its own process (the
Clients, Inspect and Diagnose RPCs, for `cachectl leases`, `top`, `inspect` and `diagnose`).

Reads the engine, the store and the sessions' callers; changes nothing (an Inspect of an entry that
is only on disk reads and verifies its file, as a get would).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import TYPE_CHECKING, Any

import psutil

from cached_client.errors import CacheMiss
from cached_client.procinfo import dir_usage, max_map_count, open_fds, read_memory, segment_of
from cached_client.wire import decode_layout

from ..encoders import Encoder
from .caller import Caller
from .selection import Selection, unique_keys

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["clients", "inspect", "process", "parameter_bytes"]


def clients(engine: Engine, callers: list[Caller]) -> list[dict[str, Any]]:
    """One row per connected client process, oldest session first: who it is, what it holds and
    what it asked for."""
    owners = engine.store.owners()
    served = engine.client_counters()
    rows = []
    for caller in sorted(callers, key=lambda c: c.session):
        leases, leased = owners.get(caller.session, (0, 0))
        items, hits, misses = served.get(caller.session, (0, 0, 0))
        rows.append({"session": caller.session, "pid": caller.pid, "uid": caller.uid or 0, "leases": leases,
                     "leased_bytes": leased, "items": items, "hits": hits, "misses": misses,
                     "age_s": _age(caller.pid)})
    return rows


def _age(pid: int) -> float:
    try:
        return max(0.0, time.time() - psutil.Process(pid).create_time())
    except (psutil.Error, ValueError):
        return 0.0


def inspect(engine: Engine, prefix: str) -> dict[str, Any]:
    """The one entry whose hex key starts with `prefix`, in every tier that has it. CacheMiss when
    none does, InvalidSpec when several do (naming a few)."""
    everywhere = engine.tiers.list_entries("all", Selection(everything=True))
    [key] = unique_keys((r["key"] for r in everywhere), [prefix])
    rows = [r for r in everywhere if r["key"] == key]
    shm = next((r for r in rows if r["tier"] == "shm"), None)
    meta = (shm or rows[0])["meta"]
    return {"key": key.hex(), "tiers": [r["tier"] for r in rows], "bytes": {r["tier"]: r["bytes"] for r in rows},
            "encoder": meta.get("encoder", ""), "source": meta.get("source", ""), "spec": meta.get("spec", ""),
            "meta": {k: str(v) for k, v in meta.items()}, "leases": shm["leases"] if shm else 0,
            "tensors": _tensors(engine, key)}


def _tensors(engine: Engine, key: bytes) -> list[dict[str, Any]]:
    """(name, dtype, shape, bytes) of each tensor: from the slot's layout in shared memory, else
    from the disk file (read and verified)."""
    entry = engine.store.lookup(key)
    if entry is not None:
        layout = decode_layout(engine.store.layouts.text(entry.layout_id))
        return [{"name": n, "dtype": d, "shape": list(s), "bytes": b} for n, d, s, _, b in layout]
    found = engine.tiers.disk.get(key) if engine.tiers.disk is not None else None
    if found is None:
        raise CacheMiss(f"entry {key.hex()[:16]} was evicted while it was inspected")
    return [{"name": n, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes}
            for n, t in sorted(found[0].items())]


def parameter_bytes(enc: Encoder) -> dict[str, int]:
    """Bytes of an encoder's parameters and buffers on each device (built-in kinds keep one model
    per device; a plugin that manages its own replicas reports none)."""
    out: dict[str, int] = {}
    for rep in getattr(enc, "_replicas", None) or []:
        model = rep.model
        tensors = [*model.parameters(), *model.buffers()] if hasattr(model, "parameters") else []
        out[rep.device] = out.get(rep.device, 0) + sum(t.numel() * t.element_size() for t in tensors)
    return out


def _device_reserved(engine: Engine) -> dict[str, int]:
    """Bytes torch's caching allocator holds on each CUDA device the encoders use (none when CUDA
    was never initialised: reading it must not initialise it)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    devices = {d for enc in engine.encoders.values() for d in enc.devices if d.startswith("cuda")}
    return {d: int(torch.cuda.memory_reserved(d)) for d in sorted(devices)}


def process(engine: Engine) -> dict[str, Any]:
    """The daemon's own process and host: memory (with the part its segments take), descriptors,
    mappings, the shm directory, the segments by name."""
    store = engine.store
    segments: list[dict[str, Any]] = [{"name": a.name, "path": a.path, "bytes": a.size} for a in store.arenas]
    segments.append({"name": segment_of(store.control_path), "path": store.control_path, "bytes": os.sysconf("SC_PAGE_SIZE")})
    mem = read_memory("self", {s["name"] for s in segments})
    usage = dir_usage(store.shm_dir)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return {"pid": os.getpid(), "rss": mem.total.rss if mem else 0, "pss": mem.total.pss if mem else 0,
            "uss": mem.uss if mem else 0, "maps": mem.maps if mem else 0, "open_fds": open_fds("self") or 0,
            "max_fds": 0 if soft == resource.RLIM_INFINITY else soft, "max_map_count": max_map_count() or 0,
            "shm_backend": store.backend, "shm_dir": store.shm_dir,
            "shm_dir_size": usage.size if usage else 0, "shm_dir_used": usage.used if usage else 0,
            "shm_dir_free": usage.free if usage else 0, "segments": segments,
            "device_reserved_bytes": _device_reserved(engine),
            "disk_dir": engine.tiers.disk.directory if engine.tiers.disk is not None else ""}
