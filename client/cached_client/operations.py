"""CacheClient's operator calls: warm, prefetch, evict, ls, import_cache, stats, health, and the
reports of clients, inspect and diagnose.

What `cachectl` and a trainer's setup use to manage the cache, as opposed to reading entries (the
data path, client.py). None of them holds a lease; each is one call to the daemon (streamed for warm
and import_cache), mapped to the client's errors by transport.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from . import forksafe
from ._proto import cache_pb2 as pb
from .errors import CacheError, ProtocolError, error_for
from .specs import Spec, encode_specs, is_object_url
from .transport import Transport, _mapped, _message
from .wire import check_handles, pack_leases

if TYPE_CHECKING:
    from .handles import ProcessState

__all__ = ["OperationsMixin", "WarmResult"]

_HEALTH = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
PROMOTE_BATCH = 256  # items per Get of warm(compute=False): within limits.max_items and a lease cap


@dataclass
class WarmResult:
    total: int
    computed: int
    cached: int
    failed: list[tuple[int, Spec, CacheError]]


class OperationsMixin(Transport):
    """The operator calls of CacheClient, which supplies `_process` (this process's channel)."""

    if TYPE_CHECKING:
        def _process(self) -> ProcessState: ...

    def warm(self, specs: Sequence[Spec], encoder: str,
             progress: Callable[[pb.WarmProgress], None] | None = None, compute: bool = True) -> WarmResult:
        """Computes entries without holding them; `progress` sees each streamed update.

        compute=False encodes nothing: entries found only on disk or in the remote tier are
        promoted into shared memory (a second node taking over what others computed), and the
        items no tier has fail with CacheMiss. The Warm RPC always computes, so this is Gets
        without compute whose leases are given back at once."""
        if not compute:
            return self._promote(specs, encoder, progress)
        proc = self._process()
        request = pb.WarmRequest(encoder=encoder, specs=encode_specs(list(specs)))

        def attempt(metadata: tuple[tuple[str, str], ...]) -> WarmResult:
            # before the first update nothing was done, so the call may be made again (_retried)
            failed: list[tuple[int, Spec, CacheError]] = []
            last, started = pb.WarmProgress(total=len(specs)), False
            stream = proc.stub.Warm(request, timeout=self.timeout, metadata=metadata)
            try:
                for last in stream:
                    started = True
                    for e in last.errors:
                        if e.index >= len(specs):
                            raise ProtocolError(f"Warm reply has an error for item {e.index} of {len(specs)}")
                        failed.append((e.index, specs[e.index], error_for(e.code, e.message, e.error)))
                    if progress is not None:
                        progress(last)
            except grpc.RpcError as exc:
                if started:
                    raise _mapped(exc, self.target) from exc
                raise
            finally:
                stream.cancel()  # stops the daemon's work if the caller was interrupted
            return WarmResult(len(specs), last.computed, last.cached, failed)

        return self._retried(attempt)  # type: ignore[no-any-return]

    def _promote(self, specs: Sequence[Spec], encoder: str,
                 progress: Callable[[pb.WarmProgress], None] | None) -> WarmResult:
        """warm(compute=False), PROMOTE_BATCH items per Get; each Get gives back the previous one's
        leases, so at most one batch is held, and items over this process's lease cap are asked for
        again in the next Get. Nothing is mapped: only the leases are looked at."""
        proc = self._process()
        failed: list[tuple[int, Spec, CacheError]] = []
        pending, held = list(range(len(specs))), b""
        try:
            while pending:
                batch, pending = pending[:PROMOTE_BATCH], pending[PROMOTE_BATCH:]
                reply = self._call(proc, "Get", pb.GetRequest(
                    encoder=encoder, specs=encode_specs([specs[i] for i in batch]), compute=False, release=held))
                errors = {e.index: e for e in reply.errors}
                records = check_handles(reply.handles, len(batch), errors, reply.segments, reply.layouts)
                held = pack_leases([int(x) for x in records["lease"] if x])
                capped = [j for j, e in errors.items() if e.error == "LimitExceeded"]
                if held and capped:  # the cap counts this batch's leases: again once they are given back
                    pending = [batch[j] for j in sorted(capped)] + pending
                    errors = {j: e for j, e in errors.items() if e.error != "LimitExceeded"}
                new = [(batch[j], specs[batch[j]], error_for(e.code, e.message, e.error)) for j, e in sorted(errors.items())]
                failed.extend(new)
                if progress is not None:
                    done = len(specs) - len(pending)
                    progress(pb.WarmProgress(done=done, total=len(specs), cached=done - len(failed), errors=[
                        pb.ItemError(index=i, error=type(e).__name__, message=str(e)) for i, _, e in new]))
        finally:
            if held:
                try:
                    self._call(proc, "Release", pb.ReleaseRequest(leases=held))
                except CacheError:
                    pass  # the daemon gives them back when this process's session ends
        failed.sort(key=lambda f: f[0])
        return WarmResult(len(specs), 0, len(specs) - len(failed), failed)

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
        prefix = _source_prefix(source_prefix)
        reply = self._call(self._process(), "Evict", _message(
            pb.EvictRequest, all=all, encoder=encoder or "", source_prefix=prefix, keys=list(keys), tier=tier))
        return {"entries": reply.entries, "bytes": reply.bytes, "pending": reply.pending,
                "disk_entries": reply.disk_entries, "disk_bytes": reply.disk_bytes,
                "remote_entries": reply.remote_entries, "remote_bytes": reply.remote_bytes}

    def ls(self, *, tier: str = "all", encoder: str | None = None, source_prefix: str | None = None,
           limit: int = 0) -> tuple[list[dict[str, Any]], int]:
        """(entries, total matching) of both tiers, least recently used first."""
        prefix = _source_prefix(source_prefix)
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
            "tiers": {name: {"entries": t.entries, "bytes": t.bytes, "capacity_bytes": t.capacity_bytes,
                             "backend": t.backend, "held_bytes": t.held_bytes}
                      for name, t in r.tiers.items()},
            **dict(r.counters), "leases": r.leases,
            "encoders": {name: {"kind": e.kind, "input": e.input, "devices": list(e.devices), "items": e.items,
                                "batches": e.batches, "max_batch_seen": e.max_batch_seen,
                                "busy_s": round(e.busy_s, 3), "fingerprint": e.fingerprint, "queued": e.queued,
                                "max_batch": e.max_batch, "fit_limit": e.fit_limit,
                                "parameter_bytes": dict(e.parameter_bytes)}
                         for name, e in r.encoders.items()},
        }

    def clients(self) -> dict[str, Any]:
        """Every connected client process: {"clients": [{"session", "pid", "uid", "leases",
        "leased_bytes", "items", "hits", "misses", "age_s"}], "caller": this process's session}."""
        return _plain(self._call(self._process(), "Clients", pb.ClientsRequest()))

    def inspect(self, key: str) -> dict[str, Any]:
        """The entry whose key is `key` or starts with it: {"key", "tiers", "bytes" (per tier),
        "encoder", "source", "spec", "tensors": [{"name", "dtype", "shape", "bytes"}], "leases",
        "meta"}. CacheMiss when no entry matches, InvalidSpec when several do."""
        return _plain(self._call(self._process(), "Inspect", _message(pb.InspectRequest, key=key)))

    def diagnose(self) -> dict[str, Any]:
        """The daemon's process and host: memory, descriptors, mappings, its shm directory and
        segments (the fields of DiagnoseResponse in cache.proto)."""
        return _plain(self._call(self._process(), "Diagnose", pb.DiagnoseRequest()))

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


def _plain(message: Any) -> dict[str, Any]:
    """A reply as plain dicts, lists and scalars (json_format would turn uint64s into strings)."""
    out: dict[str, Any] = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = dict(value)
        elif f.is_repeated:
            out[f.name] = [_plain(v) for v in value] if f.message_type is not None else list(value)
        else:
            out[f.name] = _plain(value) if f.message_type is not None else value
    return out


def _source_prefix(prefix: str | None) -> str:
    """A source prefix as the daemon records sources: absolute, or an s3:// URL as written."""
    if not prefix:
        return ""
    return prefix if is_object_url(prefix) else os.path.abspath(prefix)
