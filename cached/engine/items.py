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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cached_client.errors import CacheError, InvalidSpec, LimitExceeded
from cached_client.specs import ImageSpec, Spec, TextSpec, decode_spec
from cached_client.stamp import Stamp, stamp_of

from ..encoders import Encoder
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


class Items:
    def __init__(self, sources: Sources, limits: Limits) -> None:
        self.sources = sources
        self.limits = limits
        self._memo: OrderedDict[tuple[str, bytes], tuple[Item, Stamp | None]] = OrderedDict()
        self._memo_bytes = 0
        self._mu = threading.Lock()

    def parse(self, specs: bytes, enc: Encoder, caller: Caller,
              alive: Callable[[], bool] = lambda: True) -> list[Item | CacheError]:
        """One Item (or the item's error) per line; LimitExceeded for too many lines. Stops early
        (the rest Cancelled) when `alive()` turns false: the caller went away."""
        if not specs:
            return []
        n = specs.count(b"\n") + 1
        if n > self.limits.max_items:
            raise LimitExceeded(f"{n} items in one request, more than limits.max_items ({self.limits.max_items})")
        out: list[Item | CacheError] = []
        for i, line in enumerate(specs.split(b"\n")):
            if i % CHECK_EVERY == 0 and i and not alive():
                from cached_client.errors import Cancelled

                return out + [Cancelled("the call ended")] * (n - i)
            out.append(self._item(i, line, enc, caller))
        return out

    def _item(self, i: int, line: bytes, enc: Encoder, caller: Caller) -> Item | CacheError:
        try:
            item = self._remembered(enc, line, caller)
            if item is not None:
                return item
            spec = self._decode(i, line)
            return self._resolve(i, line, spec, enc, caller)
        except CacheError as exc:
            return exc

    def _decode(self, i: int, line: bytes) -> Spec:
        lim = self.limits
        try:
            return decode_spec(line, max_path_bytes=lim.max_path_bytes, max_path_depth=lim.max_path_depth,
                               max_text_bytes=lim.max_text_bytes)
        except (ValueError, TypeError, RecursionError) as exc:
            raise InvalidSpec(f"item {i}: {exc}") from None

    def _remembered(self, enc: Encoder, line: bytes, caller: Caller) -> Item | None:
        """The memo's item for the line when its source is unchanged and this caller may read it."""
        with self._mu:
            hit = self._memo.get((enc.name, line))
            if hit is not None:
                self._memo.move_to_end((enc.name, line))
        if hit is None:
            return None
        item, stamp = hit
        if not isinstance(item.spec, ImageSpec):
            return item
        try:
            st = os.stat(item.spec.path)
        except (OSError, ValueError):
            return None  # gone or unreadable: the full path says why
        if stamp_of(st) != stamp:
            return None
        if not self.sources.may_read(caller, st, item.spec.path, item.real, item.acl):
            raise self.sources.refuse(item.spec.path)
        return item

    def _resolve(self, i: int, line: bytes, spec: Spec, enc: Encoder, caller: Caller) -> Item:
        if isinstance(spec, TextSpec):
            if enc.input != "text":
                raise InvalidSpec(f"item {i}: encoder {enc.name!r} takes images, not text")
            digest = hashlib.blake2b(spec.text.encode(), digest_size=32).digest()
            item = Item(spec, entry_key(digest, spec, enc.fingerprint))
            self._remember(enc, line, spec, item, None)
            return item
        if enc.input != "image":
            raise InvalidSpec(f"item {i}: encoder {enc.name!r} takes text, not images")
        source = self.sources.digest(spec.path, caller)
        item = Item(spec, entry_key(source.digest, spec, enc.fingerprint), source.real, source.digest,
                    source.data, source.acl)
        if source.stamp is not None:
            self._remember(enc, line, spec, Item(spec, item.key, source.real, source.digest, None, source.acl),
                           source.stamp)
        return item

    def _remember(self, enc: Encoder, line: bytes, spec: Spec, item: Item, stamp: Stamp | None) -> None:
        if line != spec.wire_json().encode():
            return  # not the canonical line: padded or reordered copies would only fill the memo
        cost = len(line) + len(item.real) + MEMO_OVERHEAD
        with self._mu:
            if (enc.name, line) in self._memo:
                return
            self._memo[(enc.name, line)] = (item, stamp)
            self._memo_bytes += cost
            while self._memo_bytes > self.limits.key_memo_bytes and self._memo:
                (_, old_line), (old, _) = self._memo.popitem(last=False)
                self._memo_bytes -= len(old_line) + len(old.real) + MEMO_OVERHEAD

    @property
    def memo_bytes(self) -> int:
        return self._memo_bytes
