"""The remote tier: entries in an S3-compatible bucket shared by every node, behind the disk tier.

    s3://<bucket>/<prefix>/
        entries/00/ .. entries/ff/  <key hex>.safetensors, sharded by the key's first byte

Each object is exactly the disk tier's file of the entry (diskformat.py: a valid safetensors file
with the entry's meta and an XXH3-128 checksum), so any node, tool or later version reads it, and a
file copied between a disk tier and the bucket needs no conversion.

Nodes share the bucket without coordinating: an upload is a conditional PUT (`If-None-Match: *`),
so an entry is stored once; the node that loses (412) counts it in "uploads_raced", not as an error.

The store may be slow, failing or down; the daemon must not notice beyond a miss:
- get() is one GET with a short timeout (`get_timeout_s`), verified by checksum. A store fault, a
  missing object and a damaged or truncated one are all misses (each counted); a damaged object is
  deleted, so that the next upload can replace it. After `breaker_failures` faulty gets in a row,
  gets are misses without a request for `breaker_cooldown_s` ("gets_skipped"), so a store that is
  down does not add its timeout to every miss.
- submit() queues an upload and returns at once (remoteupload.py): bounded in bytes, done by a few
  threads with retries and backoff, dropped and counted when the queue is full.
- Faults are counted by kind (remoteclient.FAULT_KINDS) in stats()["errors_<kind>"] and logged at
  most once a minute.

Client library: obstore (remoteclient.py says why, with the measurements). Credentials and region
come from the environment (AWS_ACCESS_KEY_ID, AWS_REGION, web identity, instance credentials).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import AlreadyExistsError, PreconditionError

from . import compress, diskformat
from .diskformat import CorruptEntry
from .remoteclient import FAULT_KINDS, FaultLog, RemoteFault, S3Endpoint, fault_of, parse_url
from .remoteupload import Upload, UploadQueue
from .slot import TensorBytes

if TYPE_CHECKING:
    from obstore.store import S3CredentialProvider

__all__ = ["RemoteTier", "RemoteEntry", "RemoteFault", "object_name"]

SUFFIX = ".safetensors"
COUNTERS = ("hits", "misses", "corrupt", "gets_skipped", "bytes_in", "bytes_out", "uploads", "uploads_raced")
_NAME = re.compile(r"entries/([0-9a-f]{2})/([0-9a-f]{64})\.safetensors")
_HEX = re.compile(r"[0-9a-f]{0,64}")


@dataclass(frozen=True)
class RemoteEntry:
    """One object of the tier, as a listing shows it (the meta is inside the object, not listed)."""

    key: bytes
    size: int
    mtime: float
    etag: str | None


def object_name(key: bytes) -> str:
    """The object's name under the tier's prefix: entries/<first 2 hex>/<key hex>.safetensors."""
    if len(key) != 32:
        raise ValueError(f"key must be 32 bytes, got {len(key)}")
    hexkey = key.hex()
    return f"entries/{hexkey[:2]}/{hexkey}{SUFFIX}"


class _Breaker:
    """`failures` faulty gets in a row make gets skip the store for `cooldown_s`; any success resets."""

    def __init__(self, failures: int, cooldown_s: float) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._streak = 0
        self._until = 0.0

    def allows(self) -> bool:
        return self._streak < self.failures or time.monotonic() >= self._until

    def failed(self) -> None:
        self._streak += 1
        if self._streak >= self.failures:
            self._until = time.monotonic() + self.cooldown_s

    def ok(self) -> None:
        self._streak = 0


class RemoteTier:
    """Entries in the bucket at `url` ("s3://bucket/prefix"), through `endpoint` (an S3-compatible
    server's URL; None: AWS, or AWS_ENDPOINT_URL) in `region` (None: the environment's). Opening
    makes no request: a store that is down is only found, and counted, by the first call.

    `options` are more obstore S3 settings (e.g. {"virtual_hosted_style_request": "true"}).
    Thread-safe. get, submit, flush and close never raise for the store; put (the upload workers'
    call), list_entries, delete and evict_all raise RemoteFault (an OSError, counted), so that
    `cachectl` can say why they failed."""

    def __init__(self, url: str, endpoint: str | None = None, region: str | None = None, *,
                 compression: str = "lz4", get_timeout_s: float = 2.0, put_timeout_s: float = 30.0,
                 upload_workers: int = 4, max_queue_bytes: int = 256 << 20, upload_attempts: int = 5,
                 backoff_s: float = 0.5, max_backoff_s: float = 8.0, breaker_failures: int = 3,
                 breaker_cooldown_s: float = 5.0, max_object_bytes: int = 1 << 30,
                 options: Mapping[str, str] | None = None,
                 credential_provider: S3CredentialProvider | None = None) -> None:
        self.bucket, self.prefix = parse_url(url)
        if compression not in compress.MODES:
            raise ValueError(f"compression must be one of {sorted(compress.MODES)}, got {compression!r}")
        for name, value in (("get_timeout_s", get_timeout_s), ("put_timeout_s", put_timeout_s),
                            ("max_object_bytes", max_object_bytes), ("breaker_failures", breaker_failures)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        self.url = url
        self.max_object_bytes = max_object_bytes
        self._codec = compress.MODES[compression]
        self.endpoint = S3Endpoint(endpoint, region, options, credential_provider)
        # gets: one try within the short timeout; uploads: retried by the queue, which counts each
        # try; listings and deletes (cachectl): obstore's own retries
        self._reads = self.endpoint.open(self.bucket, self.prefix, timeout_s=get_timeout_s)
        self._writes = self.endpoint.open(self.bucket, self.prefix, timeout_s=put_timeout_s)
        self._admin = self.endpoint.open(self.bucket, self.prefix, timeout_s=put_timeout_s, retries=3)
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(COUNTERS, 0) | {f"errors_{kind}": 0 for kind in FAULT_KINDS}
        self._breaker = _Breaker(breaker_failures, breaker_cooldown_s)
        self._faults = FaultLog(f"remote tier {url}")
        self._closed = False
        self._uploads = UploadQueue(self._upload, workers=upload_workers, max_bytes=max_queue_bytes,
                                    attempts=upload_attempts, backoff_s=backoff_s, max_backoff_s=max_backoff_s)

    def object_key(self, key: bytes) -> str:
        """The entry's object key in the bucket (prefix included)."""
        return f"{self.prefix}/{object_name(key)}" if self.prefix else object_name(key)

    # reads

    def get(self, key: bytes) -> tuple[dict[str, TensorBytes], dict[str, str]] | None:
        """(tensors, meta) of a verified entry, as DiskTier.get returns them (views of one downloaded
        buffer, or of the buffer a compressed entry is decoded into); None on a miss, whatever the
        store does: missing, damaged, slow (get_timeout_s), failing or down."""
        name = object_name(key)
        with self._lock:
            if self._closed or not self._breaker.allows():
                self._count_locked("misses", "gets_skipped")
                return None
        data = self._download(name)
        if data is None:
            return None
        try:
            entry = diskformat.decode(data, key)
        except CorruptEntry as exc:
            self._drop_corrupt(name, exc)
            return None
        self._count("hits")
        return entry

    def _download(self, name: str) -> memoryview | None:
        """The object's bytes; None (counted) when it is missing, too large or the store fails."""
        try:
            result = obstore.get(self._reads, name)
            if result.meta["size"] > self.max_object_bytes:
                self._count("misses", "corrupt")
                return None
            data = memoryview(result.bytes())
        except FileNotFoundError:
            with self._lock:
                self._breaker.ok()
                self._count_locked("misses")
            return None
        except Exception as exc:  # a store fault, whatever the library raises for it, is a miss
            self._fault(fault_of(exc, f"downloading {name}"), read=True)
            self._count("misses")
            return None
        with self._lock:
            self._breaker.ok()
            self._count_locked(bytes_in=data.nbytes)
        return data

    def _drop_corrupt(self, name: str, exc: CorruptEntry) -> None:
        """Counts a damaged object as a miss and deletes it, so that a conditional PUT can replace it
        (it would be "raced" forever otherwise). Another node's fresh copy written in between is
        deleted too: it only costs a recompute."""
        self._faults.note(RemoteFault("other", f"damaged object {name}: {exc}; deleting it"))
        self._count("misses", "corrupt")
        try:
            obstore.delete(self._reads, name)
        except Exception as err:
            self._fault(fault_of(err, f"deleting damaged {name}"))

    # writes

    def put(self, key: bytes, tensors: dict[str, TensorBytes], meta: dict[str, str]) -> bool:
        """Uploads the entry now unless the bucket has it: True when this call stored it, False when
        it was there already ("uploads_raced"). RemoteFault (counted) when the store fails;
        ValueError for a bad key, dtype, shape or meta."""
        name = object_name(key)
        enc = diskformat.encode(key, tensors, meta, self._codec)
        body = b"".join(enc.chunks)
        try:
            obstore.put(self._writes, name, body, mode="create", use_multipart=False)
        except (AlreadyExistsError, PreconditionError):  # 412, or 409: a concurrent conditional PUT
            self._count("uploads_raced")
            return False
        except Exception as exc:
            fault = fault_of(exc, f"uploading {name}")
            self._fault(fault)
            raise fault from None
        with self._lock:
            self._breaker.ok()
            self._count_locked("uploads", bytes_out=enc.size)
        return True

    def _upload(self, job: Upload) -> None:
        self.put(job.key, job.tensors, job.meta)

    def submit(self, key: bytes, tensors: dict[str, TensorBytes], meta: dict[str, str]) -> bool:
        """Queues an upload of the entry (of a copy of `tensors`) and returns at once; False when it
        was dropped because the queue is full or the tier closed (counted in "uploads_dropped").
        Never blocks on the store and never raises for it; ValueError for a bad key."""
        object_name(key)
        return self._uploads.submit(key, tensors, meta)

    def flush(self, timeout: float | None = None) -> bool:
        """Waits for the queued uploads to end (stored, raced or failed); False on timeout."""
        return self._uploads.flush(timeout)

    # listing and eviction (cachectl ls / evict --tier remote)

    def list_entries(self, key_prefix: str = "", limit: int | None = None) -> list[RemoteEntry]:
        """The tier's objects whose key starts with `key_prefix` (hex), at most `limit`, in key
        order (named as DiskTier.list_entries). Sizes are of the objects (compressed); their meta is
        inside them, not listed."""
        if not _HEX.fullmatch(key_prefix):
            raise ValueError(f"key_prefix must be lowercase hex, got {key_prefix!r}")
        if limit is not None and limit <= 0:
            raise ValueError(f"limit must be positive, got {limit!r}")
        where = f"entries/{key_prefix[:2]}" if len(key_prefix) >= 2 else "entries"
        rows: list[RemoteEntry] = []
        try:
            for chunk in obstore.list(self._admin, prefix=where, chunk_size=1000):
                for obj in chunk:
                    m = _NAME.fullmatch(obj["path"])
                    if m is None or not m.group(2).startswith(key_prefix):
                        continue
                    rows.append(RemoteEntry(bytes.fromhex(m.group(2)), int(obj["size"]),
                                            obj["last_modified"].timestamp(), obj["e_tag"]))
                    if limit is not None and len(rows) >= limit:
                        return rows
        except Exception as exc:
            raise self._fault(fault_of(exc, f"listing {self.url}")) from None
        return rows

    def delete(self, keys: list[bytes]) -> int:
        """Deletes the entries of `keys` (bulk deletes of 1000); how many were asked for (S3 does not
        say which existed). RemoteFault when the store fails."""
        names = [object_name(key) for key in keys]
        for start in range(0, len(names), 1000):
            try:
                obstore.delete(self._admin, names[start:start + 1000])
            except Exception as exc:
                raise self._fault(fault_of(exc, f"deleting from {self.url}")) from None
        return len(names)

    def evict_all(self) -> tuple[int, int]:
        """Deletes every entry of the tier (of every node: the bucket is shared): (entries, bytes)
        as listed before deleting."""
        rows = self.list_entries()
        self.delete([row.key for row in rows])
        return len(rows), sum(row.size for row in rows)

    # accounting and lifetime

    def _fault(self, fault: RemoteFault, read: bool = False) -> RemoteFault:
        with self._lock:
            self.counters[f"errors_{fault.kind}"] += 1
            if read:
                self._breaker.failed()
        self._faults.note(fault)
        return fault

    def _count(self, *names: str, **amounts: int) -> None:
        with self._lock:
            self._count_locked(*names, **amounts)

    def _count_locked(self, *names: str, **amounts: int) -> None:
        for name in names:
            self.counters[name] += 1
        for name, amount in amounts.items():
            self.counters[name] += amount

    def stats(self) -> dict[str, int]:
        """Counters (hits, misses, corrupt, gets_skipped, bytes_in, bytes_out, uploads, uploads_raced,
        uploads_dropped, uploads_failed, uploads_retried), the upload queue (upload_queue_depth,
        upload_queue_bytes), faults by kind (errors_<kind>) and their total (errors)."""
        with self._lock:
            out = dict(self.counters)
        out["errors"] = sum(out[f"errors_{kind}"] for kind in FAULT_KINDS)
        return out | self._uploads.stats()

    def close(self, timeout: float = 10.0) -> bool:
        """Waits up to `timeout` for queued uploads, drops the rest (counted), and stops; later gets
        are misses and later submits dropped. True when every queued upload ended. Idempotent."""
        with self._lock:
            self._closed = True
        return self._uploads.close(timeout)

    def __enter__(self) -> RemoteTier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
