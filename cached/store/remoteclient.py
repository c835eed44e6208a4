"""S3-compatible object stores through obstore: opening a bucket, naming faults, reading whole objects.

Shared by the remote tier (remote.py) and by `s3://` sources (ObjectReader). Nothing here knows of
entries: it speaks objects, byte ranges and faults.

Why obstore (Rust `object_store` under Python) and not boto3, measured on this 2-core machine with 200
PUTs then 200 GETs of 256 KiB objects against moto's server on loopback, two runs each (moto, a Python
server on the same two cores, bounds both, so the client's CPU is the telling number):

    client    in flight   PUT/s      GET/s      client CPU per request
    boto3     1            92-94     103-105    4.0-4.5 ms
    boto3     4            91-136    112-167    3.9-4.3 ms
    obstore   1           124-129    151-160    1.0-1.4 ms
    obstore   4           145-154    180-184    0.9-1.2 ms

boto3 spends ~4 ms of Python per request holding the GIL that the daemon's servicer needs; obstore
spends a quarter of it, mostly in Rust threads without the GIL. obstore also has conditional PUT
(`mode="create"`: `If-None-Match: *`), `If-Match` ranged GETs, bulk delete and retries with backoff
built in, and no dependency but typing-extensions. What it costs: it is pre-1.0 (pinned to one minor version), its
transient errors are one class whose text names the cause (fault_kind parses it; a test pins each
kind), and its credential chain is the environment's (AWS_* variables, web identity, ECS container
and EC2 instance credentials), not ~/.aws profiles: pass `credential_provider` (e.g. obstore's
Boto3CredentialProvider) for those.

Faults are named by kind, so that stats can say why a store is failing:

    kind         what                                        retried by uploads
    timeout      no whole answer within the timeout          yes
    connection   refused, reset, closed mid-answer, DNS      yes
    5xx          the store answered 500..599                 yes
    throttled    429 Too Many Requests                       yes
    not_found    404 on a write: no such bucket (yet)        yes
    denied       401 / 403: credentials or policy            no
    4xx          any other 4xx                               no
    other        anything else                               yes
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, NamedTuple, cast
from urllib.parse import urlparse

import obstore
from obstore.exceptions import (
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from cached_client.errors import LimitExceeded, SourceError

if TYPE_CHECKING:
    from obstore import Bytes, GetOptions
    from obstore.store import ClientConfig, RetryConfig, S3Config, S3CredentialProvider

__all__ = ["FAULT_KINDS", "RETRIED", "RemoteFault", "ObjectInfo", "ObjectReader", "parse_url", "S3Endpoint",
           "fault_kind", "fault_of", "FaultLog"]

log = logging.getLogger(__name__)

FAULT_KINDS = ("timeout", "connection", "5xx", "throttled", "not_found", "denied", "4xx", "other")
RETRIED = frozenset(FAULT_KINDS) - {"denied", "4xx"}
FAULT_LOG_S = 60.0

_STATUS = re.compile(r"\bstatus(?: code)?:? (\d{3})\b")
_HTTP_KIND = re.compile(r"\bkind: (\w+)")


class RemoteFault(OSError):
    """A request to the object store failed: `kind` is one of FAULT_KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def retried(self) -> bool:
        return self.kind in RETRIED


class ObjectInfo(NamedTuple):
    """What HEAD says of an object; `version_id` is None in an unversioned bucket."""

    etag: str | None
    version_id: str | None
    size: int


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of "s3://bucket/prefix"; the prefix without its slashes, maybe empty."""
    parts = urlparse(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"remote must be an s3://bucket/prefix URL, got {url!r}")
    return parts.netloc, parts.path.strip("/")


@dataclass(frozen=True)
class S3Endpoint:
    """Where and as whom to reach S3: `url` of an S3-compatible server (None: AWS, or the
    environment's AWS_ENDPOINT_URL), `region` (None: the environment's), more obstore S3 settings
    in `options` (e.g. {"virtual_hosted_style_request": "true"}), and a `credential_provider` where
    the environment's credentials won't do."""

    url: str | None = None
    region: str | None = None
    options: Mapping[str, str] | None = None
    credential_provider: S3CredentialProvider | None = None

    def open(self, bucket: str, prefix: str = "", *, timeout_s: float = 30.0, retries: int = 0) -> S3Store:
        """A store on `bucket` under `prefix`, each request bounded by `timeout_s`, with `retries` of
        obstore's own (exponential backoff). Opening makes no request: a store that is down is found
        by the first call."""
        config: dict[str, str] = dict(self.options or {})
        if self.url:
            config["endpoint"] = self.url
        if self.region:
            config["region"] = self.region
        client: ClientConfig = {"timeout": timedelta(seconds=timeout_s),
                                "connect_timeout": timedelta(seconds=min(timeout_s, 2.0))}
        if (self.url or "").startswith("http://"):
            client["allow_http"] = True
        retry: RetryConfig = {"max_retries": retries, "retry_timeout": timedelta(seconds=timeout_s),
                              "backoff": {"init_backoff": timedelta(milliseconds=50), "max_backoff": timedelta(seconds=2)}}
        return S3Store(bucket, prefix=prefix or None, config=cast("S3Config", config), client_options=client,
                       retry_config=retry, credential_provider=self.credential_provider)


def fault_kind(exc: BaseException) -> str:
    """The kind (FAULT_KINDS) of a failed store request."""
    if isinstance(exc, (PermissionDeniedError, UnauthenticatedError, PermissionError)):
        return "denied"
    if isinstance(exc, FileNotFoundError):
        return "not_found"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError):
        return "connection"
    text = str(exc)
    if m := _STATUS.search(text):
        status = int(m.group(1))
        return ("5xx" if status >= 500 else "throttled" if status == 429 else "denied" if status in (401, 403)
                else "not_found" if status == 404 else "4xx")
    if m := _HTTP_KIND.search(text):  # reqwest's kinds: Connect, Request, Interrupted, Timeout, Decode, ...
        return {"Timeout": "timeout", "Connect": "connection", "Request": "connection",
                "Interrupted": "connection"}.get(m.group(1), "other")
    return "other"


def fault_of(exc: BaseException, action: str) -> RemoteFault:
    kind = fault_kind(exc)
    first = str(exc).split("\n", 1)[0]
    return RemoteFault(kind, f"{action}: {kind}: {first[:300]}")


class FaultLog:
    """Logs store faults: the first at once, then at most one line every FAULT_LOG_S with the count,
    so a store that is down does not flood the log."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._lock = threading.Lock()
        self._logged = -FAULT_LOG_S
        self._since = 0

    def note(self, fault: RemoteFault) -> None:
        with self._lock:
            self._since += 1
            now = time.monotonic()
            if now - self._logged < FAULT_LOG_S:
                return
            self._logged, count, self._since = now, self._since, 0
        log.warning("%s: %s (%d faults since the last report; next report in %.0f s at the earliest)",
                    self.what, fault, count, FAULT_LOG_S)


class ObjectReader:
    """Whole objects of any bucket, for `s3://` sources: HEAD, then ranged GETs of `part_bytes`, at most
    `concurrency` in flight for all callers together, each with `If-Match` on the ETag that HEAD
    gave, so an object replaced while read is an error and never a mix of two versions."""

    def __init__(self, endpoint: S3Endpoint | None = None, *, part_bytes: int = 8 << 20, concurrency: int = 4,
                 timeout_s: float = 30.0, retries: int = 2) -> None:
        if part_bytes <= 0 or concurrency <= 0:
            raise ValueError(f"part_bytes and concurrency must be positive, got {part_bytes!r}, {concurrency!r}")
        self.endpoint = endpoint or S3Endpoint()
        self.timeout_s = timeout_s
        self.retries = retries
        self.part_bytes = part_bytes
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="s3-read")
        self._stores: dict[str, S3Store] = {}
        self._lock = threading.Lock()

    def _store(self, bucket: str) -> S3Store:
        with self._lock:
            if bucket not in self._stores:
                self._stores[bucket] = self.endpoint.open(bucket, timeout_s=self.timeout_s, retries=self.retries)
            return self._stores[bucket]

    def head(self, bucket: str, key: str) -> ObjectInfo:
        """ETag, version and size of s3://bucket/key; SourceError when it can't be had."""
        try:
            meta = obstore.head(self._store(bucket), key)
        except Exception as exc:
            raise _source_error(bucket, key, exc) from None
        return ObjectInfo(meta["e_tag"], meta["version"], int(meta["size"]))

    def read_object(self, bucket: str, key: str, max_bytes: int, info: ObjectInfo | None = None) -> bytes:
        """The bytes of s3://bucket/key, of the version `info` describes (HEAD now when None).
        LimitExceeded when it is larger than `max_bytes`; SourceError when it is missing, changed
        while read, or the store fails."""
        info = info or self.head(bucket, key)
        if info.size > max_bytes:
            raise LimitExceeded(f"s3://{bucket}/{key}: {info.size} bytes, more than the {max_bytes} allowed")
        bounds = [(start, min(start + self.part_bytes, info.size)) for start in range(0, info.size, self.part_bytes)]
        parts = [self._pool.submit(self._part, bucket, key, info.etag, lo, hi) for lo, hi in bounds]
        try:
            return b"".join([p.result() for p in parts])
        finally:
            for p in parts:
                p.cancel()

    def _part(self, bucket: str, key: str, etag: str | None, lo: int, hi: int) -> Bytes:
        options: GetOptions = {"range": (lo, hi)}
        if etag:
            options["if_match"] = etag
        try:
            data = obstore.get(self._store(bucket), key, options=options).bytes()
        except Exception as exc:
            raise _source_error(bucket, key, exc) from None
        if len(data) != hi - lo:
            raise SourceError(f"s3://{bucket}/{key}: changed while being read (bytes {lo}..{hi} came "
                              f"back {len(data)} long); retry")
        return data

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _source_error(bucket: str, key: str, exc: Exception) -> SourceError:
    where = f"s3://{bucket}/{key}"
    if isinstance(exc, PreconditionError):
        return SourceError(f"{where}: changed while being read; retry")
    kind = fault_kind(exc)
    if kind == "not_found":
        return SourceError(f"{where}: no such object")
    return SourceError(f"{where}: {kind}: {str(exc).split(chr(10), 1)[0][:300]}")

