"""`cachectl diagnose`: where the memory is (the daemon's, by tier, by encoder and device; each client
process's, grouped by trainer, and what it maps of the daemon's segments), the limits that bite
(/dev/shm, vm.max_map_count, open files), and recommendations in plain words.

The daemon reports what only it can see (Stats, Diagnose, Clients); cachectl reads /proc for the
client pids it reports (ctl_procs.py). Clients are sampled twice, `--interval` seconds apart, to
see sessions come and go (workers that are not persistent).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict
from typing import Any

from . import ctl_config
from .address import socket_path
from .client import CacheClient
from .ctl_advice import recommend
from .ctl_output import percent, print_json, size
from .ctl_procs import group_trainers, read_client
from .procinfo import dir_usage
from .session import current_session, forget_session
from .units import format_bytes

__all__ = ["add_parser", "gather"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("diagnose", parents=[common], help="memory by tier, encoder and client process, limits, "
                                                          "and what to change")
    p.add_argument("--interval", type=float, default=3.0,
                   help="seconds between the two samples of client sessions (0: one sample)")
    p.set_defaults(func=run)


def _why_not(clients: dict[str, Any]) -> str:
    """Why the daemon's pids can't be read here ("" when they can)."""
    me = next((c for c in clients["clients"] if c["session"] == clients["caller"]), None)
    if me is None:
        return "not readable: connected over TCP, the pids are the daemon machine's"
    if me["pid"] != os.getpid():
        return "not readable: the daemon is in another pid namespace (a container)"
    return ""


def _renew_session(client: CacheClient) -> None:
    """Ends this process's session, so that the next call opens a new one: its id, issued after every
    session opened since the first sample, counts them (TCP has no sessions: nothing to do)."""
    path = socket_path(client.target)
    session = current_session(path) if path is not None else None
    if path is not None and session is not None:
        forget_session(path, session.token)


def _sessions(first: dict[str, Any], second: dict[str, Any], interval: float) -> dict[str, Any]:
    """Client sessions opened and closed between two samples, cachectl's own left out. Session ids
    are issued in order, and the second sample comes from a new session (over TCP: from the newest
    session still there), so every id between the newest of the first sample and it was opened
    meanwhile, whether or not that process is still there."""
    before = {c["session"] for c in first["clients"]} - {first["caller"]}
    after = {c["session"] for c in second["clients"]} - {second["caller"]}
    newest = max(before | {first["caller"]})
    last = second["caller"] - 1 if second["caller"] else max(after, default=0)
    opened = max(0, last - newest)
    closed = len(before - after) + opened - len({s for s in after if s > newest})
    return {"interval_s": interval, "opened": opened, "closed": closed, "connected": len(after),
            "newest_session": max(last, newest)}


def gather(client: CacheClient, interval: float) -> dict[str, Any]:
    """The whole report, recommendations included (the --json document)."""
    first = client.clients()
    if interval > 0:
        time.sleep(interval)
        _renew_session(client)
    stats, daemon, second = client.stats(), client.diagnose(), client.clients()
    names = {s["name"] for s in daemon["segments"]}
    why = _why_not(second)
    rows = [read_client(c, names, why) for c in second["clients"] if c["session"] != second["caller"]]
    local = dir_usage("/dev/shm") if os.path.isdir("/dev/shm") else None
    report = {"daemon": {**daemon, "instance": stats["instance"], "uptime_s": stats["uptime_s"]}, "stats": stats,
              "clients": rows, "trainers": group_trainers(rows), "sessions": _sessions(first, second, interval),
              "local_shm": asdict(local) if local else None}
    report["recommendations"] = recommend(report)
    return report


def _print_daemon(r: dict[str, Any]) -> None:
    d, s = r["daemon"], r["stats"]
    print(f"daemon pid {d['pid']} (instance {d['instance']}), up {d['uptime_s']:.0f} s")
    print(f"  memory      RSS {format_bytes(d['rss'])}, PSS {format_bytes(d['pss'])}, USS {format_bytes(d['uss'])}")
    for name, t in s["tiers"].items():
        where = (f"{d['shm_backend']}, holding {format_bytes(t.get('held_bytes', 0))} of memory" if name == "shm"
                 else d["disk_dir"])
        print(f"  {name} tier{' ' * (7 - len(name))}{t['entries']:,} entries, {format_bytes(t['bytes'])} of "
              f"{format_bytes(t['capacity_bytes'])} ({percent(t['bytes'], t['capacity_bytes'])}, {where})")
    print(f"  evictions   {s.get('capacity_evictions', 0):,} to make room, {s.get('evictions_explicit', 0):,} asked for")
    print(f"  key memo    {format_bytes(s.get('key_memo_bytes', 0))}, decoding {format_bytes(s.get('decoded_bytes_in_flight', 0))}")
    for name, e in s["encoders"].items():
        params = ", ".join(f"{dev} {format_bytes(n)}" for dev, n in e["parameter_bytes"].items()) or "not reported"
        print(f"  encoder {name} ({e['kind']}): parameters {params}; {e['queued']} queued")
    for dev, n in d["device_reserved_bytes"].items():
        print(f"  device {dev}: {format_bytes(n)} held by torch's allocator")
    print(f"  shm dir     {d['shm_dir']}: {format_bytes(d['shm_dir_size'])}, {format_bytes(d['shm_dir_used'])} used, "
          f"{format_bytes(d['shm_dir_free'])} free")
    print(f"  limits      {d['open_fds']:,} open files of {d['max_fds'] or 'unlimited'}, {d['maps']:,} mappings of "
          f"vm.max_map_count {d['max_map_count']:,}")


def _print_client(c: dict[str, Any]) -> None:
    held = f"{c['leases']:,} leases ({format_bytes(c['leased_bytes'])}), {c['items']:,} items, {c['hits']:,} hits"
    if not c["readable"]:
        print(f"    pid {c['pid']} uid {c['uid']}: {c['why']}; {held}")
        return
    m, seg = c["memory"], c["memory"]["segments"]
    print(f"    pid {c['pid']} uid {c['uid']}: PSS {size(m['pss'])}, USS {size(m['uss'])}; maps the daemon's segments: "
          f"Rss {format_bytes(seg['rss'])}, Pss {format_bytes(seg['pss'])}, Private_Dirty {format_bytes(seg['private_dirty'])}; "
          f"{held}; {c['open_fds']} open files, {m['maps']:,} mappings  {c['command']}")


def _print(r: dict[str, Any]) -> None:
    _print_daemon(r)
    s = r["sessions"]
    churn = f", {s['opened']} sessions opened and {s['closed']} closed in {s['interval_s']:g} s" if s["interval_s"] else ""
    print(f"clients: {len(r['clients'])} processes in {len(r['trainers'])} trainer(s){churn}")
    for t in r["trainers"]:
        print(f"  trainer {t['pid']} {t['command']}: PSS {size(t['pss'])}, USS {size(t['uss'])}, "
              f"{len(t['processes'])} process(es), {t['leases']:,} leases ({format_bytes(t['leased_bytes'])})")
        for c in r["clients"]:
            if c["trainer"] == t["pid"]:
                _print_client(c)
    print("recommendations:" if r["recommendations"] else "recommendations: none, nothing looks wrong")
    for a in r["recommendations"]:
        print(f"  - {a['text']}")


def run(args: argparse.Namespace) -> int:
    report = gather(ctl_config.client_for(args), args.interval)
    print_json(report) if args.json else _print(report)
    return 0
