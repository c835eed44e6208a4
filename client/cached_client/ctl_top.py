"""`cachectl top`: a live view of the daemon, refreshed every second; q quits.

Per client process: items per second (the change of its item count between two refreshes), hit
rate, leases and leased bytes; per encoder: its queue, items per second, batch sizes and how busy it
is. On a terminal it is a curses screen; with --json (or when stdout is not a terminal) each refresh
is printed instead (with --json: one JSON document, the rates over one interval; with --count N too,
N documents, one a line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from . import ctl_config
from .client import CacheClient
from .ctl_output import percent
from .ctl_procs import describe
from .units import format_bytes

__all__ = ["add_parser", "Sample", "frame", "lines"]

Sample = dict[str, Any]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("top", parents=[common], help="live per-client and per-encoder rates (q quits)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--count", type=int, default=0, help="stop after this many refreshes (0: until q; with --json, 1)")
    p.set_defaults(func=run)


def sample(client: CacheClient) -> Sample:
    clients = client.clients()
    return {"t": time.monotonic(), "stats": client.stats(), "caller": clients["caller"],
            "clients": {c["session"]: c for c in clients["clients"]}}


def _rate(now: float, before: float, dt: float) -> float:
    return max(0.0, now - before) / dt if dt > 0 else 0.0


def _client_rows(prev: Sample, cur: Sample, dt: float, commands: dict[int, str]) -> list[dict[str, Any]]:
    rows = []
    for session, c in cur["clients"].items():
        if session == cur["caller"]:
            continue
        old = prev["clients"].get(session, c)
        if c["pid"] not in commands:
            commands[c["pid"]] = describe(c["pid"])[0]
        rows.append({"pid": c["pid"], "uid": c["uid"], "items_per_s": round(_rate(c["items"], old["items"], dt), 1),
                     "hit_rate": c["hits"] / c["items"] if c["items"] else None, "items": c["items"],
                     "leases": c["leases"], "leased_bytes": c["leased_bytes"], "age_s": round(c["age_s"]),
                     "command": commands[c["pid"]]})
    return sorted(rows, key=lambda r: (-r["items_per_s"], r["pid"]))


def _encoder_rows(prev: Sample, cur: Sample, dt: float) -> list[dict[str, Any]]:
    rows = []
    for name, e in cur["stats"]["encoders"].items():
        old = prev["stats"]["encoders"].get(name, e)
        batches = e["batches"] - old["batches"]
        rows.append({"encoder": name, "queued": e["queued"], "items_per_s": round(_rate(e["items"], old["items"], dt), 1),
                     "batch_mean": round((e["items"] - old["items"]) / batches, 1) if batches else 0.0,
                     "max_batch_seen": e["max_batch_seen"], "fit_limit": e["fit_limit"], "max_batch": e["max_batch"],
                     "busy": round(_rate(e["busy_s"], old["busy_s"], dt), 3)})
    return rows


def frame(prev: Sample, cur: Sample, commands: dict[int, str]) -> dict[str, Any]:
    """What one refresh shows: rates between two samples."""
    dt = cur["t"] - prev["t"]
    s = cur["stats"]
    return {"instance": s["instance"], "uptime_s": s["uptime_s"], "tiers": s["tiers"], "leases": s["leases"],
            "clients": _client_rows(prev, cur, dt, commands), "encoders": _encoder_rows(prev, cur, dt)}


def lines(f: dict[str, Any]) -> list[str]:
    """A frame as text rows."""
    shm = f["tiers"]["shm"]
    out = [f"cached top - instance {f['instance']}, up {f['uptime_s']:.0f} s, {len(f['clients'])} client processes, "
           f"shm {format_bytes(shm['bytes'])} of {format_bytes(shm['capacity_bytes'])}, {f['leases']:,} leases   "
           f"(q quits)", "",
           f"{'PID':>8} {'UID':>6} {'ITEMS/S':>9} {'HIT%':>5} {'ITEMS':>10} {'LEASES':>8} {'LEASED':>10} {'AGE':>7}  COMMAND"]
    for c in f["clients"]:
        hit = percent(c["hit_rate"], 1) if c["hit_rate"] is not None else "-"
        out.append(f"{c['pid']:>8} {c['uid']:>6} {c['items_per_s']:>9,.1f} {hit:>5} {c['items']:>10,} {c['leases']:>8,} "
                   f"{format_bytes(c['leased_bytes']):>10} {c['age_s']:>6}s  {c['command']}")
    out += ["", f"{'ENCODER':<12} {'QUEUED':>7} {'ITEMS/S':>9} {'BATCH':>6} {'MAX SEEN':>9} {'LIMIT':>9} {'BUSY':>5}"]
    for e in f["encoders"]:
        out.append(f"{e['encoder']:<12} {e['queued']:>7,} {e['items_per_s']:>9,.1f} {e['batch_mean']:>6.1f} "
                   f"{e['max_batch_seen']:>9} {str(e['fit_limit']) + '/' + str(e['max_batch']):>9} "
                   f"{percent(e['busy'], 1):>5}")
    return out


def _draw(screen: Any, rows: list[str]) -> None:
    screen.erase()
    height, width = screen.getmaxyx()
    for y, row in enumerate(rows[:height]):
        screen.addnstr(y, 0, row, max(0, width - 1))
    screen.refresh()


def _curses(screen: Any, client: CacheClient, args: argparse.Namespace) -> None:
    import curses

    curses.curs_set(0)
    commands: dict[int, str] = {}
    prev, shown = sample(client), 0
    _draw(screen, lines(frame(prev, prev, commands)))
    screen.timeout(int(args.interval * 1000))
    while not args.count or shown < args.count:
        if screen.getch() in (ord("q"), ord("Q")):
            return
        cur = sample(client)
        _draw(screen, lines(frame(prev, cur, commands)))
        prev, shown = cur, shown + 1


def _stream(client: CacheClient, args: argparse.Namespace) -> None:
    commands: dict[int, str] = {}
    prev, shown = sample(client), 0
    count = args.count or (1 if args.json else 0)  # --json alone: one document, as every command prints
    while not count or shown < count:
        time.sleep(args.interval)
        cur = sample(client)
        f = frame(prev, cur, commands)
        print(json.dumps(f, sort_keys=True) if args.json else "\n".join([*lines(f), ""]), flush=True)
        prev, shown = cur, shown + 1


def run(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise ValueError(f"--interval must be positive, got {args.interval!r}")
    if args.count < 0:
        raise ValueError(f"--count must be >= 0, got {args.count!r}")
    client = ctl_config.client_for(args)
    if args.json or not sys.stdout.isatty():
        _stream(client, args)
    else:
        import curses  # here: a Python built without it still runs every other command

        curses.wrapper(_curses, client, args)
    return 0
