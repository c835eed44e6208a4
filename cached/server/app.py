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
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cached_client._proto import cache_pb2_grpc
from cached_client.address import resolve_address, socket_path
from cached_client.errors import CacheError
from cached_client.procinfo import pid_namespace

from ..encoders import WeightDigests, build_encoder
from ..engine import EncoderOptions, Engine, Sources, Tiers
from ..store import Owner, ShmStore
from ..store.disk import DiskTier
from ..store.names import new_instance_id
from .config import Config
from .interceptors import ErrorInterceptor
from .servicer import CacheServicer

__all__ = ["Daemon", "SERVICE_NAME"]

log = logging.getLogger(__name__)

SERVICE_NAME = "cached.v1.Cache"
MAX_MESSAGE = 256 << 20
LEASE_SWEEP_S = 1.0


def owner_alive(owner: Owner, own_ns: int = pid_namespace()) -> bool:
    """False only when the owning process is surely gone; a pid in another namespace can't be checked."""
    pid, start_time, _, ns = owner
    if ns and own_ns and ns != own_ns:
        return True
    try:
        return abs(psutil.Process(pid).create_time() - start_time) < 1e-3
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


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
        self.health = health.HealthServicer()
        self.servicer = CacheServicer(self.instance)
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
        threading.Thread(target=self._expire_leases, name="lease-expiry", daemon=True).start()
        log.info("serving on %s (instance %s)", self.target, self.instance)

    def _listen(self) -> None:
        server = grpc.server(
            ThreadPoolExecutor(self.config.workers, thread_name_prefix="rpc"),
            interceptors=[ErrorInterceptor()],
            options=[("grpc.max_send_message_length", MAX_MESSAGE),
                     ("grpc.max_receive_message_length", MAX_MESSAGE),
                     ("grpc.so_reuseport", 0)])
        cache_pb2_grpc.add_CacheServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.socket:
            self._prepare_socket(self.socket)
        server.add_insecure_port(self.target)
        if self.config.tcp:
            host = self.config.tcp.rsplit(":", 1)[0].strip("[]")
            if host not in ("127.0.0.1", "localhost", "::1"):
                log.warning("listening on %s: reachable from other machines, with no authentication",
                            self.config.tcp)
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
        self.store = ShmStore(cfg.shm_dir, cfg.shm_capacity(), self.instance, self.group)
        disk_dir = cfg.disk_directory()
        disk = None
        if disk_dir:
            os.makedirs(disk_dir, mode=0o750, exist_ok=True)
            disk = DiskTier(disk_dir, cfg.disk_capacity(), cfg.compression)
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
        self.engine = Engine(self.tiers, encoders, Sources(cfg.allowed_roots), options,
                             cfg.max_pixels, cfg.decode_workers or None)
        if not cfg.allowed_roots:
            log.warning("store.allowed_roots is empty: any file this daemon can read may be requested")
        self.servicer.engine = self.engine

    def _set_health(self, status: int) -> None:
        self.health.set("", status)
        self.health.set(SERVICE_NAME, status)

    def _expire_leases(self) -> None:
        while not self._stopping.wait(LEASE_SWEEP_S):
            if self.store is not None:
                self.store.expire(owner_alive)

    def stop(self, grace: float = 10.0) -> None:
        """Drains in-flight calls for up to `grace` seconds, then releases everything."""
        self._stopping.set()
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._server is not None:
            self._server.stop(grace).wait()
        self.servicer.engine = None
        if self.engine is not None:
            self.engine.close()  # finishes the disk writes in flight
        elif self.tiers is not None:
            self.tiers.close()
        if self.store is not None:
            self.store.close()
        if self.socket and os.path.exists(self.socket):
            os.unlink(self.socket)
        log.info("stopped (instance %s)", self.instance)
