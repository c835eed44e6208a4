"""Digests of weight files, remembered by (path, size, mtime) so a restart does not rehash gigabytes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading

__all__ = ["WeightDigests"]

log = logging.getLogger(__name__)

_CHUNK = 8 << 20


class WeightDigests:
    """blake2b-256 of files; the memo lives in memory and, when `memo_path` is set, in a JSON file."""

    def __init__(self, memo_path: str | None = None) -> None:
        self.memo_path = memo_path
        self._mu = threading.Lock()
        self._memo: dict[str, list] = {}
        if memo_path and os.path.exists(memo_path):
            try:
                with open(memo_path) as f:
                    self._memo = json.load(f)
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable weight digest memo %s: %s", memo_path, exc)

    def file(self, path: str) -> str:
        path = os.path.realpath(path)
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        with self._mu:
            hit = self._memo.get(path)
            if hit and hit[:3] == stamp:
                return str(hit[3])
        h = hashlib.blake2b(digest_size=32)
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        with self._mu:
            self._memo[path] = [*stamp, digest]
            self._save()
        return digest

    def files(self, paths: list[str]) -> str:
        """One digest over several files, independent of the directory they sit in."""
        h = hashlib.blake2b(digest_size=32)
        for p in sorted(paths, key=os.path.basename):
            h.update(os.path.basename(p).encode() + b"\0" + self.file(p).encode())
        return h.hexdigest()

    def _save(self) -> None:
        if not self.memo_path:
            return
        tmp = f"{self.memo_path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(self._memo, f)
            os.replace(tmp, self.memo_path)
        except OSError as exc:
            log.warning("cannot save weight digest memo %s: %s", self.memo_path, exc)
