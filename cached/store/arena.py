"""One shared-memory segment, reserved up front and mapped once by its owner, the daemon.

Two backends:
- "memfd" (the default where the kernel has it): an anonymous memory file (`memfd_create`), sealed
  against shrinking and growing so no client can make a reader fault (SIGBUS), reserved with
  fallocate so a machine without the memory is a clear CapacityError. It has no name on any
  filesystem: clients get a read-only descriptor over the identity socket (SCM_RIGHTS), so a
  trainer container needs only the socket's directory, no /dev/shm of any size; nothing is left
  behind after a kill -9 and systemd's RemoveIPC has nothing to wipe.
- "dev-shm": a file in a tmpfs directory (/dev/shm), which clients open by path; kept for tools that
  look at /dev/shm. A full tmpfs is a CapacityError at start (statvfs, then posix_fallocate), never a
  SIGBUS later.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os

from cached_client.errors import CapacityError
from cached_client.session import MEMFD_PREFIX  # a segment's "path" in replies when it has no file

from .alloc import Allocator

__all__ = ["Arena", "check_shm_capacity", "memfd_supported", "BACKENDS", "MEMFD_PREFIX"]

log = logging.getLogger(__name__)

BACKENDS = ("memfd", "dev-shm")
_HINT = "raise the shared-memory size (docker --shm-size, a larger /dev/shm emptyDir) or lower shm_bytes"
_MEMFD_HINT = "the machine (or this service's memory limit) can't hold shm_bytes more: lower shm_bytes or raise MemoryMax"
_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 0x0002) | getattr(fcntl, "F_SEAL_GROW", 0x0004) | \
    getattr(fcntl, "F_SEAL_SEAL", 0x0001)


def memfd_supported() -> bool:
    """Whether this kernel and Python make sealable memory files."""
    if not hasattr(os, "memfd_create"):
        return False
    try:
        fd = os.memfd_create("cached-probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return False
    os.close(fd)
    return True


def check_shm_capacity(shm_dir: str, wanted: int) -> None:
    """CapacityError naming the fix when the tmpfs cannot hold `wanted` more bytes."""
    st = os.statvfs(shm_dir)
    available = st.f_bavail * st.f_frsize
    if wanted > available:
        raise CapacityError(
            f"{shm_dir} has {available} bytes free, shm_bytes asks for {wanted}: {_HINT}")


class Arena:
    """A segment created, reserved and mapped shared. Only the daemon that created it ever writes it
    (or unlinks it: dev-shm); clients attach read-only."""

    def __init__(self, shm_dir: str, name: str, size: int, group: int | None = None,
                 backend: str = "dev-shm") -> None:
        self.name = name
        self.size = size
        self.backend = backend
        if backend == "memfd":
            self.path = MEMFD_PREFIX + name
            fd = self._memfd(name, size)
        else:
            self.path = os.path.join(shm_dir, name)
            fd = self._file(self.path, size, group, shm_dir)
        try:
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            # what clients get (memfd): a read-only descriptor of the same memory, opened anew so
            # that no client can map it writable
            self.client_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC) if backend == "memfd" else -1
        finally:
            os.close(fd)
        self.alloc = Allocator(size)
        self.view = memoryview(self.map)

    @staticmethod
    def _memfd(name: str, size: int) -> int:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            _reserve(fd, size, _MEMFD_HINT)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS if hasattr(fcntl, "F_ADD_SEALS") else 1033, _SEALS)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _file(path: str, size: int, group: int | None, shm_dir: str) -> int:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o640)
        try:
            os.fchmod(fd, 0o640)  # umask may have narrowed it
            if group is not None:
                os.fchown(fd, -1, group)
            _reserve(fd, size, f"{shm_dir} is full: {_HINT}")
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        return fd

    def held_bytes(self) -> int:
        """Memory the segment holds now: its allocated pages (all of it, once reserved)."""
        try:
            if self.client_fd >= 0:
                return os.fstat(self.client_fd).st_blocks * 512
            return os.stat(self.path).st_blocks * 512
        except OSError:
            return 0

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:  # a view is still exported; the mapping goes with the process
            log.debug("arena %s still has exported views at close", self.name)
        if self.client_fd >= 0:
            os.close(self.client_fd)
            self.client_fd = -1
        if self.backend != "memfd":
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _reserve(fd: int, size: int, hint: str) -> None:
    """The bytes, allocated now (a CapacityError naming the fix when they can't be)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise CapacityError(f"cannot reserve {size} bytes of shared memory: {hint}") from exc
        raise
