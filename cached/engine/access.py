"""Could the caller read this file itself? The daemon reads sources with its own rights, so without
this check any member of the socket's group could have a latent made of a file it may not read (a
confused deputy).

The check follows the kernel's rules for owner, group and mode bits: read permission on the file,
search (x) permission on every directory on the way, both on the path as asked and on the path the
file really has. uid 0 reads everything, as the kernel's CAP_DAC_OVERRIDE lets it. A caller known
only by the TCP token (no uid) gets what "others" get. POSIX ACLs are not evaluated: a file or
directory that carries one is treated as if its group class granted nothing, so an ACL can only make
the check stricter than the kernel, never looser.

Directory results are remembered for DIR_TTL_S per (caller, directory), so a batch of files in one
directory costs one dictionary lookup each; a chmod of a directory applies within that time.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections import OrderedDict

from .caller import Caller

__all__ = ["AccessCheck", "DIR_TTL_S", "permits_read", "has_acl"]

DIR_TTL_S = 1.0
MEMO_ITEMS = 65536
_ACL = "system.posix_acl_access"


class AccessCheck:
    def __init__(self) -> None:
        self._dirs: OrderedDict[tuple[int | None, frozenset[int], str], tuple[float, bool]] = OrderedDict()
        self._mu = threading.Lock()

    def readable(self, caller: Caller, st: os.stat_result, paths: tuple[str, ...], has_acl: bool) -> bool:
        """Whether `caller` may read the file whose stat is `st`, reached through each of `paths`."""
        if caller.uid == 0:
            return True
        if not _permits(caller, st, stat.S_IRUSR, has_acl):
            return False
        return all(self.searchable(caller, os.path.dirname(p)) for p in paths)

    def searchable(self, caller: Caller, directory: str) -> bool:
        """Search permission on `directory` and every directory above it (what looking up a name
        in it needs)."""
        if caller.uid == 0:
            return True
        key = (caller.uid, caller.gids, directory)
        now = time.monotonic()
        with self._mu:
            hit = self._dirs.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        ok = self._walk(caller, directory)
        with self._mu:
            self._dirs[key] = (now + DIR_TTL_S, ok)
            self._dirs.move_to_end(key)
            while len(self._dirs) > MEMO_ITEMS:
                self._dirs.popitem(last=False)
        return ok

    @staticmethod
    def _walk(caller: Caller, directory: str) -> bool:
        path = directory
        while True:
            try:
                st = os.stat(path)
            except OSError:
                return False
            if not _permits(caller, st, stat.S_IXUSR, has_acl(path)):
                return False
            parent = os.path.dirname(path)
            if parent == path:
                return True
            path = parent


def permits_read(caller: Caller, st: os.stat_result, acl: bool) -> bool:
    """Read permission on a file by its stat alone (the directories on the way are separate)."""
    return caller.uid == 0 or _permits(caller, st, stat.S_IRUSR, acl)


def has_acl(path: str) -> bool:
    try:
        os.getxattr(path, _ACL)
    except OSError:
        return False  # ENODATA (no ACL), ENOTSUP (no xattrs here), or gone
    return True


def _permits(caller: Caller, st: os.stat_result, owner_bit: int, acl: bool) -> bool:
    """The kernel's owner / group / other choice for one permission bit (owner_bit: S_IRUSR or S_IXUSR)."""
    mode = st.st_mode
    if caller.uid is not None and caller.uid == st.st_uid:
        return bool(mode & owner_bit)
    if st.st_gid in caller.gids and caller.uid is not None:
        return not acl and bool(mode & (owner_bit >> 3))
    return bool(mode & (owner_bit >> 6))
