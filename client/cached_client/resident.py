"""The loader's handles kept from one epoch to the next, when the whole dataset fits.

A loader resolves every window of every epoch through the daemon (an RPC, a stat of each source
there, a lease). When all of a dataset's entries fit in `budget` bytes (by default half of the
daemon's shared memory, the default cap of one client's leases), the first epoch keeps them
leased, and later epochs resolve nothing: each item costs one stat of its source here, to prove it
unchanged (cached_client/stamp.py), and only changed items go back to the daemon. A dataset that
does not fit streams, window by window, as before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .gather import Resolved
from .specs import ImageSpec, Spec
from .stamp import Stamp, source_stamp
from .wire import HANDLE

__all__ = ["Resident"]


class Resident:
    def __init__(self, columns: Mapping[str, Sequence[Spec]], budget: int) -> None:
        n = len(next(iter(columns.values())))
        self._columns = columns
        self.budget = budget
        self.bytes = 0
        self.records = {name: np.zeros(n, HANDLE) for name in columns}
        self.segments: dict[str, dict] = {name: {} for name in columns}
        self.layouts: dict[str, dict] = {name: {} for name in columns}
        self.known = np.zeros(n, dtype=bool)
        self.paths: list[list[str]] = [[s.path for s in (columns[c][i] for c in columns) if isinstance(s, ImageSpec)]
                                       for i in range(n)]
        self.stamps: list[tuple[Stamp | None, ...]] = [()] * n
        self.abandoned = False

    @property
    def complete(self) -> bool:
        return not self.abandoned and bool(self.known.all())

    def stamp(self, items: list[int]) -> list[tuple[Stamp | None, ...]]:
        """The sources' stamps of `items`, taken before they are resolved."""
        return [tuple(source_stamp(p) for p in self.paths[i]) for i in items]

    def keep(self, items: list[int], resolved: dict[str, Resolved], stamps: list[tuple[Stamp | None, ...]]) -> list[int]:
        """Takes the window's handles (now leased for as long as it is kept); returns the lease ids
        it replaces (items resolved again). Abandons when the budget would be passed."""
        rows = np.asarray(items)
        added = sum(int(r.records["length"].sum()) for r in resolved.values())
        if self.abandoned or self.bytes + added > self.budget or any(r.errors for r in resolved.values()):
            return self.abandon() if not self.abandoned else []
        replaced = [int(x) for name in resolved for x in self.records[name]["lease"][rows] if x]
        for name, r in resolved.items():
            self.bytes += int(r.records["length"].sum()) - int(self.records[name]["length"][rows].sum())
            self.records[name][rows] = r.records
            self.segments[name].update(r.segments)
            self.layouts[name].update(r.layouts)
        for i, s in zip(items, stamps, strict=True):
            self.stamps[i] = s
        self.known[rows] = True
        return replaced

    def abandon(self) -> list[int]:
        """Stops keeping: the lease ids to give back (the dataset streams from now on)."""
        self.abandoned = True
        ids = [int(x) for r in self.records.values() for x in r["lease"] if x]
        for r in self.records.values():
            r["lease"] = 0
        self.known[:] = False
        self.bytes = 0
        return ids

    def changed(self, items: list[int]) -> list[int]:
        """The items whose sources changed since they were resolved (or can't be told): one stat each."""
        out = []
        for i in items:
            for p, s in zip(self.paths[i], self.stamps[i]):  # noqa: B905 - both made from the same specs
                if not _same(p, s):
                    out.append(i)
                    break
        return out

    def reset(self) -> None:
        """Forgets everything (the daemon that granted the leases is gone): filled again from scratch."""
        self.__init__(self._columns, self.budget)  # type: ignore[misc]

    def view(self) -> dict[str, Resolved]:
        """{encoder: every item's handles}, rows by item index."""
        return {name: Resolved(self.records[name], self.segments[name], self.layouts[name]) for name in self.records}


def _same(path: str, stamp: Stamp | None, stat: Any = os.stat) -> bool:
    """The file still has `stamp` (cached_client.stamp.unchanged, inlined: it runs once per item
    of every epoch)."""
    try:
        st = stat(path)
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) == stamp
