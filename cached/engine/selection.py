"""Which entries an evict or a list means: everything, an encoder's, a source prefix's, or keys.

Keys may be given as prefixes (the 16 digits `cachectl ls` prints): `resolve` turns each into the
one key that starts with it, among the entries of the tiers asked about, before anything happens,
so a prefix that matches no entry or several fails the whole call and nothing is evicted. Inspect
resolves its one prefix with the same function.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cached_client.errors import CacheMiss, InvalidSpec, UnknownEncoder

if TYPE_CHECKING:
    from .tiers import Tiers

__all__ = ["Selection", "TIERS", "check_tier", "check_prefix", "unique_keys", "resolve", "unknown_encoder"]

TIERS = ("", "all", "shm", "disk", "remote")  # "all" is the local tiers: the remote one only by name
KEY_DIGITS = 64
_HEX = frozenset("0123456789abcdef")
_SHOWN = 3  # prefixes, or keys of an ambiguous prefix, that an error names


def check_tier(tier: str) -> str:
    if tier not in TIERS:
        raise InvalidSpec(f"tier must be one of shm, disk, remote, all; got {tier!r}")
    return tier


def check_prefix(prefix: str) -> str:
    """A key or a prefix of one, as lower-case hex; InvalidSpec naming anything else."""
    key = prefix.strip().lower()
    if not key or len(key) > KEY_DIGITS or not set(key) <= _HEX:
        raise InvalidSpec(f"keys must be hex digests or prefixes of them (1 to {KEY_DIGITS} hex digits), "
                          f"got {prefix[:80]!r}")
    return key


def unknown_encoder(name: str, configured: Iterable[str]) -> UnknownEncoder:
    return UnknownEncoder(f"no encoder named {name!r} (known: {', '.join(sorted(configured)) or 'none'})")


def _named(items: list[str]) -> str:
    return ", ".join(items[:_SHOWN]) + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def unique_keys(keys: Iterable[bytes], prefixes: Iterable[str]) -> list[bytes]:
    """The one key of `keys` that starts with each prefix (checked with check_prefix), in order.
    InvalidSpec naming the prefixes that several keys start with, else CacheMiss naming those that
    none does."""
    ordered = sorted({k.hex() for k in keys})
    out: list[bytes] = []
    missing: list[str] = []
    ambiguous: list[str] = []
    for prefix in prefixes:
        want = check_prefix(prefix)
        at = bisect.bisect_left(ordered, want)
        matches = [k for k in ordered[at:at + _SHOWN + 1] if k.startswith(want)]
        if not matches:
            missing.append(want)
        elif len(matches) > 1:
            shown = ", ".join(k[:max(16, len(want) + 4)] for k in matches[:_SHOWN])
            ambiguous.append(f"{want} ({shown}{', ...' if len(matches) > _SHOWN else ''})")
        else:
            out.append(bytes.fromhex(matches[0]))
    if ambiguous:
        raise InvalidSpec(f"key prefix matches several entries, give more digits: {_named(ambiguous)}")
    if missing:
        raise CacheMiss(f"no entry's key starts with {_named(missing)}")
    return out


@dataclass(frozen=True)
class Selection:
    """A predicate over store entries (shm or disk: both have .key and .meta). An entry matches when
    `everything` is set or it matches any of the criteria given. `prefixes` (hex, checked) are
    turned into `keys` by `resolve` before the selection is used."""

    everything: bool = False
    encoder: str = ""
    source_prefix: str = ""
    keys: frozenset[bytes] = field(default_factory=frozenset)
    prefixes: tuple[str, ...] = ()

    @classmethod
    def of(cls, everything: bool = False, encoder: str = "", source_prefix: str = "",
           keys: Iterable[str] = ()) -> Selection:
        """From request fields: `keys` are whole keys or prefixes, checked here."""
        return cls(everything, encoder, source_prefix, prefixes=tuple(check_prefix(k) for k in keys))

    @property
    def empty(self) -> bool:
        return not (self.everything or self.encoder or self.source_prefix or self.keys or self.prefixes)

    def __call__(self, entry: Any) -> bool:
        return bool(self.everything
                    or (self.encoder and entry.meta.get("encoder") == self.encoder)
                    or (self.source_prefix and entry.meta.get("source", "").startswith(self.source_prefix))
                    or entry.key in self.keys)


def _everything(entry: Any) -> bool:
    return True


def resolve(selection: Selection, tiers: Tiers, encoders: Collection[str], tier: str) -> Selection:
    """`selection` with its prefixes resolved among the entries of `tier` (unique_keys' errors).
    UnknownEncoder for an encoder that is not configured and that no entry there names (entries of
    an encoder taken out of the config can still be listed and evicted by its name)."""
    name = selection.encoder
    if name and name not in encoders and not tiers.list_entries(tier, Selection(encoder=name)):
        raise unknown_encoder(name, encoders)
    if not selection.prefixes:
        return selection
    keys = unique_keys((row["key"] for row in tiers.list_entries(tier, _everything)), selection.prefixes)
    return replace(selection, keys=selection.keys | frozenset(keys), prefixes=())
