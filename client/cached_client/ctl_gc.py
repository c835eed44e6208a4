"""`cachectl gc`: removes what dead daemons left behind, without a daemon running.

- In the shm directory: segments, control pages and lock files of instances whose lock nobody holds
  (the naming scheme and the test are shmnames.py's, which the daemon sweeps with at start).
- In a disk tier's directory: files under tmp/ (writes a daemon did not finish) when the tier's lock
  is not held. The layout is cached/store/disk.py's: `<dir>/lock`, flocked by the daemon using the
  directory, and `<dir>/tmp/`, which every daemon wipes when it opens the tier. The lock is only
  tested, never kept: a daemon that starts meanwhile must not find its directory in use.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

from . import ctl_config
from .ctl_output import print_json
from .shmnames import lock_held, stale_files, sweep_stale

__all__ = ["add_parser", "collect"]

DISK_LOCK = "lock"  # cached/store/disk.py's layout
DISK_TMP = "tmp"


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("gc", parents=[common], help="remove the leftovers of dead daemons (shm files, "
                                                    "unfinished disk writes)")
    p.add_argument("--shm-dir", help="the shm directory (default: the config's store.shm_dir, else /dev/shm)")
    p.add_argument("--disk-dir", action="append", help="a disk tier directory (default: the config's "
                                                       "store.disk_dir, else the default ones that exist)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.set_defaults(func=run)


def _default_disk_dirs() -> list[str]:
    """Where a daemon with no disk_dir configured puts its tier (cached/server/config.py)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return ["/var/cache/cached", os.path.join(base, "cached")]


def _disk_dirs(args: argparse.Namespace, config: ctl_config.DaemonConfig) -> list[str]:
    if args.disk_dir:
        return args.disk_dir
    if config.disk_dir is not None:
        return [config.disk_dir] if config.disk_dir else []
    return [d for d in _default_disk_dirs() if os.path.isfile(os.path.join(d, DISK_LOCK))]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _disk(directory: str, dry_run: bool) -> dict[str, Any]:
    tmp = os.path.join(directory, DISK_TMP)
    if not os.path.isfile(os.path.join(directory, DISK_LOCK)):
        return {"dir": directory, "removed": [], "in_use": False, "tier": False}
    if lock_held(os.path.join(directory, DISK_LOCK)):
        return {"dir": directory, "removed": [], "in_use": True, "tier": True}
    names = sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []
    if not dry_run:
        for name in names:
            try:
                _remove(os.path.join(tmp, name))
            except FileNotFoundError:
                pass
    return {"dir": directory, "removed": names, "in_use": False, "tier": True}


def collect(shm_dir: str, disk_dirs: list[str], dry_run: bool = False) -> dict[str, Any]:
    """What gc removed (or, dry, would remove): {"shm": {"dir", "removed"}, "disk": [{"dir",
    "removed", "in_use", "tier"}], "dry_run"}."""
    removed = stale_files(shm_dir) if dry_run else sweep_stale(shm_dir)
    return {"shm": {"dir": shm_dir, "removed": removed}, "disk": [_disk(d, dry_run) for d in disk_dirs],
            "dry_run": dry_run}


def _print(report: dict[str, Any]) -> None:
    verb = "would remove" if report["dry_run"] else "removed"
    shm = report["shm"]
    print(f"{shm['dir']}: {verb} {len(shm['removed'])} file(s) of dead daemons")
    for name in shm["removed"]:
        print(f"  {name}")
    for disk in report["disk"]:
        if not disk["tier"]:
            print(f"{disk['dir']}: not a disk tier (no {DISK_LOCK} file); left alone")
        elif disk["in_use"]:
            print(f"{disk['dir']}: in use by a daemon; left alone")
        else:
            print(f"{disk['dir']}: {verb} {len(disk['removed'])} unfinished write(s) in {DISK_TMP}/")


def run(args: argparse.Namespace) -> int:
    config = ctl_config.load(args.config)
    report = collect(args.shm_dir or config.shm_dir or "/dev/shm", _disk_dirs(args, config), args.dry_run)
    print_json(report) if args.json else _print(report)
    return 0
