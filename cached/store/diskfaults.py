"""How the disk tier accounts for a failing disk: counted, logged at most once a minute, and
remembered so that the next open repairs what a fault left behind.

A fault is an error of the filesystem or of SQLite (diskindex.FAULTS: full, read-only, permissions,
I/O, a damaged index). The tier never lets one stop the daemon: on the read path it is a miss counted
in stats()["read_errors"], on the write path a CapacityError counted in stats()["write_errors"]
(FaultLog.capacity_errors). A full disk under heavy load fails every put; logging each would flood the
log, so the first fault is logged at once and then at most one line every FAULT_LOG_S, with the totals.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from cached_client.errors import CapacityError

from .diskindex import FAULTS, is_damage

__all__ = ["FaultLog", "FAULT_LOG_S"]

log = logging.getLogger(__name__)

FAULT_LOG_S = 60.0  # a failing disk is logged at most once a minute


class FaultLog:
    """The faults of one tier's directory, counted into the tier's `counters` under its `lock`.

    `unclean` is set when something was left for the next open to reconcile (a damaged index, a file
    that could not be removed): the tier's close() then does not record a clean close."""

    def __init__(self, directory: str, counters: dict[str, int], lock: threading.Lock) -> None:
        self.directory = directory
        self.unclean = False
        self._counters = counters
        self._lock = lock
        self._logged = -FAULT_LOG_S

    def note(self, counter: str, action: str, exc: BaseException) -> None:
        """Counts a failed read or write of the disk or the index and logs it: the first at once, then
        at most one line a minute (lock held). A damaged index is left for the next open to rebuild."""
        self._counters[counter] += 1
        if is_damage(exc):
            self.unclean = True
        now = time.monotonic()
        if now - self._logged >= FAULT_LOG_S:
            self._logged = now
            log.warning("disk tier %s: %s failed: %s (%d write and %d read errors so far; next report in "
                        "%.0f s at the earliest)", self.directory, action, exc, self._counters["write_errors"],
                        self._counters["read_errors"], FAULT_LOG_S)

    @contextmanager
    def capacity_errors(self, action: str) -> Iterator[None]:
        """Turns a failure of the disk or the index into a CapacityError, counted and logged (takes
        the lock)."""
        try:
            yield
        except (CapacityError, *FAULTS) as exc:
            with self._lock:
                self.note("write_errors", action, exc)
            if isinstance(exc, CapacityError):
                raise
            raise CapacityError(f"disk tier {self.directory}: {action} failed: {exc}") from exc
