"""Digests of weights: files, remembered by path and stamp (cached_client/stamp.py) so a restart does
not rehash gigabytes, and in-memory state dicts (for plugin modules)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import torch

from cached_client.stamp import stamp_of

__all__ = ["WeightDigests", "state_dict_digest", "json_digest"]

log = logging.getLogger(__name__)

_CHUNK = 8 << 20
_LOUD = 64 << 20  # files hashed at INFO level: those that take a noticeable time


class WeightDigests:
    """blake2b-256 of files; the memo lives in memory and, when `memo_path` is set, in a JSON file."""

    def __init__(self, memo_path: str | None = None) -> None:
        self.memo_path = memo_path
        self._mu = threading.Lock()
        self._memo: dict[str, list] = {}
        self.hashed = 0  # files read and hashed by this instance (memo misses)
        if memo_path and os.path.exists(memo_path):
            try:
                with open(memo_path) as f:
                    self._memo = json.load(f)
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable weight digest memo %s: %s", memo_path, exc)

    def file(self, path: str) -> str:
        """blake2b-256 hex digest of a file's bytes, from the memo when its stamp is unchanged."""
        path = os.path.realpath(path)
        st = os.stat(path)
        stamped = stamp_of(st)
        stamp = list(stamped) if stamped is not None else None
        with self._mu:
            hit = self._memo.get(path)
            if stamp is not None and hit and hit[:-1] == stamp:
                return str(hit[-1])
        log.log(logging.INFO if st.st_size > _LOUD else logging.DEBUG, "hashing %s (%.1f MB)", path,
                st.st_size / 1e6)
        h = hashlib.blake2b(digest_size=32)
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        with self._mu:
            self.hashed += 1
            if stamp is not None:  # changed too recently to be told apart next time: not remembered
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
        try:  # 0640 like the disk tier's files beside it, whatever the umask
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640), "w") as f:
                json.dump(self._memo, f)
            os.replace(tmp, self.memo_path)
        except OSError as exc:
            log.warning("cannot save weight digest memo %s: %s", self.memo_path, exc)
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """blake2b-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """A short digest of a JSON-able value in canonical form (sorted keys)."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()
