"""Prometheus metrics at http://<server.metrics>/metrics (off unless configured).

Names follow Prometheus conventions (`cached_` prefix, base units, `_total` for counters). Counters
and gauges are read from the engine, the tiers and the sessions when a scrape comes (no cost on the
hot path); histograms are observed as events happen. No label is ever a key or a path: clients are
labelled by pid and uid (a live session each; a client's series go with it), encoders by their
configured name, tiers by "shm" / "disk" / "remote", requests by RPC method.

    cached_hits_total{tier}                    items served from that tier
    cached_misses_total                        items found in no tier (then computed, or CacheMiss)
    cached_item_errors_total                   items that failed
    cached_computed_total                      entries encoded
    cached_evictions_total{tier,reason}        reason: "capacity" (room for new entries) or "evict"
    cached_tier_entries / _bytes / _capacity_bytes {tier}   shm and disk (the remote tier's size is
                                               known only by listing the bucket)
    cached_remote_misses_total                 remote lookups that found nothing usable
    cached_remote_corrupt_total                damaged or truncated objects found (and deleted)
    cached_remote_skipped_total                lookups skipped while the store was failing
    cached_remote_received_bytes_total, cached_remote_sent_bytes_total
    cached_remote_uploads_total{result}        stored, raced (another node stored it), dropped, failed
    cached_remote_upload_retries_total
    cached_remote_upload_queue, cached_remote_upload_queue_bytes   uploads queued or in flight
    cached_remote_errors_total{kind}           store faults: timeout, connection, 5xx, throttled, ...
    cached_disk_write_errors_total, cached_disk_corrupt_total
    cached_leases, cached_client_leases{pid,uid}, cached_client_leased_bytes{pid,uid}
    cached_client_items_total{pid,uid}         items a client asked for: rate() is its data loading
    cached_client_hits_total{pid,uid}
    cached_encoder_queue{encoder}              jobs queued or being decoded for the encoder
    cached_encode_batch_size{encoder}          histogram: items per encoder call
    cached_encode_seconds{encoder}             histogram: seconds per encoder call
    cached_encode_queue_seconds{encoder}       histogram: how long an item waited for its batch
    cached_request_seconds{method}             histogram: seconds per RPC
    cached_decoded_bytes_in_flight, cached_key_memo_bytes
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..engine import Engine
    from .sessions import SessionServer

__all__ = ["Metrics", "MetricsInterceptor"]

log = logging.getLogger(__name__)

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The daemon's registry. `engine` and `sessions` are looked up at scrape time (the engine is
    set once the daemon has loaded)."""

    def __init__(self, engine: Callable[[], Engine | None], sessions: Callable[[], SessionServer | None]) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram("cached_request_seconds", "Seconds per RPC, by method.", ["method"],
                                         registry=self.registry, buckets=_SECONDS)
        self.batch_size = Histogram("cached_encode_batch_size", "Items per encoder call.", ["encoder"],
                                    registry=self.registry, buckets=_SIZES)
        self.encode_seconds = Histogram("cached_encode_seconds", "Seconds per encoder call.", ["encoder"],
                                        registry=self.registry, buckets=_SECONDS)
        self.queue_seconds = Histogram("cached_encode_queue_seconds", "Seconds an item waited for its batch.",
                                       ["encoder"], registry=self.registry, buckets=_SECONDS)
        self.registry.register(_State(engine, sessions))
        self._server: Any = None

    def observer(self, encoder: str) -> Callable[[int, float, list[float]], None]:
        """What a batcher calls after each encoder call."""
        size, seconds, queue = (h.labels(encoder) for h in (self.batch_size, self.encode_seconds, self.queue_seconds))

        def observe(n: int, elapsed: float, waits: list[float]) -> None:
            size.observe(n)
            seconds.observe(elapsed)
            for w in waits:
                queue.observe(w)
        return observe

    def serve(self, address: str) -> None:
        """Serves /metrics on HOST:PORT in a thread of its own."""
        host, _, port = address.rpartition(":")
        self._server, _ = start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)
        log.info("metrics on http://%s/metrics", address)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _State(Collector):
    """Everything read from the daemon's state when a scrape comes."""

    def __init__(self, engine: Callable[[], Engine | None], sessions: Callable[[], SessionServer | None]) -> None:
        self.engine, self.sessions = engine, sessions

    def collect(self) -> Iterator[Any]:
        engine = self.engine()
        if engine is None:
            return
        stats = engine.stats()
        yield from _counters(stats["counters"])
        yield from _tiers(stats["tiers"])
        yield from _clients(engine, self.sessions())
        queue = GaugeMetricFamily("cached_encoder_queue", "Jobs queued or being decoded, by encoder.", labels=["encoder"])
        for name, batcher in engine.batchers.items():
            queue.add_metric([name], batcher.queued())
        yield queue
        c = stats["counters"]
        yield GaugeMetricFamily("cached_leases", "Leases held by all clients.", value=stats["leases"])
        yield GaugeMetricFamily("cached_decoded_bytes_in_flight", "Decoded images and encoder inputs in memory.",
                                value=c.get("decoded_bytes_in_flight", 0))
        yield GaugeMetricFamily("cached_key_memo_bytes", "Bytes of the spec-line to key memo.",
                                value=c.get("key_memo_bytes", 0))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _counters(c: dict[str, int]) -> Iterator[Any]:
    hits = CounterMetricFamily("cached_hits", "Items served from a tier.", labels=["tier"])
    for tier in ("shm", "disk", "remote"):
        if f"{tier}_hits" in c:
            hits.add_metric([tier], c[f"{tier}_hits"])
    yield hits
    yield _counter("cached_misses", "Items found in no tier.", c.get("misses", 0))
    yield _counter("cached_item_errors", "Items that failed.", c.get("errors", 0))
    yield _counter("cached_computed", "Entries encoded.", c.get("computed", 0))
    evictions = CounterMetricFamily("cached_evictions", "Entries evicted, by tier and reason.", labels=["tier", "reason"])
    explicit = c.get("evictions_explicit", 0)
    evictions.add_metric(["shm", "capacity"], c.get("evictions", 0) - explicit)
    evictions.add_metric(["shm", "evict"], explicit)
    if "disk_evictions" in c:
        evictions.add_metric(["disk", "capacity"], c["disk_evictions"])
    yield evictions
    yield _counter("cached_disk_write_errors", "Entries that could not be written to disk.", c.get("disk_write_errors", 0))
    yield _counter("cached_disk_corrupt", "Damaged disk entries found and removed.", c.get("disk_corrupt", 0))
    if "remote_misses" in c:
        yield from _remote(c)


def _remote(c: dict[str, int]) -> Iterator[Any]:
    yield _counter("cached_remote_misses", "Remote lookups that found nothing usable.", c["remote_misses"])
    yield _counter("cached_remote_corrupt", "Damaged or truncated remote objects found and deleted.",
                   c.get("remote_corrupt", 0))
    yield _counter("cached_remote_skipped", "Remote lookups skipped while the store was failing.",
                   c.get("remote_gets_skipped", 0))
    yield _counter("cached_remote_received_bytes", "Bytes downloaded from the remote tier.", c.get("remote_bytes_in", 0))
    yield _counter("cached_remote_sent_bytes", "Bytes uploaded to the remote tier.", c.get("remote_bytes_out", 0))
    uploads = CounterMetricFamily("cached_remote_uploads", "Uploads to the remote tier, by result.", labels=["result"])
    for result, key in (("stored", "remote_uploads"), ("raced", "remote_uploads_raced"),
                        ("dropped", "remote_uploads_dropped"), ("failed", "remote_uploads_failed")):
        uploads.add_metric([result], c.get(key, 0))
    yield uploads
    yield _counter("cached_remote_upload_retries", "Upload attempts retried after a fault.",
                   c.get("remote_uploads_retried", 0))
    yield GaugeMetricFamily("cached_remote_upload_queue", "Uploads queued or in flight.",
                            value=c.get("remote_upload_queue_depth", 0))
    yield GaugeMetricFamily("cached_remote_upload_queue_bytes", "Bytes of the uploads queued or in flight.",
                            value=c.get("remote_upload_queue_bytes", 0))
    errors = CounterMetricFamily("cached_remote_errors", "Remote store faults, by kind.", labels=["kind"])
    for key, n in sorted(c.items()):
        if key.startswith("remote_errors_"):
            errors.add_metric([key.removeprefix("remote_errors_")], n)
    yield errors


def _tiers(tiers: dict[str, dict[str, int]]) -> Iterator[Any]:
    for field, doc in (("entries", "Entries"), ("bytes", "Bytes held"), ("capacity_bytes", "Capacity in bytes")):
        name = f"cached_tier_{field}"
        g = GaugeMetricFamily(name, f"{doc}, by tier.", labels=["tier"])
        for tier, t in tiers.items():
            if tier != "remote":  # its entries and bytes are not counted (0): a gauge would say empty
                g.add_metric([tier], t[field])
        yield g


def _clients(engine: Engine, sessions: SessionServer | None) -> Iterator[Any]:
    leases = GaugeMetricFamily("cached_client_leases", "Leases a client process holds.", labels=["pid", "uid"])
    leased = GaugeMetricFamily("cached_client_leased_bytes", "Bytes a client process holds leased.", labels=["pid", "uid"])
    items = CounterMetricFamily("cached_client_items", "Items a client process asked for.", labels=["pid", "uid"])
    hits = CounterMetricFamily("cached_client_hits", "Items a client process was served from a tier.",
                               labels=["pid", "uid"])
    owners = engine.store.owners()
    served = engine.client_counters()
    for caller in sessions.callers() if sessions is not None else []:
        label = [str(caller.pid), str(caller.uid)]
        n, nbytes = owners.get(caller.session, (0, 0))
        leases.add_metric(label, n)
        leased.add_metric(label, nbytes)
        asked, hit, _ = served.get(caller.session, (0, 0, 0))
        items.add_metric(label, asked)
        hits.add_metric(label, hit)
    yield from (leases, leased, items, hits)


class MetricsInterceptor(grpc.ServerInterceptor):
    """Times every RPC into cached_request_seconds{method}."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.request_streaming:
            return handler
        timer = self.metrics.request_seconds.labels(details.method.rsplit("/", 1)[-1])
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                t0 = time.perf_counter()
                try:
                    return inner(request, context)
                finally:
                    timer.observe(time.perf_counter() - t0)
            return handler._replace(unary_unary=unary)
        if handler.unary_stream:
            stream = handler.unary_stream

            def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                t0 = time.perf_counter()
                try:
                    yield from stream(request, context)
                finally:
                    timer.observe(time.perf_counter() - t0)
            return handler._replace(unary_stream=streaming)
        return handler
