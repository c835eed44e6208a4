"""Source files: the allowed_roots check and content digests remembered by (size, mtime, inode)."""

from __future__ import annotations

import hashlib
import os
import threading

from cached_client.errors import SourceError, SourceNotAllowed

__all__ = ["Sources"]


class Sources:
    """Resolves paths (after `..` and symlinks) inside allowed_roots and digests their bytes.

    The memo maps a real path to its (size, mtime_ns, inode, digest); a rewritten file changes at
    least one of those, so its next lookup rehashes and gets a new key.
    """

    def __init__(self, allowed_roots: list[str] | None = None) -> None:
        self.roots = [os.path.realpath(r) for r in (allowed_roots or [])]
        self._memo: dict[str, tuple[tuple[int, int, int, int], bytes]] = {}
        self._mu = threading.Lock()

    def resolve(self, path: str) -> str:
        real = os.path.realpath(path)
        if self.roots and not any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.roots):
            raise SourceNotAllowed(f"{path}: resolves to {real}, outside allowed_roots {self.roots}")
        return real

    def digest(self, path: str) -> tuple[str, bytes, bytes | None, tuple[int, int, int, int]]:
        """(real path, content digest, the bytes if they had to be read now else None, and the
        file's (dev, inode, size, mtime_ns) stamp)."""
        real = self.resolve(path)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise SourceError(f"{path}: no such file") from None
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror}") from None
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._memo.get(real)
        if hit is not None and hit[0] == stamp:
            return real, hit[1], None, stamp
        data = self.read(real, path)
        digest = hashlib.blake2b(data, digest_size=32).digest()
        with self._mu:
            self._memo[real] = (stamp, digest)
        return real, digest, data, stamp

    @staticmethod
    def read(real: str, path: str) -> bytes:
        try:
            with open(real, "rb") as f:
                return f.read()
        except IsADirectoryError:
            raise SourceError(f"{path}: is a directory, not an image") from None
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror or exc}") from None
