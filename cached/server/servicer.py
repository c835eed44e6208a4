"""The gRPC servicer: each method decodes the request, calls one domain object, encodes the reply."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from cached_client._proto import cache_pb2 as pb
from cached_client._proto import cache_pb2_grpc
from cached_client.errors import DaemonUnavailable, InvalidSpec

from ..engine import Engine
from ..engine.importing import import_cache
from ..engine.selection import Selection
from . import codec

__all__ = ["CacheServicer"]


class CacheServicer(cache_pb2_grpc.CacheServicer):
    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.engine: Engine | None = None  # set once encoders are loaded and the store is mapped
        self.started = time.monotonic()

    def _ready(self) -> Engine:
        if self.engine is None:
            raise DaemonUnavailable("daemon is starting: encoders are still loading")
        return self.engine

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetResponse:
        engine = self._ready()
        results = engine.get(request.encoder, request.specs, request.compute, codec.owner_of(request.owner),
                             codec.lease_ids(request.release))
        return codec.get_response(self.instance, engine.store, results)

    def Warm(self, request: pb.WarmRequest, context: grpc.ServicerContext) -> Iterator[pb.WarmProgress]:
        for progress in self._ready().warm(request.encoder, request.specs):
            if not context.is_active():  # the client cancelled: stop queueing more work
                return
            yield codec.warm_progress(progress)

    def Prefetch(self, request: pb.WarmRequest, context: grpc.ServicerContext) -> pb.PrefetchResponse:
        queued, dropped = self._ready().prefetch(request.encoder, request.specs)
        return pb.PrefetchResponse(queued=queued, dropped=dropped)

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        owner = codec.owner_of(request.owner)
        if owner is None:
            raise InvalidSpec("Release needs an owner")
        return pb.ReleaseResponse(released=self._ready().release(owner, codec.lease_ids(request.leases)))

    def Evict(self, request: pb.EvictRequest, context: grpc.ServicerContext) -> pb.EvictResponse:
        selection = Selection.of(request.all, request.encoder, request.source_prefix, request.keys)
        return pb.EvictResponse(**self._ready().evict(selection, request.tier))

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        everything = not (request.encoder or request.source_prefix)
        selection = Selection.of(everything, request.encoder, request.source_prefix)
        return codec.list_response(self._ready().list_entries(selection, request.tier), request.limit)

    def Import(self, request: pb.ImportRequest, context: grpc.ServicerContext) -> Iterator[pb.ImportProgress]:
        size = (request.width, request.height) if request.width and request.height else None
        for progress in import_cache(self._ready(), request.encoder, request.format, request.path, size,
                                     request.image_root or None, request.arch or None, request.crop):
            if not context.is_active():
                return
            yield codec.import_progress(progress)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        return codec.stats_response(self.instance, time.monotonic() - self.started, self._ready().stats())
