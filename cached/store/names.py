"""Every shared-memory name cached uses comes from here, so the sweeper can find leftovers.

An instance (one daemon run) owns `cached-<iid>.lock`, which it holds flocked for its lifetime, its
segments `cached-<iid>-<seq>` and its control page `cached-<iid>-ctl`. Instance ids are random, so a name is never reused. A segment
whose instance's lock can be taken (or is gone) belongs to a dead daemon and is swept.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets

__all__ = ["new_instance_id", "segment_name", "control_name", "lock_name", "hold_instance_lock", "sweep_stale"]

log = logging.getLogger(__name__)

PREFIX = "cached-"
_SEGMENT = re.compile(r"^cached-([0-9a-f]{12})-([0-9]{4,}|ctl)$")
_LOCK = re.compile(r"^cached-([0-9a-f]{12})\.lock$")


def new_instance_id() -> str:
    return secrets.token_hex(6)


def segment_name(instance: str, seq: int) -> str:
    return f"{PREFIX}{instance}-{seq:04d}"


def control_name(instance: str) -> str:
    """The instance's one-page control segment (see store/shm.py)."""
    return f"{PREFIX}{instance}-ctl"


def lock_name(instance: str) -> str:
    return f"{PREFIX}{instance}.lock"


def hold_instance_lock(shm_dir: str, instance: str) -> int:
    """Creates and flocks the instance's lock file; returns the fd, held until the process exits.

    The file is flocked under a temporary name and renamed into place, so a concurrent sweeper never
    sees it unlocked.
    """
    tmp = os.path.join(shm_dir, f".{lock_name(instance)}.{os.getpid()}")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o640)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(tmp, os.path.join(shm_dir, lock_name(instance)))
    return fd


def _owner_alive(shm_dir: str, instance: str) -> bool:
    path = os.path.join(shm_dir, lock_name(instance))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def sweep_stale(shm_dir: str) -> list[str]:
    """Unlinks the segments and locks of daemons that are gone; returns the names removed."""
    removed: list[str] = []
    alive: dict[str, bool] = {}
    for name in sorted(os.listdir(shm_dir)):
        m = _SEGMENT.match(name) or _LOCK.match(name)
        if not m:
            continue
        iid = m.group(1)
        if iid not in alive:
            alive[iid] = _owner_alive(shm_dir, iid)
        if alive[iid]:
            continue
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    if removed:
        log.info("swept %d stale shared-memory files of dead daemons", len(removed))
    return removed
