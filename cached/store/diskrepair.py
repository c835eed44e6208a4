"""Making the disk tier's index and files agree again after an unclean shutdown.

What a kill -9 or a power cut can leave, and what reconcile does with it:

    state                               cause                                       action
    row, no file                        file deleted by hand; power cut lost it     drop the row
    file, no row                        killed between rename and index commit      verify; adopt or remove
    file in tmp/                        killed mid-write                            (wiped by every open)

It lists the 256 shard directories by name only (no stat, no read) and reads just the files that
have no row, so it costs about one directory listing even for a large tier.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from . import diskformat
from .diskformat import CorruptEntry

if TYPE_CHECKING:
    from .disk import DiskTier

__all__ = ["reconcile", "scan_files"]

log = logging.getLogger(__name__)


def scan_files(entries_dir: str, suffix: str) -> dict[bytes, str]:
    """key -> path of every entry file under the shard directories (names only)."""
    found: dict[bytes, str] = {}
    for shard in os.scandir(entries_dir):
        if not shard.is_dir(follow_symlinks=False):
            continue
        for f in os.scandir(shard.path):
            stem = f.name[:-len(suffix)]
            if f.name.endswith(suffix) and len(stem) == 64:
                try:
                    found[bytes.fromhex(stem)] = f.path
                except ValueError:
                    pass
    return found


def _adopt(tier: DiskTier, key: bytes, path: str) -> str:
    """Indexes a file that has no row (lock held): "adopted", "removed" (damaged) or "skipped"."""
    if tier._index.size_of(key) is not None:
        return "skipped"  # written since the listing
    try:
        buf, st = tier._map(path)
    except FileNotFoundError:
        return "skipped"
    try:
        tensors, meta = diskformat.decode(buf, key)
    except CorruptEntry as exc:
        log.warning("disk tier: removing damaged unindexed file %s: %s", path, exc)
        os.unlink(path)
        tier.counters["corrupt"] += 1
        return "removed"
    raw = sum(t.nbytes for t in tensors.values())
    tier._index.upsert(key, st.st_size, raw, meta, st.st_mtime)
    return "adopted"


def reconcile(tier: DiskTier) -> dict[str, int]:
    with tier._lock:
        tier._check_open()
        tier._flush_touches()
        indexed = tier._index.keys()
    files = scan_files(tier._entries_dir, ".safetensors")
    counts = {"files": len(files), "rows": len(indexed), "adopted": 0, "removed": 0, "dropped_rows": 0}
    with tier._lock:
        gone = [k for k in indexed - files.keys() if not os.path.exists(tier._path(k))]
        counts["dropped_rows"] = len(tier._index.delete(gone))
        for key in files.keys() - indexed:
            outcome = _adopt(tier, key, files[key])
            if outcome in counts:
                counts[outcome] += 1
        tier.entries, tier.bytes, tier.raw_bytes = tier._index.totals()
    log.info("disk tier %s reconciled: %s", tier.directory, counts)
    return counts
