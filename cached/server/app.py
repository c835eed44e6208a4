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

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cached_client._proto import cache_pb2_grpc
from cached_client.address import resolve_address, socket_path
from cached_client.errors import CacheError
from cached_client.session import identity_socket

from ..encoders import WeightDigests, build_encoder
from ..engine import EncoderOptions, Engine, Sources, Tiers
from ..store import ShmStore
from ..store.disk import DiskTier
from ..store.names import new_instance_id
from .auth import Authenticator, load_or_create_token
from .config import Config
from .interceptors import ErrorInterceptor
from .servicer import CacheServicer
from .sessions import SessionServer

__all__ = ["Daemon", "SERVICE_NAME"]

log = logging.getLogger(__name__)

SERVICE_NAME = "cached.v1.Cache"
MAX_MESSAGE = 256 << 20
CANCEL_BEFORE_S = 1.0  # before the shutdown grace ends, queued work is cancelled and its callers told


class Daemon:
    def __init__(self, config: Config, address: str | None = None) -> None:
        self.config = config
        self.instance = new_instance_id()
        self.target = resolve_address(address, config.socket or None)
        self.socket = socket_path(self.target)
        self.group = grp.getgrnam(config.group).gr_gid if config.group else None
        self.store: ShmStore | None = None
        self.tiers: Tiers | None = None
        self.engine: Engine | None = None
        self.sessions: SessionServer | None = None
        self.health = health.HealthServicer()
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
        log.info("serving on %s (instance %s)", self.target, self.instance)

    def _listen(self) -> None:
        server = grpc.server(
            ThreadPoolExecutor(self.config.workers, thread_name_prefix="rpc"),
            interceptors=[ErrorInterceptor(max_field_bytes=max(4096, self.limits.max_path_bytes))],
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
        self.store = ShmStore(cfg.shm_dir, capacity, self.instance, self.group,
                              owner_cap=cfg.client_leased_bytes_of(capacity))
        disk_dir = cfg.disk_directory()
        disk = None
        if disk_dir:
            disk = DiskTier.open_or_degrade(disk_dir, cfg.disk_capacity(), cfg.compression)
            log.info("disk tier: %s (%s, %s)", disk_dir, cfg.disk_bytes, cfg.compression)
        self.tiers = Tiers(self.store, disk)
        digests = WeightDigests(os.path.join(disk_dir, "weight-digests.json") if disk_dir else None)
        encoders, options = {}, {}
        for name, opts in cfg.encoders.items():
            opts = dict(opts)
            options[name] = EncoderOptions(int(opts.pop("max_batch", 32)),
                                           float(opts.pop("max_queue_delay_ms", 5.0)))
            encoders[name] = build_encoder(name, opts, digests)
        if not encoders:
            log.warning("no encoders configured: every request will fail with UnknownEncoder")
        sources = Sources(cfg.allowed_roots, self.limits.max_source_bytes, cfg.check_caller_access)
        self.engine = Engine(self.tiers, encoders, sources, options, cfg.max_pixels, cfg.decode_workers or None,
                             self.limits)
        if not cfg.allowed_roots:
            log.warning("store.allowed_roots is empty: any file this daemon can read may be requested")
        self.servicer.auth = Authenticator(self._start_sessions(self.store), self._tcp_token())
        self.servicer.engine = self.engine

    def _start_sessions(self, store: ShmStore) -> SessionServer | None:
        """The identity socket beside the unix socket; a session's end gives back its leases."""
        if not self.socket:
            return None
        self.sessions = SessionServer(identity_socket(self.socket), self.instance,
                                      lambda caller: store.release_owner(caller.session), self.group)
        self.sessions.start()
        return self.sessions

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
        if self.engine is not None:
            self.engine.close(max(1.0, deadline - time.monotonic()))
        elif self.tiers is not None:
            self.tiers.close()
        if self.store is not None:
            self.store.close()
        if self.socket and os.path.exists(self.socket):
            os.unlink(self.socket)
        log.info("stopped (instance %s)", self.instance)
