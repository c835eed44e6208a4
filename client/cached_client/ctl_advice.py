"""What `cachectl diagnose` recommends, in plain words, from what it gathered (ctl_diagnose.py).

Each check looks at one known way a setup wastes memory or time and returns recommendations:
{"problem": a short id, "pids": the processes concerned, "text": what is wrong and what to do}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .units import format_bytes

__all__ = ["recommend", "CONTAINER_SHM_BYTES"]

CONTAINER_SHM_BYTES = 64 << 20  # Docker's default /dev/shm
NEAR_LIMIT = 0.8                 # of vm.max_map_count or of the fd limit
CHURN = 2                        # client sessions opened or closed while sampling that mean workers restart

Advice = dict[str, Any]


def _advice(problem: str, text: str, pids: list[int] | None = None) -> Advice:
    return {"problem": problem, "pids": pids or [], "text": text}


def _shm_too_small(r: dict[str, Any]) -> list[Advice]:
    evicted = r["stats"].get("capacity_evictions", 0)
    if not evicted:
        return []
    shm, disk = r["stats"]["tiers"]["shm"], r["stats"]["tiers"].get("disk")
    if disk and disk["bytes"] > shm["capacity_bytes"]:
        return [_advice("shm-too-small", (
            f"Shared memory is too small for the dataset: {evicted:,} entries were evicted to make room, and the "
            f"disk tier holds {format_bytes(disk['bytes'])} against {format_bytes(shm['capacity_bytes'])} of shared "
            f"memory, so every epoch reads from disk again. Raise store.shm_bytes to at least "
            f"{format_bytes(disk['bytes'])} (and the memory behind it: /dev/shm, or the service's MemoryMax)."))]
    return [_advice("shm-too-small", (
        f"Shared memory filled up: {evicted:,} entries were evicted to make room for new ones "
        f"({format_bytes(shm['capacity_bytes'])} of store.shm_bytes). Raise store.shm_bytes if the dataset is "
        f"read more than once."))]


def _private_copies(r: dict[str, Any]) -> list[Advice]:
    out = []
    for c in r["clients"]:
        dirty = (c["memory"] or {}).get("segments", {}).get("private_dirty", 0)
        if dirty:
            out.append(_advice("private-copies", (
                f"pid {c['pid']} (trainer {c['trainer']}) holds {format_bytes(dirty)} of private copies of cached "
                f"entries: it writes into the views it gets (an in-place op such as t.add_(1), t.mul_(...) or "
                f"a transform with out=), and every page written is copied into that process. Clone before "
                f"changing a tensor (t = t.clone()) or use out-of-place ops (t = t + 1)."), [c["pid"]]))
    return out


def _churn(r: dict[str, Any]) -> list[Advice]:
    s = r["sessions"]
    if s["interval_s"] <= 0 or max(s["opened"], s["closed"]) < CHURN:
        return []
    return [_advice("workers-not-persistent", (
        f"Client processes come and go: {s['opened']} sessions opened and {s['closed']} closed in "
        f"{s['interval_s']:g} s. DataLoader workers that are not persistent start again every epoch, and each "
        f"new worker maps the segments and fills its handle cache again; pass persistent_workers=True to the "
        f"DataLoader (or use CacheClient.loader, which needs no workers)."))]


def _small_shm(r: dict[str, Any]) -> list[Advice]:
    d, out = r["daemon"], []
    if d["shm_backend"] == "dev-shm" and 0 < d["shm_dir_size"] <= CONTAINER_SHM_BYTES:
        out.append(_advice("container-shm", (
            f"The daemon's shm directory {d['shm_dir']} is a {format_bytes(d['shm_dir_size'])} tmpfs, a container's "
            f"default /dev/shm: the cache fits almost nothing there. Set store.shm_backend = \"memfd\" (no /dev/shm "
            f"needed), or give the container more (docker --shm-size=16g, a larger /dev/shm emptyDir).")))
    local = r["local_shm"]
    if local and 0 < local["size"] <= CONTAINER_SHM_BYTES:
        out.append(_advice("container-shm", (
            f"/dev/shm where cachectl runs is a {format_bytes(local['size'])} tmpfs, a container's default: "
            f"DataLoader workers pass batches to the trainer through it and fail with a bus error when it is "
            f"full. Run the trainer's container with --shm-size=16g (or a larger /dev/shm emptyDir).")))
    return out


def _limits(r: dict[str, Any]) -> list[Advice]:
    out = []
    max_maps = r["daemon"]["max_map_count"]
    for who, maps, fds, max_fds, pid in _processes(r):
        if max_maps and maps and maps > NEAR_LIMIT * max_maps:
            out.append(_advice("max-map-count", (
                f"{who} has {maps:,} memory mappings of vm.max_map_count {max_maps:,}: past it, mapping fails "
                f"(\"out of memory\"). Raise it: sysctl -w vm.max_map_count={4 * max_maps}."), [pid]))
        if max_fds and fds and fds > NEAR_LIMIT * max_fds:
            out.append(_advice("open-files", (
                f"{who} has {fds:,} open files of its limit {max_fds:,}. Raise it (ulimit -n, or LimitNOFILE= "
                f"in the service)."), [pid]))
    return out


def _processes(r: dict[str, Any]) -> list[tuple[str, int, int, int, int]]:
    d = r["daemon"]
    rows = [("the daemon", d["maps"], d["open_fds"], d["max_fds"], d["pid"])]
    rows += [(f"pid {c['pid']}", c["memory"]["maps"], c["open_fds"] or 0, c["max_fds"] or 0, c["pid"])
             for c in r["clients"] if c["readable"]]
    return rows


CHECKS: list[Callable[[dict[str, Any]], list[Advice]]] = [_shm_too_small, _private_copies, _churn, _small_shm,
                                                          _limits]


def recommend(report: dict[str, Any]) -> list[Advice]:
    """Every recommendation the checks make for a diagnose report."""
    return [advice for check in CHECKS for advice in check(report)]
