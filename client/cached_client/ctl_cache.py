"""The cachectl commands that are one call and one report: health, evict, stats, ls, import, leases
and inspect. Each prints text, or with --json one JSON document."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from . import ctl_config
from .ctl_output import print_json
from .ctl_warm import size_arg
from .errors import InvalidSpec
from .specs import CROPS
from .units import format_bytes

__all__ = ["add_parsers"]

Command = Callable[[argparse.Namespace], int]


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    def command(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help)
        p.set_defaults(func=func)
        return p

    command("health", health, "print the daemon's health (exit 0 only when SERVING)")
    e = command("evict", evict, "drop entries from the cache")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--all", action="store_true")
    g.add_argument("--encoder")
    g.add_argument("--source-prefix")
    g.add_argument("--key", nargs="+", dest="keys", metavar="KEY",
                   help="keys, or prefixes only one entry has (such as the 16 digits ls prints); one that "
                        "matches no entry or several fails the command and nothing is evicted")
    e.add_argument("--tier", default="all", choices=["shm", "disk", "remote", "all"],
                   help="all: shm and disk; remote (the bucket every node shares) only when named, with --yes")
    e.add_argument("--yes", action="store_true", help="confirm an eviction from the remote tier")
    command("stats", stats, "tier sizes and counters")
    ls = command("ls", list_entries, "list entries, least recently used first")
    ls.add_argument("--tier", default="all", choices=["shm", "disk", "remote", "all"],
                    help="all: shm and disk; remote lists the bucket's objects by key (no encoder or source)")
    ls.add_argument("--encoder")
    ls.add_argument("--source-prefix")
    ls.add_argument("--limit", type=int, default=50, help="at most this many rows (0: all)")
    im = command("import", import_cache, "import another trainer's latent cache")
    im.add_argument("--format", required=True, choices=["ai-toolkit", "kohya", "simpletuner"])
    im.add_argument("--encoder", required=True, help="the encoder the cache was made with")
    im.add_argument("--size", type=size_arg, help="import only latents of this WIDTHxHEIGHT")
    im.add_argument("--image-root", help="SimpleTuner: the directory of the images")
    im.add_argument("--arch", help="kohya: only files with this arch suffix (sdxl, sd3, flux, ...)")
    im.add_argument("--crop", default="center", choices=CROPS, help="crop to record where the cache doesn't say")
    im.add_argument("path", help="the cache directory (for ai-toolkit and kohya: the image directory)")
    command("leases", leases, "leases per client process: pid, uid, leases, bytes")
    i = command("inspect", inspect, "one entry: spec, tensors, tiers, size")
    i.add_argument("key", help="the entry's key, or a prefix only it has (such as the 16 digits ls prints)")


def health(args: argparse.Namespace) -> int:
    status = ctl_config.client_for(args).health()
    print_json({"status": status}) if args.json else print(status)
    return 0 if status == "SERVING" else 1


def evict(args: argparse.Namespace) -> int:
    if args.tier == "remote" and not args.yes:
        raise InvalidSpec("evicting from the remote tier deletes objects every node shares: add --yes to confirm")
    r = ctl_config.client_for(args).evict(all=args.all, encoder=args.encoder, source_prefix=args.source_prefix,
                                          keys=args.keys or (), tier=args.tier)
    if args.json:
        print_json(r)
        return 0
    print(f"evicted {r['entries']} entries from shared memory ({format_bytes(r['bytes'])} freed now, "
          f"{r['pending']} still held by clients, freed on release), {r['disk_entries']} from disk "
          f"({format_bytes(r['disk_bytes'])})" + (f", {r['remote_entries']} from the remote tier "
                                                  f"({format_bytes(r['remote_bytes'])})" if args.tier == "remote" else ""))
    return 0


def stats(args: argparse.Namespace) -> int:
    s = ctl_config.client_for(args).stats()
    if args.json:
        print_json(s)
        return 0
    print(f"instance {s['instance']}, up {s['uptime_s']:.0f} s")
    for name, t in s["tiers"].items():
        if name == "remote":  # its size is known only by listing the bucket
            print(f"  remote {t['backend']}: {s.get('remote_hits', 0):,} hits, {s.get('remote_misses', 0):,} misses, "
                  f"{s.get('remote_uploads', 0):,} uploads, {s.get('remote_upload_queue_depth', 0):,} queued, "
                  f"{s.get('remote_errors', 0):,} errors")
            continue
        held = f", {t['backend']} holding {format_bytes(t['held_bytes'])}" if t.get("backend") else ""
        print(f"  {name:5s} {t['entries']:>9,} entries  {format_bytes(t['bytes']):>10} of "
              f"{format_bytes(t['capacity_bytes'])}{held}")
    print(f"  hits {s.get('hits', 0):,}  misses {s.get('misses', 0):,}  computed {s.get('computed', 0):,}  "
          f"evictions {s.get('evictions', 0):,}  errors {s.get('errors', 0):,}  leases {s['leases']:,}")
    for name, e in s["encoders"].items():
        mean = e["items"] / e["batches"] if e["batches"] else 0
        print(f"  encoder {name}: {e['kind']} on {','.join(e['devices'])}, {e['items']:,} items in "
              f"{e['batches']:,} batches (mean {mean:.1f}, max {e['max_batch_seen']}), busy {e['busy_s']:.1f} s, "
              f"{e['queued']} queued")
    return 0


def _what(spec_json: str) -> str:
    spec = json.loads(spec_json) if spec_json else []
    if spec[:1] == ["i"]:
        return f"{spec[2]}x{spec[3]} {spec[4]}{' flip' if spec[5] else ''}"
    return "text" if spec[:1] == ["t"] else "?"


def list_entries(args: argparse.Namespace) -> int:
    rows, total = ctl_config.client_for(args).ls(tier=args.tier, encoder=args.encoder,
                                                 source_prefix=args.source_prefix, limit=args.limit)
    if args.json:
        print_json({"entries": rows, "total": total})
        return 0
    for r in rows:
        held = f" held x{r['leases']}" if r["leases"] else ""
        print(f"{r['key'][:16]}  {r['tier']:4s} {format_bytes(r['bytes']):>10}  {r['encoder']:8s} "
              f"{_what(r['spec']):20s} {r['source']}{held}")
    print(f"{len(rows)} of {total} entries")
    return 0


def import_cache(args: argparse.Namespace) -> int:
    def progress(p: Any) -> None:
        print(f"\r{p.seen} cache files read, {p.imported} imported", end="", file=sys.stderr, flush=True)

    r = ctl_config.client_for(args).import_cache(
        args.format, args.path, args.encoder, size=args.size, image_root=args.image_root, arch=args.arch,
        crop=args.crop, progress=progress)
    print(file=sys.stderr)
    if args.json:
        print_json(r)
    else:
        print(f"imported {r['imported']} of {r['seen']} cached latents ({r['already']} already cached, "
              f"{sum(r['skipped'].values())} skipped)")
        for reason, n in sorted(r["skipped"].items(), key=lambda kv: -kv[1]):
            print(f"  skipped {n}: {reason}")
        for line in r["examples"]:
            print(f"    {line}", file=sys.stderr)
    return 1 if r["seen"] and not (r["imported"] or r["already"]) else 0


def leases(args: argparse.Namespace) -> int:
    report = ctl_config.client_for(args).clients()
    rows = [c for c in report["clients"] if c["session"] != report["caller"]]
    if args.json:
        print_json({"clients": [{k: c[k] for k in ("pid", "uid", "session", "leases", "leased_bytes")} for c in rows]})
        return 0
    print(f"{'pid':>8} {'uid':>6} {'leases':>8} {'bytes':>11}")
    for c in rows:
        print(f"{c['pid']:>8} {c['uid']:>6} {c['leases']:>8,} {format_bytes(c['leased_bytes']):>11}")
    print(f"{len(rows)} client processes, {sum(c['leases'] for c in rows):,} leases, "
          f"{format_bytes(sum(c['leased_bytes'] for c in rows))}")
    return 0


def inspect(args: argparse.Namespace) -> int:
    r = ctl_config.client_for(args).inspect(args.key)
    if args.json:
        print_json(r)
        return 0
    print(f"key      {r['key']}")
    print(f"encoder  {r['encoder']}")
    print(f"source   {r['source']}")
    print(f"spec     {_what(r['spec'])}  {r['spec']}")
    print("tiers    " + ", ".join(f"{t} ({format_bytes(r['bytes'][t])})" for t in r["tiers"]) +
          (f", held by {r['leases']} lease(s)" if r["leases"] else ""))
    for t in r["tensors"]:
        print(f"tensor   {t['name']:16s} {t['dtype']:9s} {'x'.join(map(str, t['shape'])):>14s}  {format_bytes(t['bytes'])}")
    return 0
