"""A packed batch of specs into items: each line's spec, its source checked for this caller, its key.

Key: source digest + transform (or exact text) + encoder fingerprint (keys.py). A line seen before
costs one stat, not a realpath, an open, a JSON parse and a digest: the memo maps (encoder, line) to
its item and the source's stamp, and a hit is still checked against this caller's rights. The memo
only keeps lines in their canonical form (whitespace-padded copies of a line can't fill it) and is
bounded in bytes (limits.key_memo_bytes), least recently used out first.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from cached_client.errors import CacheError, Cancelled, InvalidSpec, LimitExceeded
from cached_client.specs import Spec, TextSpec, decode_spec
from cached_client.stamp import Stamp, matches

from ..encoders import Encoder
from .access import permits_read
from .caller import Caller
from .keys import entry_key
from .limits import Limits
from .sources import Sources

__all__ = ["Item", "Items", "MEMO_OVERHEAD"]

MEMO_OVERHEAD = 400  # bytes a memo entry costs beyond its line and path (dict slot, tuples, Item)
CHECK_EVERY = 64     # items parsed between checks that the caller still waits


@dataclass(frozen=True)
class Item:
    """One parsed request item and its key."""

    spec: Spec
    key: bytes
    real: str = ""              # the source file's real path (images)
    digest: bytes = b""         # the source's content digest (images)
    data: bytes | None = None   # the source bytes, when they were read to digest them
    acl: bool = False           # the source carries a POSIX ACL
    dirs: tuple[str, ...] = ()  # directories a caller must be able to search to reach the source
    stamp: Stamp | None = None  # the source's stamp when its digest was taken (None: none to trust)


class Items:
    def __init__(self, sources: Sources, limits: Limits) -> None:
        self.sources = sources
        self.limits = limits
        self._memo: dict[tuple[str, bytes], Item] = {}  # insertion order: FIFO
        self._memo_bytes = 0
        self._mu = threading.Lock()

    def parse(self, specs: bytes, enc: Encoder, caller: Caller,
              alive: Callable[[], bool] = lambda: True) -> list[Item | CacheError]:
        """One Item (or the item's error) per line; LimitExceeded for too many lines. Stops early
        (the rest Cancelled) when `alive()` turns false: the caller went away.

        A remembered line costs a dictionary lookup and a stat (its source unchanged?); the
        directories on the way are checked once per request for all such items."""
        if not specs:
            return []
        n = specs.count(b"\n") + 1
        if n > self.limits.max_items:
            raise LimitExceeded(f"{n} items in one request, more than limits.max_items ({self.limits.max_items})")
        check = self.sources.check_access and caller.uid != 0
        memo, name, stat = self._memo, enc.name, os.stat
        out: list[Item | CacheError] = []
        dirs: dict[str, list[int]] = {}  # directory -> items reached through it
        for i, line in enumerate(specs.split(b"\n")):
            if not i % CHECK_EVERY and i and not alive():
                return out + [Cancelled("the call ended")] * (n - i)
            item = memo.get((name, line))
            if item is None:
                out.append(self._item(i, line, enc, caller))
                continue
            # a remembered line: its item while the source keeps its stamp (inlined: this loop is
            # most of a cached lookup), the whole way when it changed, the refusal when this caller
            # may not read the file; a text has no stamp and nothing to check
            stamp = item.stamp
            if stamp is not None:
                try:
                    st = stat(item.spec.path)  # type: ignore[union-attr]  # the path asked for: a symlink re-pointed is a change
                except (OSError, ValueError):
                    out.append(self._item(i, line, enc, caller))
                    continue
                if not matches(st, stamp):
                    out.append(self._item(i, line, enc, caller))
                    continue
                if check:
                    if not permits_read(caller, st, item.acl):
                        out.append(self.sources.refuse(item.spec.path))  # type: ignore[union-attr]
                        continue
                    for d in item.dirs:
                        dirs.setdefault(d, []).append(i)
            out.append(item)
        self._check_dirs(dirs, out, caller)
        return out

    def _check_dirs(self, dirs: dict[str, list[int]], out: list[Item | CacheError], caller: Caller) -> None:
        for directory, indices in dirs.items():
            if not self.sources.access.searchable(caller, directory):
                for i in indices:
                    item = out[i]
                    if isinstance(item, Item):
                        out[i] = self.sources.refuse(item.spec.path)  # type: ignore[union-attr]

    def _item(self, i: int, line: bytes, enc: Encoder, caller: Caller) -> Item | CacheError:
        """The whole way: parse the line, open and check the source, digest it, key it."""
        try:
            return self._resolve(i, line, self._decode(i, line), enc, caller)
        except CacheError as exc:
            return exc

    def _decode(self, i: int, line: bytes) -> Spec:
        lim = self.limits
        try:
            return decode_spec(line, max_path_bytes=lim.max_path_bytes, max_path_depth=lim.max_path_depth,
                               max_text_bytes=lim.max_text_bytes)
        except (ValueError, TypeError, RecursionError) as exc:
            raise InvalidSpec(f"item {i}: {exc}") from None

    def _resolve(self, i: int, line: bytes, spec: Spec, enc: Encoder, caller: Caller) -> Item:
        if isinstance(spec, TextSpec):
            if enc.input != "text":
                raise InvalidSpec(f"item {i}: encoder {enc.name!r} takes images, not text")
            digest = hashlib.blake2b(spec.text.encode(), digest_size=32).digest()
            item = Item(spec, entry_key(digest, spec, enc.fingerprint))
            self._remember(enc, line, spec, item)
            return item
        if enc.input != "image":
            raise InvalidSpec(f"item {i}: encoder {enc.name!r} takes text, not images")
        source = self.sources.digest(spec.path, caller)
        dirs = tuple(dict.fromkeys((os.path.dirname(spec.path), os.path.dirname(source.real))))
        item = Item(spec, entry_key(source.digest, spec, enc.fingerprint), source.real, source.digest,
                    source.data, source.acl, dirs, source.stamp)
        if source.stamp is not None:
            self._remember(enc, line, spec, replace(item, data=None))
        return item

    def _remember(self, enc: Encoder, line: bytes, spec: Spec, item: Item) -> None:
        if line != spec.wire_json().encode():
            return  # not the canonical line: padded or reordered copies would only fill the memo
        with self._mu:
            old = self._memo.pop((enc.name, line), None)
            if old is not None:
                self._memo_bytes -= _cost(line, old)
            self._memo[(enc.name, line)] = item
            self._memo_bytes += _cost(line, item)
            while self._memo_bytes > self.limits.key_memo_bytes and self._memo:
                first = next(iter(self._memo))
                self._memo_bytes -= _cost(first[1], self._memo.pop(first))

    @property
    def memo_bytes(self) -> int:
        return self._memo_bytes


def _cost(line: bytes, item: Item) -> int:
    """What a memo entry holds, roughly: its line, its paths and the objects around them."""
    return len(line) + len(item.real) + MEMO_OVERHEAD
