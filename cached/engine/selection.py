"""Which entries an evict or a list means: everything, an encoder's, a source prefix's, or keys."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from cached_client.errors import InvalidSpec

__all__ = ["Selection", "TIERS", "check_tier"]

TIERS = ("", "all", "shm", "disk")


def check_tier(tier: str) -> str:
    if tier not in TIERS:
        raise InvalidSpec(f"tier must be one of shm, disk, all; got {tier!r}")
    return tier


@dataclass(frozen=True)
class Selection:
    """A predicate over store entries (shm or disk: both have .key and .meta). An entry matches when
    `everything` is set or it matches any of the criteria given."""

    everything: bool = False
    encoder: str = ""
    source_prefix: str = ""
    keys: frozenset[bytes] = field(default_factory=frozenset)

    @classmethod
    def of(cls, everything: bool = False, encoder: str = "", source_prefix: str = "",
           keys: Iterable[str] = ()) -> Selection:
        """From request fields; hex keys are checked here."""
        keys = list(keys)
        try:
            wanted = frozenset(bytes.fromhex(k) for k in keys)
        except ValueError:
            raise InvalidSpec(f"keys must be hex digests, got {keys[:3]!r}") from None
        return cls(everything, encoder, source_prefix, wanted)

    @property
    def empty(self) -> bool:
        return not (self.everything or self.encoder or self.source_prefix or self.keys)

    def __call__(self, entry: Any) -> bool:
        return bool(self.everything
                    or (self.encoder and entry.meta.get("encoder") == self.encoder)
                    or (self.source_prefix and entry.meta.get("source", "").startswith(self.source_prefix))
                    or entry.key in self.keys)
