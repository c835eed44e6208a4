"""Every shared-memory name cached uses comes from here, so a sweeper can find leftovers.

An instance (one daemon run) owns `cached-<iid>.lock`, which it holds flocked for its lifetime, its
segments `cached-<iid>-<seq>` and its control page `cached-<iid>-ctl`. Instance ids are random, so a
name is never reused. A segment whose instance's lock can be taken (or is gone) belongs to a dead
daemon and is swept: by the daemon at start (cached/store/shm.py) and by `cachectl gc`.

It lives in the thin client so that `cachectl gc` can sweep without the daemon's package;
cached/store/names.py re-exports it for the daemon.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import time

__all__ = ["new_instance_id", "segment_name", "control_name", "lock_name", "hold_instance_lock", "lock_held",
           "stale_files", "sweep_stale"]

log = logging.getLogger(__name__)

PREFIX = "cached-"
_SEGMENT = re.compile(r"^cached-([0-9a-f]{12})-([0-9]{4,}|ctl)$")
_LOCK = re.compile(r"^cached-([0-9a-f]{12})\.lock$")
_LOCK_TMP = re.compile(r"^\.cached-([0-9a-f]{12})\.lock\.([0-9]+)$")  # a lock not yet renamed into place
TMP_LOCK_GRACE_S = 60.0


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


def lock_held(path: str) -> bool:
    """Whether a live process holds the flock of `path`: False when the file is gone, True when it
    can't be opened (it can't be told, so it is left alone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _tmp_lock_stale(shm_dir: str, name: str) -> bool:
    """A temporary lock whose daemon died between creating and renaming it: unlocked, and older than
    TMP_LOCK_GRACE_S (a starting daemon flocks it a moment after creating it)."""
    if not _LOCK_TMP.match(name):
        return False
    path = os.path.join(shm_dir, name)
    try:
        young = time.time() - os.stat(path).st_mtime < TMP_LOCK_GRACE_S
    except OSError:
        return False
    return not young and not lock_held(path)


def stale_files(shm_dir: str) -> list[str]:
    """Names in `shm_dir` that belong to daemons that are gone: segments, control pages, locks."""
    stale: list[str] = []
    alive: dict[str, bool] = {}
    for name in sorted(os.listdir(shm_dir)):
        m = _SEGMENT.match(name) or _LOCK.match(name)
        if m is None:
            if _tmp_lock_stale(shm_dir, name):
                stale.append(name)
            continue
        iid = m.group(1)
        if iid not in alive:
            alive[iid] = lock_held(os.path.join(shm_dir, lock_name(iid)))
        if not alive[iid]:
            stale.append(name)
    return stale


def sweep_stale(shm_dir: str) -> list[str]:
    """Unlinks the segments and locks of daemons that are gone; returns the names removed."""
    removed: list[str] = []
    for name in stale_files(shm_dir):
        try:
            os.unlink(os.path.join(shm_dir, name))
            removed.append(name)
        except FileNotFoundError:
            pass
    if removed:
        log.info("swept %d stale shared-memory files of dead daemons", len(removed))
    return removed
