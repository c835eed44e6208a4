"""One shared-memory segment: a file in /dev/shm, reserved up front and mapped once by its owner."""

from __future__ import annotations

import errno
import logging
import mmap
import os

from cached_client.errors import CapacityError

from .alloc import Allocator

__all__ = ["Arena", "check_shm_capacity"]

log = logging.getLogger(__name__)

_HINT = "raise the shared-memory size (docker --shm-size, a larger /dev/shm emptyDir) or lower shm_bytes"


def check_shm_capacity(shm_dir: str, wanted: int) -> None:
    """CapacityError naming the fix when the tmpfs cannot hold `wanted` more bytes."""
    st = os.statvfs(shm_dir)
    available = st.f_bavail * st.f_frsize
    if wanted > available:
        raise CapacityError(
            f"{shm_dir} has {available} bytes free, shm_bytes asks for {wanted}: {_HINT}")


class Arena:
    """A segment file created, reserved with posix_fallocate, and mapped shared. Only the daemon
    that created it ever writes or unlinks it; clients attach read-only by name."""

    def __init__(self, shm_dir: str, name: str, size: int, group: int | None = None) -> None:
        self.name = name
        self.path = os.path.join(shm_dir, name)
        self.size = size
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o640)
        try:
            os.fchmod(fd, 0o640)  # umask may have narrowed it
            if group is not None:
                os.fchown(fd, -1, group)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise CapacityError(f"cannot reserve {size} bytes in {shm_dir}: {_HINT}") from exc
                raise
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self.alloc = Allocator(size)
        self.view = memoryview(self.map)

    def close(self) -> None:
        self.view.release()
        try:
            self.map.close()
        except BufferError:  # a view is still exported; the mapping goes with the process
            log.debug("arena %s still has exported views at close", self.name)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
