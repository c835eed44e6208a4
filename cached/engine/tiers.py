"""Shared memory in front of the disk tier, and both in front of the remote tier: lookups,
promotion, write-through, uploads, eviction, stats.

A sealed entry goes to shared memory at once and is written through to disk by background writers
(a durable write costs an fsync of the file and its directory, milliseconds the encoder must not
wait for). A shared-memory miss that the disk holds is promoted: read (verified by checksum), put in
shared memory, leased. With no disk tier configured every call simply skips it.

With a remote tier (store/remote.py), a miss in both is looked up in the bucket (one GET bounded by
its timeout, verified by checksum, a miss whatever the store does), and a found entry is promoted to
shared memory and written through to disk. A newly computed entry is also queued for upload (never
waiting for the store); an entry that came from the bucket is not uploaded again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cached_client.errors import CacheError, DeadlineExceeded, InvalidSpec, SourceError

from ..store import Entry, Owner, ShmStore, TensorBytes
from ..store.disk import DiskTier
from ..store.remote import RemoteEntry, RemoteFault, RemoteTier
from .selection import Selection

__all__ = ["Tiers", "Held"]

log = logging.getLogger(__name__)

Held = tuple[Entry, int]  # an entry and the lease on it (0: not leased)
MAX_PENDING_WRITES = 512  # sealing waits when this many entries are not on disk yet
SEAL_WAIT_S = 30.0        # ... for this long at most; then the entry is served from shm only
FLUSH_WAIT_S = 60.0       # how long an eviction from disk waits for the writes in flight
REMOTE_LIST_MAX = 100_000  # objects `ls --tier remote` lists at most


class Tiers:
    def __init__(self, shm: ShmStore, disk: DiskTier | None = None, writers: int = 2,
                 remote: RemoteTier | None = None) -> None:
        self.shm = shm
        self.disk = disk
        self.remote = remote
        self._writers = ThreadPoolExecutor(writers, thread_name_prefix="disk-write") if disk else None
        self._outstanding: set[int] = set()  # sequence numbers of sealed entries not on disk yet
        self._seq = 0
        self._written = threading.Condition()  # notified whenever a write ends
        self._mu = threading.Lock()
        self.counters = {"promotions": 0, "disk_write_errors": 0, "disk_write_skipped": 0}

    def acquire(self, key: bytes, owner: Owner | None) -> Held | None:
        """The entry from shared memory, leased to `owner` (when given); None on a miss."""
        entry = self.shm.lookup(key)
        if entry is None:
            return None
        if owner is None:
            return entry, 0
        lease = self.shm.lease(entry, owner)
        return None if lease is None else (entry, lease)

    def acquire_many(self, keys: list[bytes], owner: Owner | None) -> list[Held | CacheError | None]:
        """`acquire` for a batch under one lock; an item over the owner's lease cap is its error."""
        return self.shm.acquire_many(keys, owner)  # type: ignore[return-value]

    @property
    def lower(self) -> bool:
        """Whether a shared-memory miss has anywhere else to look."""
        return self.disk is not None or self.remote is not None

    def promote(self, key: bytes, owner: Owner | None) -> Held | None:
        """A shared-memory miss served from disk or the bucket; None when neither has it."""
        found = self.promote_from(key, owner)
        return None if found is None else found[0]

    def promote_from(self, key: bytes, owner: Owner | None) -> tuple[Held, str] | None:
        """`promote`, and the tier ("disk" or "remote") the entry came from."""
        found = self.disk.get(key) if self.disk is not None else None
        tier = "disk"
        if found is None and self.remote is not None:
            found, tier = self.remote.get(key), "remote"
            if found is not None:
                self._write_through(key, *found)
        if found is None:
            return None
        tensors, meta = found
        self.shm.put(key, tensors, meta)
        self._count("promotions")
        held = self.acquire(key, owner)
        return None if held is None else (held, tier)

    def seal(self, key: bytes, tensors: dict[str, TensorBytes], meta: dict[str, str]) -> Entry:
        """Into shared memory now, onto disk soon, queued for the bucket (a copy). `tensors` must
        stay valid until written."""
        entry = self.shm.put(key, tensors, meta)
        if self.remote is not None:
            self.remote.submit(key, tensors, meta)
        self._write_through(key, tensors, meta)
        return entry

    def _write_through(self, key: bytes, tensors: dict[str, TensorBytes], meta: dict[str, str]) -> None:
        """Queues the entry's disk write; skipped (counted) when the disk is stuck."""
        if self._writers is None:
            return
        with self._written:
            if not self._written.wait_for(lambda: len(self._outstanding) < MAX_PENDING_WRITES, SEAL_WAIT_S):
                self._count("disk_write_skipped")  # a stuck disk must not stop encoding
                log.warning("disk writes are stuck (%d pending for %.0f s): %s stays in shared memory only",
                            len(self._outstanding), SEAL_WAIT_S, key.hex()[:16])
                return
            self._seq += 1
            seq = self._seq
            self._outstanding.add(seq)
        self._writers.submit(self._write, seq, key, tensors, meta)

    def _write(self, seq: int, key: bytes, tensors: dict[str, TensorBytes], meta: dict[str, str]) -> None:
        assert self.disk is not None
        try:
            if not self.disk.contains(key):
                self.disk.put(key, tensors, meta)
        except (CacheError, OSError, ValueError) as exc:  # the entry stays served from shared memory
            self._count("disk_write_errors")
            # a CacheError is a full or read-only disk, which the tier logs itself at most once a minute
            log.log(logging.DEBUG if isinstance(exc, CacheError) else logging.WARNING,
                    "writing %s to disk failed: %s", key.hex()[:16], exc)
        finally:
            with self._written:
                self._outstanding.discard(seq)
                self._written.notify_all()

    def _count(self, counter: str) -> None:
        with self._mu:
            self.counters[counter] += 1

    def evict(self, match: Callable[[Any], bool], tier: str) -> dict[str, int]:
        """Evicts from the tiers that `tier` names ("shm", "disk", "all": both; "remote" only when
        named, since the bucket is every node's): counts per tier."""
        out = {"entries": 0, "bytes": 0, "pending": 0, "disk_entries": 0, "disk_bytes": 0}
        if tier == "remote":
            return out | self._evict_remote(match)
        if tier in ("", "all", "shm"):
            out["entries"], out["bytes"], out["pending"] = self.shm.evict(match)
        if tier in ("", "all", "disk") and self.disk is not None:
            self.flush()
            out["disk_entries"], out["disk_bytes"] = self.disk.evict(match)
        return out

    def _evict_remote(self, match: Callable[[Any], bool]) -> dict[str, int]:
        rows = self._remote_rows(match)
        try:
            self._remote_tier().delete([row.key for row in rows])
        except RemoteFault as fault:
            raise SourceError(f"remote tier {self._remote_tier().url}: {fault}") from None
        return {"remote_entries": len(rows), "remote_bytes": sum(row.size for row in rows)}

    def _remote_rows(self, match: Callable[[Any], bool]) -> list[RemoteEntry]:
        """The bucket's objects that `match` takes (a few keys: one listing each; else the whole
        tier, at most REMOTE_LIST_MAX). Objects are listed by key, their meta is inside them, so
        only everything or keys can be chosen there."""
        if isinstance(match, Selection) and (match.encoder or match.source_prefix):
            raise InvalidSpec("the remote tier is chosen by --all or --key only (its objects are listed by key; "
                              "the encoder and source are inside them)")
        remote = self._remote_tier()
        try:
            if isinstance(match, Selection) and not match.everything:
                return [row for key in sorted(match.keys)
                        for row in remote.list_entries(key.hex(), limit=1) if row.key == key]
            return [row for row in remote.list_entries(limit=REMOTE_LIST_MAX) if match(row)]
        except RemoteFault as fault:
            raise SourceError(f"remote tier {remote.url}: {fault}") from None

    def _remote_tier(self) -> RemoteTier:
        if self.remote is None:
            raise InvalidSpec("no remote tier is configured ([store] remote)")
        return self.remote

    def list_entries(self, tier: str, match: Callable[[Any], bool]) -> list[dict[str, Any]]:
        """Rows (key, tier, bytes, meta, leases) of matching entries, least recently used first
        (the remote tier's, only when named: in key order, at most REMOTE_LIST_MAX, without meta)."""
        if tier == "remote":
            return self._list_remote(match)
        rows: list[dict[str, Any]] = []
        if tier in ("", "all", "shm"):
            rows += [{"key": e.key, "tier": "shm", "bytes": e.length, "meta": e.meta, "leases": e.leases}
                     for e in self.shm.list_entries() if match(e)]
        if tier in ("", "all", "disk") and self.disk is not None:
            rows += [{"key": e.key, "tier": "disk", "bytes": e.size, "meta": e.meta, "leases": 0}
                     for e in self.disk.list_entries() if match(e)]
        return rows

    def _list_remote(self, match: Callable[[Any], bool]) -> list[dict[str, Any]]:
        return [{"key": e.key, "tier": "remote", "bytes": e.size, "meta": {}, "leases": 0}
                for e in self._remote_rows(match)]

    def stats(self) -> dict[str, dict[str, Any]]:
        s = self.shm.stats()
        tiers: dict[str, dict[str, Any]] = {"shm": {
            "entries": s["entries"], "bytes": s["bytes"], "capacity_bytes": s["capacity_bytes"],
            "backend": self.shm.backend, "held_bytes": s["held_bytes"]}}
        if self.disk is not None:
            d = self.disk.stats()
            tiers["disk"] = {"entries": d["entries"], "bytes": d["bytes"], "capacity_bytes": d["capacity_bytes"]}
        if self.remote is not None:
            # what the bucket holds is known only by listing it (cachectl ls --tier remote): 0 here;
            # held_bytes is what the upload queue holds in this daemon's memory
            tiers["remote"] = {"entries": 0, "bytes": 0, "capacity_bytes": 0, "backend": self.remote.url,
                               "held_bytes": self.remote.stats()["upload_queue_bytes"]}
        return tiers

    def counter_values(self) -> dict[str, int]:
        with self._mu:
            out = dict(self.counters)
        out["evictions"] = self.shm.stats()["evictions"]
        if self.disk is not None:
            d = self.disk.stats()
            out.update(disk_corrupt=d["corrupt"], disk_evictions=d["evictions"], disk_writes=d["writes"],
                       disk_read_errors=d["read_errors"], disk_read_only=d["read_only"], disk_off=d["off"])
        if self.remote is not None:  # its gets that found an entry are the engine's remote_hits
            out.update({f"remote_{name}": n for name, n in self.remote.stats().items() if name != "hits"})
        return out

    def flush(self, timeout: float = FLUSH_WAIT_S) -> None:
        """Waits until every entry sealed before the call is on disk (entries sealed meanwhile do
        not hold it up; any number of callers at once). DeadlineExceeded after `timeout` seconds."""
        with self._written:
            upto = self._seq
            if not self._written.wait_for(lambda: not self._outstanding or min(self._outstanding) > upto,
                                          timeout):
                raise DeadlineExceeded(f"{len(self._outstanding)} disk writes still pending after "
                                       f"{timeout:.0f} s; nothing was evicted from disk")

    def close(self, timeout: float = FLUSH_WAIT_S) -> None:
        """Finishes pending disk writes (for up to `timeout` seconds: the rest are dropped, and the
        entries recomputed when asked for again) and closes the disk tier (the shm store is closed
        by its owner)."""
        if self._writers is not None:
            with self._written:
                self._written.wait_for(lambda: not self._outstanding, timeout)
                dropped = len(self._outstanding)
            if dropped:
                log.warning("shutting down with %d disk writes still pending; they are dropped", dropped)
            self._writers.shutdown(wait=not dropped, cancel_futures=True)
        if self.remote is not None:
            self.remote.close(timeout)
        if self.disk is not None:
            self.disk.close()

