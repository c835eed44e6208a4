"""The gRPC servicer: each method decodes the request, calls one domain object, encodes the reply."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cached_client._proto import cache_pb2 as pb
from cached_client._proto import cache_pb2_grpc
from cached_client.errors import DaemonUnavailable, InvalidSpec
from cached_client.wire import unpack_leases

from ..engine import Engine, Prefetcher
from ..engine.importing import import_cache
from . import codec

__all__ = ["CacheServicer"]

TIERS = ("", "all", "shm", "disk")


class CacheServicer(cache_pb2_grpc.CacheServicer):
    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.engine: Engine | None = None  # set once encoders are loaded and the store is mapped
        self.prefetcher: Prefetcher | None = None
        self.started = time.monotonic()

    def _ready(self) -> Engine:
        if self.engine is None:
            raise DaemonUnavailable("daemon is starting: encoders are still loading")
        return self.engine

    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> pb.GetResponse:
        engine = self._ready()
        owner = codec.owner_of(request.owner)
        if request.release and owner is not None:
            engine.store.release(owner, unpack_leases(request.release))
        results = engine.get(request.encoder, request.specs, request.compute, owner)
        return codec.get_response(self.instance, engine.store, results)

    def Warm(self, request: pb.WarmRequest, context: grpc.ServicerContext) -> Iterator[pb.WarmProgress]:
        for progress in self._ready().warm(request.encoder, request.specs):
            if not context.is_active():  # the client cancelled: stop queueing more work
                return
            yield codec.warm_progress(progress)

    def Prefetch(self, request: pb.WarmRequest, context: grpc.ServicerContext) -> pb.PrefetchResponse:
        self._ready()
        assert self.prefetcher is not None
        queued, dropped = self.prefetcher.submit(request.encoder, request.specs)
        return pb.PrefetchResponse(queued=queued, dropped=dropped)

    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext) -> pb.ReleaseResponse:
        owner = codec.owner_of(request.owner)
        if owner is None:
            raise InvalidSpec("Release needs an owner")
        return pb.ReleaseResponse(released=self._ready().store.release(owner, unpack_leases(request.leases)))

    def Evict(self, request: pb.EvictRequest, context: grpc.ServicerContext) -> pb.EvictResponse:
        _check_tier(request.tier)
        if not (request.all or request.encoder or request.source_prefix or request.keys):
            raise InvalidSpec("evict needs all, an encoder, a source prefix or keys")
        match = _matcher(request.all, request.encoder, request.source_prefix, request.keys)
        return pb.EvictResponse(**self._ready().tiers.evict(match, request.tier))

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        _check_tier(request.tier)
        everything = not (request.encoder or request.source_prefix)
        match = _matcher(everything, request.encoder, request.source_prefix, ())
        return codec.list_response(self._ready().tiers.list_entries(request.tier, match), request.limit)

    def Import(self, request: pb.ImportRequest, context: grpc.ServicerContext) -> Iterator[pb.ImportProgress]:
        size = (request.width, request.height) if request.width and request.height else None
        for progress in import_cache(self._ready(), request.encoder, request.format, request.path, size,
                                     request.image_root or None, request.arch or None, request.crop):
            if not context.is_active():
                return
            yield codec.import_progress(progress)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsResponse:
        engine = self._ready()
        encoders = {
            name: {**enc.describe(), "items": b.items, "batches": b.batches,
                   "max_batch_seen": b.max_batch_seen, "busy_s": b.busy_s}
            for name, enc in engine.encoders.items() if (b := engine.batchers[name])}
        counters = {**engine.counters, **engine.tiers.counter_values()}
        if self.prefetcher is not None:
            counters.update(prefetch_queued=self.prefetcher.queued, prefetch_dropped=self.prefetcher.dropped)
        return codec.stats_response(self.instance, time.monotonic() - self.started, engine.tiers,
                                    counters, encoders)


def _check_tier(tier: str) -> None:
    if tier not in TIERS:
        raise InvalidSpec(f"tier must be one of shm, disk, all; got {tier!r}")


def _matcher(everything: bool, encoder: str, source_prefix: str, keys: Any) -> Callable[[Any], bool]:
    """A predicate over store entries (shm or disk: both have .key and .meta)."""
    try:
        wanted = {bytes.fromhex(k) for k in keys}
    except ValueError:
        raise InvalidSpec(f"keys must be hex digests, got {list(keys)[:3]!r}") from None

    def match(entry: Any) -> bool:
        return bool(everything
                    or (encoder and entry.meta.get("encoder") == encoder)
                    or (source_prefix and entry.meta.get("source", "").startswith(source_prefix))
                    or entry.key in wanted)

    return match
