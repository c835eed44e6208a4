"""Source files: the allowed_roots check and content digests remembered by the file's stamp."""

from __future__ import annotations

import hashlib
import os
import threading

from cached_client.errors import SourceError, SourceNotAllowed
from cached_client.stamp import Stamp, stamp_of

__all__ = ["Sources"]


class Sources:
    """Resolves paths (after `..` and symlinks) inside allowed_roots and digests their bytes.

    The memo maps a real path to its stamp and digest (cached_client/stamp.py); a rewritten file
    has another stamp, so its next lookup rehashes and gets a new key. A file changed too recently
    to be told apart by its stamp is not remembered.
    """

    def __init__(self, allowed_roots: list[str] | None = None) -> None:
        self.roots = [os.path.realpath(r) for r in (allowed_roots or [])]
        self._memo: dict[str, tuple[Stamp, bytes]] = {}
        self._mu = threading.Lock()

    def resolve(self, path: str) -> str:
        real = os.path.realpath(path)
        if self.roots and not any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.roots):
            raise SourceNotAllowed(f"{path}: resolves to {real}, outside allowed_roots {self.roots}")
        return real

    def digest(self, path: str) -> tuple[str, bytes, bytes | None, Stamp | None]:
        """(real path, content digest, the bytes if they had to be read now else None, and the
        file's stamp, None when it can't be trusted)."""
        real = self.resolve(path)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise SourceError(f"{path}: no such file") from None
        except OSError as exc:
            raise SourceError(f"{path}: {exc.strerror}") from None
        stamp = stamp_of(st)
        hit = self._memo.get(real)
        if stamp is not None and hit is not None and hit[0] == stamp:
            return real, hit[1], None, stamp
        data = self.read(real, path)
        digest = hashlib.blake2b(data, digest_size=32).digest()
        if stamp is not None:
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
