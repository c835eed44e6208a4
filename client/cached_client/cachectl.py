"""`cachectl`: warm, evict and report on the local cached daemon.

Errors print one line, `ErrorType: message`, and exit non-zero; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from .client import CacheClient
from .errors import CacheError
from .specs import CROPS, IMAGE_EXTENSIONS, ImageSpec, Spec, TextSpec
from .units import format_bytes

__all__ = ["main"]



def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachectl", description="Control the local cached daemon.")
    p.add_argument("--address", help="daemon address (default: CACHED_ADDRESS, then the standard sockets)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an unreachable daemon")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("health", help="print the daemon's health (exit 0 only when SERVING)")
    w = sub.add_parser("warm", help="compute entries ahead of training, with a progress bar")
    w.add_argument("--encoder", required=True)
    w.add_argument("--size", type=_size, help="target WIDTHxHEIGHT for images")
    w.add_argument("--crop", default="center", choices=CROPS)
    w.add_argument("--flip", default="none", choices=["none", "x", "both"],
                   help="none, x (flipped only), or both (each image twice)")
    w.add_argument("--manifest", help='JSONL: {"path": ..., "size": [w, h], "crop": ..., "flip": ...} '
                                      'or {"text": ...} per line')
    w.add_argument("--batch", type=int, default=4096, help="items per Warm call")
    w.add_argument("paths", nargs="*", help="image files or directories (searched recursively)")
    e = sub.add_parser("evict", help="drop entries from the cache")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--all", action="store_true")
    g.add_argument("--encoder")
    g.add_argument("--source-prefix")
    g.add_argument("--key", nargs="+", dest="keys")
    e.add_argument("--tier", default="all", choices=["shm", "disk", "all"])
    s = sub.add_parser("stats", help="tier sizes and counters")
    s.add_argument("--json", action="store_true")
    ls = sub.add_parser("ls", help="list entries, least recently used first")
    ls.add_argument("--tier", default="all", choices=["shm", "disk", "all"])
    ls.add_argument("--encoder")
    ls.add_argument("--source-prefix")
    ls.add_argument("--limit", type=int, default=50, help="at most this many rows (0: all)")
    ls.add_argument("--json", action="store_true")
    im = sub.add_parser("import", help="import another trainer's latent cache")
    im.add_argument("--format", required=True, choices=["ai-toolkit", "kohya", "simpletuner"])
    im.add_argument("--encoder", required=True, help="the encoder the cache was made with")
    im.add_argument("--size", type=_size, help="import only latents of this WIDTHxHEIGHT")
    im.add_argument("--image-root", help="SimpleTuner: the directory of the images")
    im.add_argument("--arch", help="kohya: only files with this arch suffix (sdxl, sd3, flux, ...)")
    im.add_argument("--crop", default="center", choices=CROPS, help="crop to record where the cache doesn't say")
    im.add_argument("path", help="the cache directory (for ai-toolkit and kohya: the image directory)")
    return p


def _walk(paths: list[str]) -> Iterator[str]:
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                        yield os.path.join(root, name)
        else:
            yield path


def _flips(mode: str) -> tuple[bool, ...]:
    return {"none": (False,), "x": (True,), "both": (False, True)}[mode]


def _manifest_specs(path: str, args: argparse.Namespace) -> list[Spec]:
    specs: list[Spec] = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item: dict[str, Any] = json.loads(line)
                if "text" in item:
                    specs.append(TextSpec(item["text"]))
                    continue
                size = tuple(item["size"]) if "size" in item else args.size
                if size is None:
                    raise ValueError("no size in the line and no --size")
                flip = item.get("flip", args.flip != "none")
                crop = item.get("crop", args.crop)
                specs.append(ImageSpec(item["path"], size, tuple(crop) if isinstance(crop, list) else crop, flip))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{n}: {exc}") from None
    return specs


def _specs(args: argparse.Namespace) -> list[Spec]:
    if args.manifest:
        return _manifest_specs(args.manifest, args)
    if not args.paths:
        raise ValueError("warm needs PATH... or --manifest FILE")
    if args.size is None:
        raise ValueError("warm needs --size WxH for images")
    return [ImageSpec(p, args.size, args.crop, flip) for p in _walk(args.paths) for flip in _flips(args.flip)]


class _Bar:
    """A one-line progress bar on stderr with items/s; plain lines when stderr is not a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last_line = self.start

    def update(self, done: int, failed: int, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done / elapsed
        frac = done / self.total if self.total else 1.0
        filled = int(frac * 30)
        text = (f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} {rate:,.1f} items/s"
                f" {failed} failed")
        if self.tty:
            sys.stderr.write("\r" + text + ("\n" if final else ""))
            sys.stderr.flush()
        elif final or time.monotonic() - self.last_line > 5:
            print(text, file=sys.stderr, flush=True)
            self.last_line = time.monotonic()


def _warm(client: CacheClient, args: argparse.Namespace) -> int:
    specs = _specs(args)
    bar = _Bar(len(specs))
    failed: list[tuple[int, Spec, CacheError]] = []
    computed = cached = 0
    for start in range(0, len(specs), args.batch):
        chunk = specs[start:start + args.batch]

        def progress(p: Any, base: int = start) -> None:
            bar.update(base + p.done, len(failed) + len(p.errors))

        result = client.warm(chunk, encoder=args.encoder, progress=progress)
        failed.extend((start + i, spec, err) for i, spec, err in result.failed)
        computed += result.computed
        cached += result.cached
    bar.update(len(specs), len(failed), final=True)
    print(f"warmed {len(specs) - len(failed)} of {len(specs)}: {computed} computed, {cached} already cached, "
          f"{len(failed)} failed")
    for _, spec, err in failed:
        what = spec.path if isinstance(spec, ImageSpec) else repr(spec.text[:60])
        print(f"failed: {what}: {type(err).__name__}: {err}", file=sys.stderr)
    return 1 if failed else 0


def _stats(client: CacheClient, as_json: bool) -> int:
    s = client.stats()
    if as_json:
        print(json.dumps(s, indent=2, sort_keys=True))
        return 0
    print(f"instance {s['instance']}, up {s['uptime_s']:.0f} s")
    for name, t in s["tiers"].items():
        print(f"  {name:5s} {t['entries']:>9,} entries  {format_bytes(t['bytes']):>10} of "
              f"{format_bytes(t['capacity_bytes'])}")
    print(f"  hits {s.get('hits', 0):,}  misses {s.get('misses', 0):,}  computed {s.get('computed', 0):,}  "
          f"evictions {s.get('evictions', 0):,}  errors {s.get('errors', 0):,}  leases {s['leases']:,}")
    for name, e in s["encoders"].items():
        mean = e["items"] / e["batches"] if e["batches"] else 0
        print(f"  encoder {name}: {e['kind']} on {','.join(e['devices'])}, {e['items']:,} items in "
              f"{e['batches']:,} batches (mean {mean:.1f}, max {e['max_batch_seen']}), busy {e['busy_s']:.1f} s")
    return 0


def _ls(client: CacheClient, args: argparse.Namespace) -> int:
    rows, total = client.ls(tier=args.tier, encoder=args.encoder, source_prefix=args.source_prefix,
                            limit=args.limit)
    if args.json:
        print(json.dumps({"entries": rows, "total": total}, indent=2))
        return 0
    for r in rows:
        spec = json.loads(r["spec"]) if r["spec"] else []
        what = f"{spec[2]}x{spec[3]} {spec[4]}{' flip' if spec[5] else ''}" if spec[:1] == ["i"] else "text"
        held = f" held x{r['leases']}" if r["leases"] else ""
        print(f"{r['key'][:16]}  {r['tier']:4s} {format_bytes(r['bytes']):>10}  {r['encoder']:8s} {what:20s} "
              f"{r['source']}{held}")
    print(f"{len(rows)} of {total} entries")
    return 0


def _import(client: CacheClient, args: argparse.Namespace) -> int:
    def progress(p: Any) -> None:
        print(f"\r{p.seen} cache files read, {p.imported} imported", end="", file=sys.stderr, flush=True)

    r = client.import_cache(args.format, args.path, args.encoder, size=args.size, image_root=args.image_root,
                            arch=args.arch, crop=args.crop, progress=progress)
    print(file=sys.stderr)
    skipped = sum(r["skipped"].values())
    print(f"imported {r['imported']} of {r['seen']} cached latents ({r['already']} already cached, "
          f"{skipped} skipped)")
    for reason, n in sorted(r["skipped"].items(), key=lambda kv: -kv[1]):
        print(f"  skipped {n}: {reason}")
    for line in r["examples"]:
        print(f"    {line}", file=sys.stderr)
    return 1 if r["seen"] and not (r["imported"] or r["already"]) else 0


def run(args: argparse.Namespace) -> int:
    client = CacheClient(args.address, connect_timeout=args.timeout)
    if args.command == "health":
        status = client.health()
        print(status)
        return 0 if status == "SERVING" else 1
    if args.command == "warm":
        return _warm(client, args)
    if args.command == "evict":
        r = client.evict(all=args.all, encoder=args.encoder, source_prefix=args.source_prefix,
                         keys=args.keys or (), tier=args.tier)
        print(f"evicted {r['entries']} entries from shared memory ({format_bytes(r['bytes'])} freed now, "
              f"{r['pending']} still held by clients, freed on release), {r['disk_entries']} from disk "
              f"({format_bytes(r['disk_bytes'])})")
        return 0
    if args.command == "ls":
        return _ls(client, args)
    if args.command == "import":
        return _import(client, args)
    return _stats(client, args.json)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\nInterrupted", file=sys.stderr)
        return 130
    except (CacheError, ValueError, OSError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
