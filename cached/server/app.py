"""The daemon: a gRPC server on a unix socket (and TCP when configured) in front of the engine.

Start order: listen first and report NOT_SERVING, so health checks answer while encoders load; then
map the store, load the encoders, and report SERVING. Stop order: NOT_SERVING, drain in-flight calls,
close the engine, unlink the segments and the socket.
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cached_client._proto import cache_pb2_grpc
from cached_client.address import resolve_address, socket_path
from cached_client.errors import CacheError
from cached_client.session import identity_socket
from cached_client.units import parse_size

from ..encoders import Encoder, WeightDigests, build_encoder
from ..engine import EncoderOptions, Engine, Sources, Tiers
from ..engine.caller import Caller
from ..store import ShmStore
from ..store.disk import DiskTier
from ..store.names import new_instance_id
from ..store.remote import RemoteTier
from ..store.remoteclient import ObjectReader, S3Endpoint
from .auth import Authenticator, load_or_create_token
from .config import Config, encoder_options
from .interceptors import ErrorInterceptor
from .metrics import Metrics, MetricsInterceptor
from .notify import Liveness, Notifier, encoder_status
from .servicer import CacheServicer
from .sessions import SessionServer

__all__ = ["Daemon", "SERVICE_NAME"]

log = logging.getLogger(__name__)

SERVICE_NAME = "cached.v1.Cache"
MAX_MESSAGE = 256 << 20
CANCEL_BEFORE_S = 1.0  # before the shutdown grace ends, queued work is cancelled and its callers told


class Daemon:
    def __init__(self, config: Config, address: str | None = None, notifier: Notifier | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.instance = new_instance_id()
        self.target = resolve_address(address, config.socket or None)
        self.socket = socket_path(self.target)
        # a name, or a number (containers whose /etc/group lacks the host's group)
        self.group = (int(config.group) if config.group.isdigit() else grp.getgrnam(config.group).gr_gid) if config.group else None
        self.store: ShmStore | None = None
        self.tiers: Tiers | None = None
        self.engine: Engine | None = None
        self.digests: WeightDigests | None = None  # the weight-digest memo, beside the disk tier
        self.sessions: SessionServer | None = None
        self.health = health.HealthServicer()
        self.metrics = Metrics(lambda: self.engine, lambda: self.sessions) if config.metrics else None
        self.limits = config.engine_limits()
        self.servicer = CacheServicer(self.instance, self.limits.max_calls or max(1, config.workers - 4))
        self._stopping = threading.Event()
        self._server: grpc.Server | None = None

    def start(self) -> None:
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._listen()
        try:
            self._load()
        except BaseException:
            self.stop(grace=0)
            raise
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self.notifier.ready(f"serving on {self.target}", Liveness(self.target, self.engine))
        log.info("serving on %s (instance %s)", self.target, self.instance)

    def _listen(self) -> None:
        server = grpc.server(
            ThreadPoolExecutor(self.config.workers, thread_name_prefix="rpc"),
            interceptors=[*([MetricsInterceptor(self.metrics)] if self.metrics else []),
                          ErrorInterceptor(max_field_bytes=max(4096, self.limits.max_path_bytes))],
            options=[("grpc.max_send_message_length", MAX_MESSAGE),
                     ("grpc.max_receive_message_length", self.limits.max_request_bytes),
                     ("grpc.so_reuseport", 0)],
            maximum_concurrent_rpcs=4 * self.config.workers)  # past that, RESOURCE_EXHAUSTED, no queue
        cache_pb2_grpc.add_CacheServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.socket:
            self._prepare_socket(self.socket)
        server.add_insecure_port(self.target)
        if self.config.tcp:
            host = self.config.tcp.rsplit(":", 1)[0].strip("[]")
            if host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("listening on %s: reachable from other machines (calls need the token, "
                            "which travels in clear text: use a private network)", self.config.tcp)
            server.add_insecure_port(self.config.tcp)
        server.start()
        self._server = server
        if self.socket:
            os.chmod(self.socket, 0o660)
            if self.group is not None:
                os.chown(self.socket, -1, self.group)

    def _prepare_socket(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        if not os.path.exists(path):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left behind by a daemon that died
            return
        finally:
            probe.close()
        raise CacheError(f"another daemon is already listening on {path}")

    def _load(self) -> None:
        cfg = self.config
        capacity = cfg.shm_capacity()
        self.notifier.status("mapping shared memory")
        self.store = ShmStore(cfg.shm_dir, capacity, self.instance, self.group,
                              owner_cap=cfg.client_leased_bytes_of(capacity), backend=cfg.backend())
        disk_dir = cfg.disk_directory()
        disk = None
        if disk_dir:
            self.notifier.status(f"opening the disk tier {disk_dir}")
            disk = DiskTier.open_or_degrade(disk_dir, cfg.disk_capacity(), cfg.compression)
            log.info("disk tier: %s (%s, %s)", disk_dir, cfg.disk_bytes, cfg.compression)
        self.tiers = Tiers(self.store, disk, remote=self._open_remote())
        self.digests = WeightDigests(os.path.join(disk_dir, "weight-digests.json") if disk_dir else None)
        encoders, options = {}, {}
        for name, opts in cfg.encoders.items():
            encoders[name], options[name] = self.build_encoder(name, opts)
        if not encoders:
            log.warning("no encoders configured: every request will fail with UnknownEncoder")
        sources = Sources(cfg.allowed_roots, self.limits.max_source_bytes, cfg.check_caller_access,
                          self._object_reader())
        self.engine = Engine(self.tiers, encoders, sources, options, cfg.max_pixels, cfg.decode_workers or None,
                             self.limits)
        if not cfg.allowed_roots:
            log.warning("store.allowed_roots is empty: any file this daemon can read may be requested")
        if self.metrics is not None:
            for name, batcher in self.engine.batchers.items():
                batcher.on_batch = self.metrics.observer(name)
            self.metrics.serve(cfg.metrics)
        self.servicer.auth = Authenticator(self._start_sessions(self.store), self._tcp_token())
        self.servicer.engine = self.engine

    def build_encoder(self, name: str, table: dict[str, Any]) -> tuple[Encoder, EncoderOptions]:
        """Encoder `name` loaded from its config table (weights read, replicas on their devices),
        with its batching options."""
        self.notifier.status(encoder_status(name, table))
        batching, options = encoder_options(name, table)
        return build_encoder(name, options, self.digests), batching

    def add_encoder(self, name: str, table: dict[str, Any]) -> None:
        """Loads one more encoder and serves it (a reload); the others serve meanwhile."""
        if self.engine is None:
            raise CacheError("the daemon is not serving yet")
        encoder, batching = self.build_encoder(name, table)
        batcher = self.engine.add_encoder(name, encoder, batching)
        if self.metrics is not None:
            batcher.on_batch = self.metrics.observer(name)

    def _open_remote(self) -> RemoteTier | None:
        """The remote tier when configured; opening it makes no request (a store that is down is
        found, and counted, by the first lookup or upload)."""
        cfg = self.config
        if not cfg.remote:
            return None
        log.info("remote tier: %s at %s", cfg.remote, cfg.remote_endpoint or "AWS")
        return RemoteTier(cfg.remote, cfg.remote_endpoint or None, cfg.remote_region or None,
                          compression=cfg.compression, get_timeout_s=cfg.remote_get_timeout,
                          upload_workers=cfg.remote_upload_workers,
                          max_queue_bytes=parse_size(cfg.remote_upload_bytes, what="store.remote_upload_bytes"))

    def _object_reader(self) -> ObjectReader | None:
        """The reader of s3:// sources, when allowed_roots admits any."""
        cfg = self.config
        if not any(root.startswith("s3://") for root in cfg.allowed_roots):
            return None
        return ObjectReader(S3Endpoint(cfg.sources_endpoint or cfg.remote_endpoint or None, cfg.remote_region or None))

    def _start_sessions(self, store: ShmStore) -> SessionServer | None:
        """The identity socket beside the unix socket; a session's end gives back its leases."""
        if not self.socket:
            return None
        self.sessions = SessionServer(identity_socket(self.socket), self.instance, self._session_ended, self.group,
                                      fds=store.client_fds)
        self.sessions.start()
        return self.sessions

    def _session_ended(self, caller: Caller) -> None:
        """A client process is gone: its leases go back, its counters go."""
        if self.store is not None:
            self.store.release_owner(caller.session)
        if self.engine is not None:
            self.engine.forget_client(caller.session)

    def _tcp_token(self) -> str | None:
        if not self.config.tcp:
            return None
        path = self.config.tcp_token_file or os.path.join(
            os.path.dirname(self.socket or "/run/cached/cached.sock"), "tcp-token")
        return load_or_create_token(path, self.group)

    def _set_health(self, status: int) -> None:
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def stop(self, grace: float = 10.0) -> None:
        """Stops in about `grace` seconds: new calls are refused at once and calls in flight drain;
        work still queued a second before the grace runs out fails with Cancelled, so its callers
        get that error rather than a dropped connection; then everything is released."""
        deadline = time.monotonic() + grace
        self.notifier.stopping()
        self._stopping.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._server is not None:
            drained = self._server.stop(grace)
            if not drained.wait(max(0.0, grace - CANCEL_BEFORE_S)) and self.engine is not None:
                log.info("grace running out: cancelled %d computations in progress", self.engine.cancel_all())
            drained.wait(max(0.0, deadline - time.monotonic()))
        self.servicer.engine = None
        if self.sessions is not None:
            self.sessions.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.engine is not None:
            self.engine.close(max(1.0, deadline - time.monotonic()))
            self.engine.sources.close()
        elif self.tiers is not None:
            self.tiers.close()
        if self.store is not None:
            self.store.close()
        if self.socket and os.path.exists(self.socket):
            os.unlink(self.socket)
        log.info("stopped (instance %s)", self.instance)
