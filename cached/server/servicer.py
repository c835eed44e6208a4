"""The gRPC servicer: each method decodes the request (and who sent it), calls one domain object,
encodes the reply."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import grpc

from cached_client._proto import cache_pb2 as pb
from cached_client._proto import cache_pb2_grpc
from cached_client.errors import Busy, DaemonUnavailable, PermissionDenied
from cached_client.specs import check_path

from ..engine import Engine, report
from ..engine.caller import Call, Caller
from ..engine.importing import import_cache
from ..engine.selection import Selection
from . import codec
from .auth import Authenticator

__all__ = ["CacheServicer"]


class CacheServicer(cache_pb2_grpc.CacheServicer):
    def __init__(self, instance: str, max_calls: int = 28) -> None:
        self.instance = instance
        self.engine: Engine | None = None  # set once encoders are loaded and the store is mapped
        self.auth: Authenticator | None = None  # set with the engine
        self.started = time.monotonic()
        self.max_calls = max_calls
        self._calls = threading.BoundedSemaphore(max_calls)

    def _ready(self, context: grpc.ServicerContext) -> tuple[Engine, Call]:
        engine, auth = self.engine, self.auth
        if engine is None or auth is None:
            raise DaemonUnavailable("daemon is starting: encoders are still loading")
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        return engine, Call(auth.caller(context), context.is_active, deadline)

    def _callers(self) -> list[Caller]:
        """Every connected client process (none without the unix socket's sessions)."""
        sessions = self.auth.sessions if self.auth is not None else None
        return sessions.callers() if sessions is not None else []

    def _leasing(self, context: grpc.ServicerContext) -> tuple[Engine, Call]:
        engine, call = self._ready(context)
        if not call.caller.may_lease:
            raise PermissionDenied("Get and Release need the unix socket: leases bind to a process the "
                                   "kernel vouches for, which TCP can't do")
        return engine, call

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """A slot among the calls that decode and encode; a full daemon says so instead of queueing
        (the handler threads left over answer hits of cached handles' releases, Stats, health)."""
        if not self._calls.acquire(blocking=False):
            raise Busy(f"daemon busy: {self.max_calls} calls in flight (limits.max_calls)")
        try:
            yield
        finally:
            self._calls.release()

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetResponse:
        engine, call = self._leasing(context)
        with self._admitted():
            results, stamps = engine.get(request.encoder, request.specs, request.compute, call,
                                         codec.lease_ids(request.release))
        return codec.get_response(self.instance, engine.store, results, stamps)

    def Warm(self, request: pb.WarmRequest, context: grpc.ServicerContext) -> Iterator[pb.WarmProgress]:
        engine, call = self._ready(context)
        with self._admitted():
            for progress in engine.warm(request.encoder, request.specs, call):
                if not context.is_active():  # the client cancelled: stop queueing more work
                    return
                yield codec.warm_progress(progress)

    def Prefetch(self, request: pb.WarmRequest, context: grpc.ServicerContext) -> pb.PrefetchResponse:
        engine, call = self._ready(context)
        with self._admitted():
            queued, dropped = engine.prefetch(request.encoder, request.specs, call)
        return pb.PrefetchResponse(queued=queued, dropped=dropped)

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        engine, call = self._leasing(context)
        return pb.ReleaseResponse(released=engine.release(call.caller.session, codec.lease_ids(request.leases)))

    def Evict(self, request: pb.EvictRequest, context: grpc.ServicerContext) -> pb.EvictResponse:
        selection = Selection.of(request.all, request.encoder, request.source_prefix, request.keys)
        engine, _ = self._ready(context)
        return pb.EvictResponse(**engine.evict(selection, request.tier))

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        everything = not (request.encoder or request.source_prefix)
        selection = Selection.of(everything, request.encoder, request.source_prefix)
        engine, _ = self._ready(context)
        return codec.list_response(engine.list_entries(selection, request.tier), request.limit)

    def Import(self, request: pb.ImportRequest, context: grpc.ServicerContext) -> Iterator[pb.ImportProgress]:
        size = (request.width, request.height) if request.width and request.height else None
        path, root = check_path(request.path), check_path(request.image_root) if request.image_root else None
        engine, call = self._ready(context)
        with self._admitted():
            for progress in import_cache(engine, request.encoder, request.format, path, size, root,
                                         request.arch or None, request.crop, call.caller):
                if not context.is_active():
                    return
                yield codec.import_progress(progress)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        engine, _ = self._ready(context)
        return codec.stats_response(self.instance, time.monotonic() - self.started, engine.stats())

    def Clients(self, request: pb.ClientsRequest, context: grpc.ServicerContext) -> pb.ClientsResponse:
        engine, call = self._ready(context)
        return codec.clients_response(report.clients(engine, self._callers()), call.caller.session)

    def Inspect(self, request: pb.InspectRequest, context: grpc.ServicerContext) -> pb.InspectResponse:
        engine, _ = self._ready(context)
        return codec.inspect_response(report.inspect(engine, request.key))

    def Diagnose(self, request: pb.DiagnoseRequest, context: grpc.ServicerContext) -> pb.DiagnoseResponse:
        engine, _ = self._ready(context)
        return codec.diagnose_response(report.process(engine))
