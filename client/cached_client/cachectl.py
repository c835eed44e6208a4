"""`cachectl`: warm, evict, inspect and diagnose the local cached daemon.

Each command lives in a ctl_*.py module that adds its parser and runs it: ctl_warm (warm),
ctl_cache (health, evict, stats, ls, import, leases, inspect), ctl_diagnose (diagnose), ctl_top
(top), ctl_gc (gc). ctl_config resolves the daemon (--address, --config, --tcp). Every report
prints as JSON with --json. Errors print one line, `ErrorType: message`, and exit non-zero; never
a traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import ctl_cache, ctl_config, ctl_diagnose, ctl_gc, ctl_top, ctl_warm
from .errors import CacheError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cachectl", description="Control the local cached daemon.")
    ctl_config.add_arguments(p)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the report as JSON")
    sub = p.add_subparsers(dest="command", required=True)
    ctl_warm.add_parser(sub, common)
    ctl_cache.add_parsers(sub, common)
    ctl_diagnose.add_parser(sub, common)
    ctl_top.add_parser(sub, common)
    ctl_gc.add_parser(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("\nInterrupted", file=sys.stderr)
        return 130
    except (CacheError, ValueError, OSError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
