"""Source files, opened safely: inside allowed_roots, regular, bounded, readable by the caller.

A source is checked where it is opened, not by its name: the path must lie under allowed_roots as
written and after resolving symlinks (both known without touching the file, so a refusal says
nothing about whether it exists); it is then opened non-blocking (a FIFO can't hold a thread), and
what was opened is checked again: its path as the kernel has it (/proc/self/fd) must still be under
the roots (a directory swapped for a symlink between check and open is caught), it must be a
regular file, no larger than `max_bytes`, and readable by the caller itself (access.py). Refusals
that could tell a caller whether a file it may not read exists all carry one message.

Digests are remembered by real path and stamp (cached_client/stamp.py); a file changed too recently
to be told apart by its stamp is not remembered.

An `s3://bucket/key` source goes to objectsources.py instead (its own allowed_roots entries, ETags
for stamps); its Source has the URL for `real`, no stamp and no ACL.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
from dataclasses import dataclass

from cached_client.errors import LimitExceeded, SourceError, SourceNotAllowed
from cached_client.specs import is_object_url
from cached_client.stamp import Stamp, stamp_of

from ..store.remoteclient import ObjectReader
from .access import AccessCheck, has_acl
from .caller import Caller
from .objectsources import ObjectSources

__all__ = ["Sources", "Source", "DEFAULT_MAX_SOURCE_BYTES"]

DEFAULT_MAX_SOURCE_BYTES = 256 << 20  # larger than any training image; a 3 GiB sparse file is refused
_READ_CHUNK = 1 << 20
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


@dataclass(frozen=True)
class Source:
    real: str              # the path of the file that was opened
    digest: bytes          # blake2b-256 of its bytes
    data: bytes | None     # its bytes, when they were read now
    stamp: Stamp | None    # None: too recently changed to be remembered
    acl: bool              # it carries a POSIX ACL (the access check is then stricter)


class Sources:
    def __init__(self, allowed_roots: list[str] | None = None, max_bytes: int = DEFAULT_MAX_SOURCE_BYTES,
                 check_access: bool = True, objects: ObjectReader | None = None) -> None:
        """`objects` reads s3:// sources (under the s3:// entries of `allowed_roots`); None: they
        are refused."""
        self.roots = [os.path.realpath(r) for r in (allowed_roots or []) if not is_object_url(r)]
        self.restricted = bool(allowed_roots)  # roots of s3:// entries only admit no local file
        self.objects = ObjectSources(allowed_roots or [], objects, max_bytes)
        self.max_bytes = max_bytes
        self.check_access = check_access
        self.access = AccessCheck()
        self._memo: dict[str, tuple[Stamp, bytes, bool]] = {}
        self._mu = threading.Lock()

    # paths

    def _inside(self, real: str) -> bool:
        return not self.restricted or any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.roots)

    def resolve(self, path: str) -> str:
        """The path with symlinks resolved (whether or not the file exists), refused unless that lies
        under the roots."""
        if not os.path.isabs(path):
            raise SourceNotAllowed(f"{path!r}: not an absolute path")
        try:
            real = os.path.realpath(path)
        except (OSError, ValueError, RecursionError) as exc:  # readlink EACCES/EINVAL, NUL, a symlink chain
            raise SourceError(f"{path}: can't be resolved ({type(exc).__name__})") from None
        if not self._inside(real):
            raise SourceNotAllowed(f"{path}: outside allowed_roots {self.roots}")
        return real

    def may_read(self, caller: Caller, st: os.stat_result, path: str, real: str, acl: bool) -> bool:
        return not self.check_access or self.access.readable(caller, st, (path, real), acl)

    def refuse(self, path: str) -> SourceNotAllowed:
        """The one refusal for a file the caller may not read, whether or not it exists."""
        return SourceNotAllowed(f"{path}: no such file, or the caller may not read it")

    # reading

    def digest(self, path: str, caller: Caller) -> Source:
        """The source's digest, from the memo when its stamp is unchanged, else read now."""
        return self._open(path, caller, always_read=False)

    def load(self, path: str, caller: Caller) -> Source:
        """The source's bytes and digest, read now."""
        return self._open(path, caller, always_read=True)

    def _open(self, path: str, caller: Caller, always_read: bool) -> Source:
        if is_object_url(path):
            digest, data = self.objects.fetch(path, always_read)
            return Source(path, digest, data, None, False)
        self.resolve(path)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as exc:
            raise self._open_error(path, caller, exc) from None
        try:
            real, st = self._verify(fd, path, caller)
            stamp, acl = stamp_of(st), self.check_access and has_acl(real)
            if not self.may_read(caller, st, path, real, acl):
                raise self.refuse(path)
            hit = self._memo.get(real) if stamp is not None and not always_read else None
            if hit is not None and hit[0] == stamp:
                return Source(real, hit[1], None, stamp, hit[2])
            data = self._read(fd, path, st.st_size)
        finally:
            os.close(fd)
        digest = hashlib.blake2b(data, digest_size=32).digest()
        if stamp is not None:
            with self._mu:
                self._memo[real] = (stamp, digest, acl)
        return Source(real, digest, data, stamp, acl)

    def _open_error(self, path: str, caller: Caller, exc: OSError) -> Exception:
        """A missing file is said to be missing only to a caller that could look for it itself."""
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG):
            if not self.check_access or self.access.searchable(caller, os.path.dirname(path)):
                return SourceError(f"{path}: no such file")
            return self.refuse(path)
        if exc.errno == errno.EACCES:
            return self.refuse(path)
        return SourceError(f"{path}: {exc.strerror or exc}")

    def _verify(self, fd: int, path: str, caller: Caller) -> tuple[str, os.stat_result]:
        """What was opened: its real path (under the roots) and its stat (a regular file, bounded)."""
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            real = os.path.realpath(path)  # no /proc: the name's resolution, checked just before open
        if not self._inside(real):
            raise SourceNotAllowed(f"{path}: outside allowed_roots {self.roots}")
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise SourceError(f"{path}: is a directory, not an image")
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{path}: not a regular file (a FIFO, socket or device is never read)")
        if st.st_size > self.max_bytes:
            raise LimitExceeded(f"{path}: {st.st_size} bytes, more than limits.max_source_bytes "
                                f"({self.max_bytes})")
        return real, st

    def _read(self, fd: int, path: str, size: int) -> bytes:
        """At most max_bytes of the file (it may grow while read)."""
        chunks, total = [], 0
        try:
            while chunk := os.read(fd, min(_READ_CHUNK, self.max_bytes + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > self.max_bytes:
                    raise LimitExceeded(f"{path}: grew past limits.max_source_bytes ({self.max_bytes}) "
                                        f"while being read")
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror or exc}") from None
        return b"".join(chunks)

    def close(self) -> None:
        self.objects.close()
