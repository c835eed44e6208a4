"""CacheClient: what a DataLoader worker uses to read entries.

The client object is plain data (an address and timeouts): it pickles into spawned workers and
survives fork. Everything live (the gRPC channel, the identity session, the segment mappings, the
handle cache and the leases) is made lazily in the process that uses it, keyed by pid.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from . import forksafe
from ._proto import cache_pb2 as pb
from ._proto import cache_pb2_grpc
from .address import resolve_address, socket_path
from .errors import (
    ERROR_METADATA,
    CacheError,
    DaemonError,
    DaemonUnavailable,
    InvalidSpec,
    LimitExceeded,
    ProtocolError,
    Unauthenticated,
    error_for,
)
from .handles import ProcessState, process_state
from .session import current_session, forget_session, process_session
from .specs import ImageSpec, Spec, encode_specs
from .stamp import source_stamp
from .views import HAVE_TORCH, Entry, Lease, Segment, shm_error
from .wire import decode_layout, pack_leases, unpack_handles

__all__ = ["CacheClient", "WarmResult"]

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.enable_retries", 0),
]


_HEALTH = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


@dataclass
class WarmResult:
    total: int
    computed: int
    cached: int
    failed: list[tuple[int, Spec, CacheError]]


class CacheClient:
    """Reads cache entries from the local cached daemon as zero-copy tensor views.

    `address` is resolved as DESIGN.md says when not given. A call that can't reach the daemon keeps
    retrying for `connect_timeout` seconds, then raises DaemonUnavailable; the same client works again
    once the daemon is back. `timeout` bounds a whole call, encoding included (None: no bound).
    Tensors are torch tensors when torch is importable, numpy arrays otherwise (or `tensors="numpy"`).
    Over TCP, calls carry `token` (default: the contents of the file $CACHED_TOKEN_FILE names).
    """

    def __init__(self, address: str | None = None, *, timeout: float | None = None,
                 connect_timeout: float = 10.0, tensors: str = "auto", token: str | None = None) -> None:
        if connect_timeout < 0:
            raise ValueError(f"connect_timeout must be >= 0, got {connect_timeout!r}")
        if tensors not in ("auto", "torch", "numpy"):
            raise ValueError(f"tensors must be 'auto', 'torch' or 'numpy', got {tensors!r}")
        if tensors == "torch" and not HAVE_TORCH:
            raise ValueError("tensors='torch' but torch is not installed")
        self.address = address
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.tensors = tensors
        self.token = token

    # pickling and fork: only the configuration travels

    def __getstate__(self) -> dict[str, Any]:
        return {"address": self.address, "timeout": self.timeout,
                "connect_timeout": self.connect_timeout, "tensors": self.tensors, "token": self.token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"CacheClient({self.target!r})"

    @property
    def target(self) -> str:
        return resolve_address(self.address)

    def _process(self) -> ProcessState:
        """This process's state for the target: shared by every client of the process, as the
        daemon sees one session (one holder of leases) per process."""
        return process_state(self.target, self._new_state)

    def _new_state(self, target: str) -> ProcessState:
        channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        proc = ProcessState(channel, cache_pb2_grpc.CacheStub(channel))
        releaser = CacheClient(target, timeout=5.0, connect_timeout=1.0, tensors=self.tensors, token=self.token)
        proc.start_watcher(lambda ids: releaser._release(proc, ids))
        return proc

    # the public surface

    def get(self, specs: Sequence[Spec], encoder: str, compute: bool = True) -> list[Entry]:
        """One Entry per spec, in order. Misses are encoded by the daemon unless compute=False, which
        raises CacheMiss instead. An item that fails raises its error (the first one, by index).
        A spec repeated in `specs` is asked for once and its entries share their views."""
        proc = self._process()
        want_torch = self.tensors == "torch" or (self.tensors == "auto" and HAVE_TORCH)
        out: list[Entry | None] = [None] * len(specs)
        wanted: dict[Spec, list[int]] = {}
        self._follow_restart(proc)
        with proc.lock:
            proc.reap()
            for i, spec in enumerate(specs):
                lease = proc.lookup((encoder, spec))
                if lease is None:
                    wanted.setdefault(spec, []).append(i)
                else:
                    out[i] = Entry(lease.key.hex(), spec, lease.views(proc.dead, want_torch))
            release = proc.take_due()
        if wanted:
            try:
                self._fetch(proc, encoder, wanted, compute, release, out, want_torch)
            except LimitExceeded:  # this process's lease cap: give the idle leases back, try again
                with proc.lock:
                    proc.reap()
                    release = proc.take_idle()
                if not release:
                    raise
                left = {s: ix for s, ix in wanted.items() if out[ix[0]] is None}
                self._fetch(proc, encoder, left, compute, release, out, want_torch)
        elif release:
            self._release(proc, release)
        return out  # type: ignore[return-value]

    def _release(self, proc: ProcessState, ids: list[int]) -> None:
        self._call(proc, "Release", pb.ReleaseRequest(leases=pack_leases(ids)))

    def _fetch(self, proc: ProcessState, encoder: str, wanted: dict[Spec, list[int]], compute: bool,
               release: list[int], out: list[Entry | None], want_torch: bool) -> None:
        specs = list(wanted)
        request = pb.GetRequest(encoder=encoder, specs=encode_specs(specs), compute=compute,
                                release=pack_leases(release))
        # before the call: a rewrite after it is caught by the next lookup
        stamps = [source_stamp(s.path) if isinstance(s, ImageSpec) else None for s in specs]
        reply = self._call(proc, "Get", request)
        failed = {e.index: e for e in reply.errors}
        records = unpack_handles(reply.handles, len(specs), failed, reply.segments, reply.layouts)
        with proc.lock:
            try:
                _attach(proc, reply)
            except CacheError:  # granted, but this process can't use them: back with the next call
                proc.due.extend(lease_id for _, lease_id, *_ in records if lease_id)
                raise
            for j, spec in enumerate(specs):
                if j in failed:
                    continue
                key, lease_id, _, offset, length, segment, layout = records[j]
                key = key.ljust(32, b"\0")  # numpy's S32 drops trailing zero bytes
                lease = proc.adopt_lease((encoder, spec), stamps[j], Lease(
                    key, lease_id, proc.segments[reply.segments[segment]], offset, length,
                    proc.layouts[layout], reply.instance))
                if failed:  # this call raises: nobody will see these views, so the lease is idle now
                    if not lease.alive():
                        proc.idle[lease.lease_id] = lease
                    continue
                for i in wanted[spec]:
                    out[i] = Entry(lease.key.hex(), spec, lease.views(proc.dead, want_torch))
        if failed:
            first = failed[min(failed)]
            raise error_for(first.code, f"item {wanted[specs[first.index]][0]}: {first.message}", first.error)

    def warm(self, specs: Sequence[Spec], encoder: str,
             progress: Callable[[pb.WarmProgress], None] | None = None) -> WarmResult:
        """Computes entries without holding them; `progress` sees each streamed update."""
        proc = self._process()
        failed: list[tuple[int, Spec, CacheError]] = []
        last = pb.WarmProgress(total=len(specs))
        stream = proc.stub.Warm(pb.WarmRequest(encoder=encoder, specs=encode_specs(list(specs))),
                                timeout=self.timeout, metadata=self._credentials())
        try:
            for last in stream:
                for e in last.errors:
                    if e.index >= len(specs):
                        raise ProtocolError(f"Warm reply has an error for item {e.index} of {len(specs)}")
                    failed.append((e.index, specs[e.index], error_for(e.code, e.message, e.error)))
                if progress is not None:
                    progress(last)
        except grpc.RpcError as exc:
            raise _mapped(exc, self.target) from exc
        finally:
            stream.cancel()  # stops the daemon's work if the caller was interrupted
        return WarmResult(len(specs), last.computed, last.cached, failed)

    def prefetch(self, specs: Sequence[Spec], encoder: str) -> None:
        """A non-blocking hint: the daemon computes (or promotes) these entries in the background, so a
        later get finds them. Returns at once; errors (a daemon that is down, a bad spec) are ignored."""
        if not specs:
            return
        proc = self._process()
        request = pb.WarmRequest(encoder=encoder, specs=encode_specs(list(specs)))
        try:
            metadata = self._credentials()
        except CacheError:
            return
        with proc.lock:
            while proc.hints and proc.hints[0].done():
                proc.hints.popleft()
            forksafe.begin()  # ended when the call completes, however it ends
            hint = proc.stub.Prefetch.future(request, timeout=30, metadata=metadata)
            hint.add_done_callback(lambda _: forksafe.end())
            proc.hints.append(hint)

    def evict(self, *, all: bool = False, encoder: str | None = None, source_prefix: str | None = None,
              keys: Iterable[str] = (), tier: str = "all") -> dict[str, int]:
        """Drops entries from the cache. Entries still held by a client are freed when released."""
        prefix = os.path.abspath(source_prefix) if source_prefix else ""
        reply = self._call(self._process(), "Evict", _message(
            pb.EvictRequest, all=all, encoder=encoder or "", source_prefix=prefix, keys=list(keys), tier=tier))
        return {"entries": reply.entries, "bytes": reply.bytes, "pending": reply.pending,
                "disk_entries": reply.disk_entries, "disk_bytes": reply.disk_bytes}

    def ls(self, *, tier: str = "all", encoder: str | None = None, source_prefix: str | None = None,
           limit: int = 0) -> tuple[list[dict[str, Any]], int]:
        """(entries, total matching) of both tiers, least recently used first."""
        prefix = os.path.abspath(source_prefix) if source_prefix else ""
        r = self._call(self._process(), "List", _message(pb.ListRequest, tier=tier, encoder=encoder or "",
                                                         source_prefix=prefix, limit=limit))
        rows = [{"key": e.key, "tier": e.tier, "bytes": e.bytes, "encoder": e.encoder, "source": e.source,
                 "spec": e.spec, "leases": e.leases} for e in r.entries]
        return rows, r.total

    def import_cache(self, format: str, path: str, encoder: str, *, size: tuple[int, int] | None = None,
                     image_root: str | None = None, arch: str | None = None, crop: str = "center",
                     progress: Callable[[pb.ImportProgress], None] | None = None) -> dict[str, Any]:
        """Imports another trainer's cache (read by the daemon): {"seen", "imported", "already",
        "skipped": {reason: n}, "examples": [...]}."""
        request = _message(pb.ImportRequest, format=format, path=os.path.abspath(path), encoder=encoder,
                           width=size[0] if size else 0, height=size[1] if size else 0,
                           image_root=os.path.abspath(image_root) if image_root else "",
                           arch=arch or "", crop=crop)
        stream = self._process().stub.Import(request, timeout=self.timeout, metadata=self._credentials())
        examples: list[str] = []
        last = pb.ImportProgress()
        try:
            for last in stream:
                examples += last.examples
                if progress is not None:
                    progress(last)
        except grpc.RpcError as exc:
            raise _mapped(exc, self.target) from exc
        finally:
            stream.cancel()
        return {"seen": last.seen, "imported": last.imported, "already": last.already,
                "skipped": dict(last.skipped), "examples": examples}

    def stats(self) -> dict[str, Any]:
        """Counters and tier sizes, as `cachectl stats --json` prints them."""
        r = self._call(self._process(), "Stats", pb.StatsRequest())
        return {
            "instance": r.instance, "uptime_s": round(r.uptime_s, 3),
            "tiers": {name: {"entries": t.entries, "bytes": t.bytes, "capacity_bytes": t.capacity_bytes}
                      for name, t in r.tiers.items()},
            **dict(r.counters), "leases": r.leases,
            "encoders": {name: {"kind": e.kind, "devices": list(e.devices), "items": e.items,
                                "batches": e.batches, "max_batch_seen": e.max_batch_seen,
                                "busy_s": round(e.busy_s, 3), "fingerprint": e.fingerprint}
                         for name, e in r.encoders.items()},
        }

    def health(self, timeout: float = 2.0) -> str:
        """The daemon's grpc.health.v1 status ("SERVING", "NOT_SERVING", ...); DaemonUnavailable if
        unreachable. Spoken in raw bytes, so the client needs no grpcio-health-checking."""
        check = self._process().channel.unary_unary("/grpc.health.v1.Health/Check")
        service = b"cached.v1.Cache"
        try:
            with forksafe.call():
                reply = check(b"\x0a" + bytes([len(service)]) + service, timeout=timeout)
        except grpc.RpcError as exc:
            raise _mapped(exc, self.target) from exc
        status = reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0  # field 1, varint
        return _HEALTH.get(status, "UNKNOWN")

    def close(self) -> None:
        """Gives back the leases whose views are gone. Leases of views still alive stay held (by
        this process's session) until they die or the process exits."""
        proc = process_state(self.target)
        if proc is None:
            return
        with proc.lock:
            proc.reap()
            release = proc.take_idle()
        if release:
            try:
                self._release(proc, release)
            except CacheError:
                pass  # the daemon gives them back when this process is gone

    # transport

    def _credentials(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: this process's session token on a unix socket (the handshake on first use),
        the bearer token over TCP."""
        path = socket_path(self.target)
        if path is not None:
            return process_session(path, timeout=max(self.connect_timeout, 1.0)).metadata
        token = self.token
        if token is None and os.environ.get("CACHED_TOKEN_FILE"):
            path = os.environ["CACHED_TOKEN_FILE"]
            try:
                with open(path) as f:
                    token = self.token = f.read().strip()
            except OSError as exc:
                raise Unauthenticated(f"CACHED_TOKEN_FILE {path}: {exc.strerror or exc}") from None
        return (("authorization", f"Bearer {token}"),) if token else ()

    def _call(self, proc: ProcessState, method: str, request: Any) -> Any:
        """Calls with retries while the daemon is unreachable or busy, for up to connect_timeout
        seconds; a session the daemon does not know (it restarted) is opened again once."""
        deadline = time.monotonic() + self.connect_timeout
        delay, renewed = 0.05, False
        while True:
            try:
                metadata = self._credentials()
                with forksafe.call():
                    return getattr(proc.stub, method)(request, timeout=self.timeout, metadata=metadata)
            except DaemonUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAUTHENTICATED and not renewed and self._renew_session(metadata):
                    renewed = True
                    continue
                if not _retryable(exc) or time.monotonic() + delay > deadline:
                    raise _mapped(exc, self.target) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _follow_restart(self, proc: ProcessState) -> None:
        """When the daemon that issued this process's session is gone (the identity connection
        closed), its handles are dropped: they would be served from a dead daemon's memory."""
        path = socket_path(self.target)
        session = current_session(path) if path is not None else None
        if session is not None and not session.alive():
            forget_session(path, session.token)  # type: ignore[arg-type]
            with proc.lock:
                proc.adopt("", "")

    def _renew_session(self, metadata: tuple[tuple[str, str], ...]) -> bool:
        """Forgets the session a refused call carried (the daemon restarted and does not know it);
        True when the call carried one."""
        path = socket_path(self.target)
        if path is None or not metadata:
            return False
        forget_session(path, metadata[0][1])
        return True


def _attach(proc: ProcessState, reply: pb.GetResponse) -> None:
    """Follows the reply's daemon and maps the segments and tensor tables it names; a CacheError when
    this process can't (views.shm_error says why)."""
    try:
        proc.adopt(reply.instance, reply.control)
    except OSError as exc:  # its control page
        raise shm_error(reply.control, exc) from exc
    for path in reply.segments.values():
        if path not in proc.segments:
            proc.segments[path] = Segment(path)
    for lid, text in reply.layouts.items():
        proc.layouts.setdefault(lid, decode_layout(text))


def _message(cls: Callable[..., Any], **fields: Any) -> Any:
    """A request message; InvalidSpec when an argument does not fit its field (limit=-1, a size
    past uint32, keys that are not strings)."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as exc:
        raise InvalidSpec(f"{cls.__name__}: {exc} (in {_short(fields)})") from None


def _short(fields: dict[str, Any]) -> str:
    text = repr(fields)
    return text if len(text) <= 200 else text[:200] + "..."


def _retryable(exc: grpc.RpcError) -> bool:
    """Unreachable, or busy: too many calls in flight (ours, or gRPC's own bound, which names none)."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    name = dict(exc.trailing_metadata() or ()).get(ERROR_METADATA, "") if hasattr(exc, "trailing_metadata") else ""
    return name in ("", "Busy")


def _mapped(exc: grpc.RpcError, target: str = "") -> CacheError:
    """The CacheError of a failed call: the daemon's class when its trailing metadata names one, else
    the status code's (errors.py); DaemonError for an RpcError that carries no status code."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    if not isinstance(code, grpc.StatusCode):
        return DaemonError(f"call to {target or 'the daemon'} failed without a status code: {exc!r}")
    name = dict(exc.trailing_metadata() or ()).get(ERROR_METADATA, "") if hasattr(exc, "trailing_metadata") else ""
    if code == grpc.StatusCode.UNAVAILABLE and not name:
        return DaemonUnavailable(f"no cached daemon answering at {target or 'its address'}: {exc.details()}")
    return error_for(code.name, exc.details() or "", name)
