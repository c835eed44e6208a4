"""Sources in an object store: `s3://bucket/key` read like a local file, with the daemon's credentials.

A caller may name an object only under an `s3://bucket[/prefix]` entry of allowed_roots; with no
such entry every object is refused (a local file is checked against the caller's own rights, an
object cannot be: the daemon's credentials read it, so the roots are the whole policy). A prefix
matches whole segments: `s3://data/train` admits `s3://data/train/a.png`, never
`s3://data/train-old/a.png`. Keys are taken as written (specs.check_object_url refuses empty, "."
and ".." segments), so a prefix says what it admits.

Each lookup costs one HEAD. Its (bucket, key, version id or ETag) is remembered with the content
digest, so a repeated lookup downloads nothing, and an object rewritten in place (a new ETag or
version) is read and hashed again: a new key. The download is ranged and concurrent within the
reader's bound (remoteclient.ObjectReader) and each part is conditional on the ETag, so an object
replaced while read is an error, never a mix of two versions.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from cached_client.errors import LimitExceeded, SourceNotAllowed
from cached_client.specs import OBJECT_SCHEME, check_object_url

from ..store.remoteclient import ObjectReader, parse_url

__all__ = ["ObjectSources", "object_roots", "MEMO_BYTES"]

MEMO_BYTES = 16 << 20  # the (bucket, key, version) -> digest memo, least recently used out first
_MEMO_OVERHEAD = 200   # bytes a memo entry costs beyond its key's text


def object_roots(roots: list[str]) -> list[tuple[str, str]]:
    """(bucket, prefix) of each s3:// entry of allowed_roots; ValueError for a malformed one."""
    out = []
    for root in roots:
        if root.startswith(OBJECT_SCHEME):
            bucket, prefix = parse_url(root)
            if prefix:
                check_object_url(f"{OBJECT_SCHEME}{bucket}/{prefix}")  # the segments rule keys obey
            out.append((bucket, prefix))
    return out


class ObjectSources:
    """s3:// sources under `roots` (allowed_roots entries), read through `reader`, at most
    `max_bytes` each."""

    def __init__(self, roots: list[str], reader: ObjectReader | None, max_bytes: int,
                 memo_bytes: int = MEMO_BYTES) -> None:
        self.roots = object_roots(roots)
        self.reader = reader
        self.max_bytes = max_bytes
        self.memo_bytes = memo_bytes
        self._memo: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
        self._memo_used = 0
        self._mu = threading.Lock()

    def locate(self, url: str) -> tuple[str, str]:
        """(bucket, key) of an allowed object URL; SourceNotAllowed otherwise (without a request,
        so a refusal says nothing about whether the object exists)."""
        check_object_url(url)
        bucket, _, key = url[len(OBJECT_SCHEME):].partition("/")
        if self.reader is None or not any(
                b == bucket and (not p or key == p or key.startswith(p + "/")) for b, p in self.roots):
            raise SourceNotAllowed(f"{url}: outside the s3:// entries of allowed_roots "
                                   f"{[f'{OBJECT_SCHEME}{b}/{p}' for b, p in self.roots]}")
        return bucket, key

    def fetch(self, url: str, always_read: bool) -> tuple[bytes, bytes | None]:
        """(digest, bytes) of the object as it is now; bytes is None when the digest came from the
        memo (unless `always_read`). SourceError, LimitExceeded or SourceNotAllowed otherwise."""
        bucket, key = self.locate(url)
        assert self.reader is not None
        info = self.reader.head(bucket, key)
        if info.size > self.max_bytes:
            raise LimitExceeded(f"{url}: {info.size} bytes, more than limits.max_source_bytes ({self.max_bytes})")
        version = info.version_id or info.etag
        memo_key = (bucket, key, version) if version else None
        if memo_key is not None and not always_read:
            with self._mu:
                digest = self._memo.get(memo_key)
                if digest is not None:
                    self._memo.move_to_end(memo_key)
                    return digest, None
        data = self.reader.read_object(bucket, key, self.max_bytes, info)
        digest = hashlib.blake2b(data, digest_size=32).digest()
        if memo_key is not None:
            self._remember(memo_key, digest)
        return digest, data

    def _remember(self, memo_key: tuple[str, str, str], digest: bytes) -> None:
        cost = sum(len(part) for part in memo_key) + _MEMO_OVERHEAD
        with self._mu:
            if memo_key in self._memo:
                return
            self._memo[memo_key] = digest
            self._memo_used += cost
            while self._memo_used > self.memo_bytes and self._memo:
                old, _ = self._memo.popitem(last=False)
                self._memo_used -= sum(len(part) for part in old) + _MEMO_OVERHEAD

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
