"""The loader's handles kept from one epoch to the next, when the whole dataset fits.

A loader resolves every window of every epoch through the daemon (an RPC, a stat of each source
there, a lease). When all of a dataset's entries fit in `budget` bytes (by default half of the
daemon's shared memory, the default cap of one client's leases), the first epoch keeps them
leased, and later epochs resolve nothing: each item costs one stat of its source here, to prove it
unchanged (cached_client/stamp.py), and only changed items go back to the daemon. The stamps kept
from the first epoch are the daemon's (in its replies: taken when it made the keys), so that epoch
stats nothing here. A dataset that does not fit streams, window by window, as before.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from .gather import Resolved
from .specs import ImageSpec, Spec
from .stamp import Stamp, matches, source_stamp
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

    def stamps_of(self, items: list[int], resolved: Mapping[str, Resolved]) -> list[tuple[Stamp | None, ...]]:
        """The sources' stamps of `items` as the daemon took them when it made their keys (in its
        replies): no stat here. Where the daemon sees another file than this process does (another
        mount namespace), the first check says changed and the item is stamped here from then on."""
        columns = [(self._columns[name], resolved[name].stamps) for name in self._columns]
        return [tuple((s[row] if s is not None else None) for specs, s in columns if isinstance(specs[i], ImageSpec))
                for row, i in enumerate(items)]

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
        """The items whose sources changed since they were resolved (or can't be told): one stat
        each (stamp.unchanged, its loop inlined: it runs once per item of every epoch)."""
        stat, paths, stamps = os.stat, self.paths, self.stamps
        out = []
        for i in items:
            for p, s in zip(paths[i], stamps[i]):  # noqa: B905 - both made from the same specs
                try:
                    st = stat(p)
                except (OSError, ValueError):
                    out.append(i)
                    break
                if s is None or not matches(st, s):
                    out.append(i)
                    break
        return out

    def reset(self) -> None:
        """Forgets everything (the daemon that granted the leases is gone): filled again from scratch."""
        self.__init__(self._columns, self.budget)  # type: ignore[misc]

    def view(self) -> dict[str, Resolved]:
        """{encoder: every item's handles}, rows by item index."""
        return {name: Resolved(self.records[name], self.segments[name], self.layouts[name]) for name in self.records}
