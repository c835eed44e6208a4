"""The client processes a daemon reports, as /proc shows them to cachectl, grouped by trainer.

Pids come from the daemon, in its pid namespace: they are read here only when cachectl shares it
(its own pid as the daemon sees it is its pid here); otherwise, or where /proc refuses (another
user's process without privileges), a process is "not readable" and only the daemon's numbers show.

A trainer is the process its readers work for: a client whose parent is a client belongs to the
topmost client above it (a trainer that reads, and its DataLoader workers); a client with no client
above or below it belongs to its parent process (a trainer whose workers read, and it does not).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import psutil

from .procinfo import fd_limit, open_fds, read_memory

__all__ = ["describe", "read_client", "group_trainers"]

_CMDLINE_CHARS = 80


def describe(pid: int) -> tuple[str, int]:
    """(command line or name, parent pid) of a process; ("", 0) when it can't be read."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            cmdline = " ".join(proc.cmdline()) or proc.name()
            parent = proc.ppid()
    except (psutil.Error, OSError):
        return "", 0
    return (cmdline if len(cmdline) <= _CMDLINE_CHARS else cmdline[:_CMDLINE_CHARS - 3] + "..."), parent


def read_client(client: dict[str, Any], segments: Collection[str], why_not: str) -> dict[str, Any]:
    """The daemon's row of a client with what /proc says of it: its memory and what it maps of the
    daemon's segments, fds, command line, parent. `why_not` says why pids can't be read here ("":
    they can)."""
    pid = client["pid"]
    row = {**client, "readable": False, "why": why_not, "command": "", "ppid": 0, "memory": None,
           "open_fds": None, "max_fds": None}
    if why_not:
        return row
    memory = read_memory(pid, segments)
    row["command"], row["ppid"] = describe(pid)
    if memory is None:
        row["why"] = "not readable: /proc refuses (another user's process, or it exited)"
        return row
    row.update(readable=True, memory=memory.as_dict(), open_fds=open_fds(pid), max_fds=fd_limit(pid))
    return row


def _trainer_of(pid: int, parents: dict[int, int], clients: set[int], readers: set[int]) -> int:
    top = pid
    while parents.get(top, 0) in clients:
        top = parents[top]
    if top != pid or top in readers:
        return top
    parent = parents.get(pid, 0)
    return parent if parent > 1 else pid


def group_trainers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trainers with their client processes and the sums of their memory and leases, largest PSS first.
    A PSS sum is each process's share of what they map together: it does not count shared pages twice."""
    parents = {r["pid"]: r["ppid"] for r in rows if r["readable"]}
    clients = set(parents)
    readers = {p for p in parents.values() if p in clients}  # clients with a client child
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        trainer = _trainer_of(r["pid"], parents, clients, readers) if r["readable"] else r["pid"]
        r["trainer"] = trainer
        groups.setdefault(trainer, []).append(r)
    return sorted((_trainer(pid, members) for pid, members in groups.items()), key=lambda t: -(t["pss"] or 0))


def _sum(members: list[dict[str, Any]], *path: str) -> int | None:
    """The sum over members of memory[path...]; None when no member could be read."""
    values = []
    for m in members:
        value: Any = m["memory"]
        for key in path:
            value = None if value is None else value[key]
        if value is not None:
            values.append(value)
    return sum(values) if values else None


def _trainer(pid: int, members: list[dict[str, Any]]) -> dict[str, Any]:
    member_pids = {m["pid"] for m in members}
    command = next((m["command"] for m in members if m["pid"] == pid), "") or describe(pid)[0]
    return {"pid": pid, "command": command, "reads": pid in member_pids, "processes": sorted(member_pids),
            "pss": _sum(members, "pss"), "uss": _sum(members, "uss"),
            "private_dirty": _sum(members, "segments", "private_dirty"),
            "leases": sum(m["leases"] for m in members), "leased_bytes": sum(m["leased_bytes"] for m in members)}
