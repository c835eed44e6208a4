"""`cachectl warm`: compute entries ahead of training, with a progress bar; a non-zero exit and the
list of failed items when any failed, and when there was nothing to warm at all. Items the encoder
can't take (images for a text encoder) fail the command once, before any work.

Cluster warm: `--shard I/N` warms the I-th of N disjoint parts, so N nodes sharing a remote tier
encode a dataset together; `--from-remote` promotes what other nodes stored without encoding."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from . import ctl_config
from .client import CacheClient
from .ctl_output import print_json
from .errors import CacheError, CacheMiss, InvalidSpec
from .specs import CROPS, IMAGE_EXTENSIONS, ImageSpec, Spec, TextSpec

__all__ = ["add_parser", "size_arg", "Bar", "parse_shard", "in_shard"]


def size_arg(text: str) -> tuple[int, int]:
    """WIDTHxHEIGHT, for argparse."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, got {text!r}") from None
    return w, h


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    w = sub.add_parser("warm", parents=[common], help="compute entries ahead of training, with a progress bar")
    w.add_argument("--encoder", required=True)
    w.add_argument("--size", type=size_arg, help="target WIDTHxHEIGHT for images")
    w.add_argument("--crop", default="center", choices=CROPS)
    w.add_argument("--flip", default="none", choices=["none", "x", "both"],
                   help="none, x (flipped only), or both (each image twice)")
    w.add_argument("--manifest", help='JSONL: {"path": ..., "size": [w, h], "crop": ..., "flip": ...} '
                                      'or {"text": ...} per line')
    w.add_argument("--batch", type=int, default=4096, help="items per Warm call")
    w.add_argument("--shard", metavar="I/N", help="warm only the I-th of N disjoint parts (0 <= I < N), "
                                                  "the same on every node whatever its listing order")
    w.add_argument("--from-remote", action="store_true",
                   help="encode nothing: promote entries other nodes stored; exit 1 if any is missing")
    w.add_argument("paths", nargs="*", help="image files or directories (searched recursively)")
    w.set_defaults(func=run)


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


def _manifest_line(item: dict[str, Any], args: argparse.Namespace) -> Spec:
    if "text" in item:
        return TextSpec(item["text"])
    size = tuple(item["size"]) if "size" in item else args.size
    if size is None:
        raise ValueError("no size in the line and no --size")
    crop = item.get("crop", args.crop)
    return ImageSpec(item["path"], size, tuple(crop) if isinstance(crop, list) else crop,
                     item.get("flip", args.flip != "none"))


def _manifest_specs(path: str, args: argparse.Namespace) -> list[Spec]:
    specs: list[Spec] = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    specs.append(_manifest_line(json.loads(line), args))
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{n}: {exc}") from None
    if not specs:
        raise ValueError(f"nothing to warm: the manifest {path} has no items")
    return specs


def specs_of(args: argparse.Namespace) -> list[Spec]:
    """The items a warm command names; ValueError when they are none."""
    if args.manifest:
        return _manifest_specs(args.manifest, args)
    if not args.paths:
        raise ValueError("warm needs PATH... or --manifest FILE")
    if args.size is None:
        raise ValueError("warm needs --size WxH for images")
    specs: list[Spec] = [ImageSpec(p, args.size, args.crop, flip) for p in _walk(args.paths)
                         for flip in _flips(args.flip)]
    if not specs:
        raise ValueError(f"nothing to warm: no image ({', '.join(sorted(IMAGE_EXTENSIONS))}) under "
                         f"{' '.join(args.paths)}")
    return specs


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' as (I, N); ValueError naming the bad value unless N >= 1 and 0 <= I < N."""
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N, e.g. 0/4, got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard I/N needs N >= 1 and 0 <= I < N, got {text!r}")
    return index, count


def in_shard(spec: Spec, index: int, count: int) -> bool:
    """Whether `spec` is in part `index` of `count`. By a digest of the spec's canonical line (the
    absolute source path, size, crop and flip, or the text): every node agrees on the parts whatever
    order it lists a directory in, and a part's items stay its own when others are added."""
    digest = hashlib.blake2b(spec.wire_json().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count == index


class Bar:
    """A one-line progress bar on stderr with items/s; plain lines when stderr is not a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last_line = self.start

    def update(self, done: int, failed: int, final: bool = False) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        frac = done / self.total if self.total else 1.0
        filled = int(frac * 30)
        text = (f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} {done / elapsed:,.1f} items/s"
                f" {failed} failed")
        if self.tty:
            sys.stderr.write("\r" + text + ("\n" if final else ""))
            sys.stderr.flush()
        elif final or time.monotonic() - self.last_line > 5:
            print(text, file=sys.stderr, flush=True)
            self.last_line = time.monotonic()


Failure = tuple[int, Spec, CacheError]


def _warm_all(client: CacheClient, specs: list[Spec], args: argparse.Namespace) -> tuple[int, int, list[Failure]]:
    """(computed, already cached, failures), warming `args.batch` items per call. A progress message
    carries only the failures since the previous one: the bar adds them up."""
    bar = Bar(len(specs))
    failed: list[Failure] = []
    computed = cached = 0
    for start in range(0, len(specs), args.batch):
        seen = len(failed)

        def progress(p: Any, base: int = start) -> None:
            nonlocal seen
            seen += len(p.errors)
            bar.update(base + p.done, seen)

        result = client.warm(specs[start:start + args.batch], encoder=args.encoder, progress=progress,
                             compute=not args.from_remote)
        failed.extend((start + i, spec, err) for i, spec, err in result.failed)
        computed += result.computed
        cached += result.cached
    bar.update(len(specs), len(failed), final=True)
    return computed, cached, failed


def _what(spec: Spec) -> str:
    return spec.path if isinstance(spec, ImageSpec) else repr(spec.text[:60])


_PLURAL = {"image": "images", "text": "text"}


def check_input(client: CacheClient, encoder: str, specs: list[Spec]) -> None:
    """InvalidSpec, once and before any work, when items are of a kind the encoder does not take
    (images for a text encoder): they would all fail the same way. An encoder the daemon does not
    have is left to the Warm call's UnknownEncoder."""
    takes = client.stats()["encoders"].get(encoder, {}).get("input", "")
    wrong = [s for s in specs if takes and ("image" if isinstance(s, ImageSpec) else "text") != takes]
    if wrong:
        other = _PLURAL["text" if takes == "image" else "image"]
        raise InvalidSpec(f"encoder {encoder!r} takes {_PLURAL[takes]}, not {other}: {len(wrong)} of {len(specs)} "
                          f"items are {other} (the first: {_what(wrong[0])}); nothing was warmed")


def _report_promoted(specs: list[Spec], promoted: int, failed: list[Failure], args: argparse.Namespace) -> int:
    """--from-remote: items in no tier are "missing", apart from the items that failed otherwise."""
    missing = [spec for _, spec, err in failed if isinstance(err, CacheMiss)]
    failed = [f for f in failed if not isinstance(f[2], CacheMiss)]
    if args.json:
        print_json({"total": len(specs), "promoted": promoted, "missing": len(missing), **_shard_json(args),
                    "missing_items": [_what(s) for s in missing],
                    "failed": _failed_json(failed)})
    else:
        print(f"promoted {promoted} of {len(specs)} (from the remote tier, or already on this node), "
              f"{len(missing)} missing in the remote tier, {len(failed)} failed")
    for spec in missing[:10]:
        print(f"missing: {_what(spec)}", file=sys.stderr)
    if len(missing) > 10:
        print(f"... and {len(missing) - 10} more missing", file=sys.stderr)
    _print_failed(failed)
    return 1 if missing or failed else 0


def _failed_json(failed: list[Failure]) -> list[dict[str, Any]]:
    return [{"index": i, "item": _what(s), "error": type(e).__name__, "message": str(e)} for i, s, e in failed]


def _print_failed(failed: list[Failure]) -> None:
    for _, spec, err in failed:
        print(f"failed: {_what(spec)}: {type(err).__name__}: {err}", file=sys.stderr)


def _shard_json(args: argparse.Namespace) -> dict[str, Any]:
    return {"shard": args.shard} if args.shard else {}


def run(args: argparse.Namespace) -> int:
    shard = parse_shard(args.shard) if args.shard else None  # a bad --shard fails before the listing
    specs = specs_of(args)
    if shard is not None:
        listed = len(specs)
        specs = [s for s in specs if in_shard(s, *shard)]
        if not args.json:
            print(f"shard {args.shard}: {len(specs)} of {listed} items")
    client = ctl_config.client_for(args)
    check_input(client, args.encoder, specs)
    computed, cached, failed = _warm_all(client, specs, args)
    if args.from_remote:
        return _report_promoted(specs, cached, failed, args)
    if args.json:
        print_json({"total": len(specs), "warmed": len(specs) - len(failed), "computed": computed, "cached": cached,
                    **_shard_json(args),
                    "failed": _failed_json(failed)})
    else:
        print(f"warmed {len(specs) - len(failed)} of {len(specs)}: {computed} computed, {cached} already cached, "
              f"{len(failed)} failed")
    _print_failed(failed)
    return 1 if failed else 0
