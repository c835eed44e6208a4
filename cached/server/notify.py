"""Telling systemd how `cached serve` is doing: the sd_notify(3) protocol, written with `socket`.

Under `Type=notify` systemd passes a datagram socket in $NOTIFY_SOCKET (a path, or an abstract socket
when it starts with "@"); each notification is one datagram of newline-separated `KEY=VALUE` lines.
The daemon sends `STATUS=` lines while it loads, `READY=1` when it serves (the moment health turns
SERVING), `STOPPING=1` when it drains. Without $NOTIFY_SOCKET nothing is sent. A failed send is
logged once and otherwise ignored: a daemon that serves must not die because systemd is unreachable.

With `WatchdogSec=` systemd also sets $WATCHDOG_USEC (and $WATCHDOG_PID, the process meant). Once the
daemon serves, a thread sends `WATCHDOG=1` every half interval, each time only after `Liveness` found
the daemon really serving: a health call through its own gRPC server answered SERVING in time (so
the server and its handler threads are not wedged) and every encoder's batcher thread is alive. A
wedged daemon stops pinging, and systemd kills and restarts it (`Restart=on-failure`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from ..engine import Engine

__all__ = ["Notifier", "Probe", "Liveness", "Watchdog", "encoder_status"]

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING


class Probe(Protocol):
    def __call__(self, timeout: float) -> bool:
        """Whether the daemon really serves, found out within `timeout` seconds."""

    def close(self) -> None:
        """Releases what the probe holds (the watchdog is done with it)."""


class Notifier:
    """Sends notifications to systemd; does nothing when `address` is None (not run by systemd).

    `address` is $NOTIFY_SOCKET as systemd writes it; `watchdog_s` is the interval systemd expects
    pings within (None: no watchdog).
    """

    def __init__(self, address: str | None = None, watchdog_s: float | None = None) -> None:
        if watchdog_s is not None and watchdog_s <= 0:
            raise ValueError(f"watchdog_s must be positive, got {watchdog_s!r}")
        self.address = address
        self.watchdog_s = watchdog_s if address else None
        self._target = _socket_address(address) if address else None
        self._lock = threading.Lock()
        self._warned = False
        self._watchdog: Watchdog | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int) -> Notifier:
        """The notifier systemd's environment asks for (read by the entry point, never at import).
        The watchdog is ours only when $WATCHDOG_PID is unset or is `pid`."""
        address = environ.get("NOTIFY_SOCKET") or None
        if address and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%s is neither a path nor an abstract socket: not notifying systemd",
                        address)
            address = None
        return cls(address, _watchdog_interval(environ, pid))

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def send(self, *fields: str) -> bool:
        """Sends `fields` ("KEY=VALUE") as one notification; False when not sent."""
        if self._target is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(fields).encode(), self._target)
        except OSError as exc:
            self._failed(exc)
            return False
        return True

    def status(self, text: str) -> None:
        """What `systemctl status cached` shows on its Status: line."""
        self.send(f"STATUS={_flat(text)}")

    def ready(self, status: str, alive: Probe) -> None:
        """The daemon serves: READY=1, and watchdog pings while `alive` says so."""
        self.send("READY=1", f"STATUS={_flat(status)}")
        if self.watchdog_s is not None and self._watchdog is None:
            self._watchdog = Watchdog(self, alive, self.watchdog_s / 2)
            self._watchdog.start()

    def stopping(self, status: str = "stopping: draining calls in flight") -> None:
        """The daemon drains: no more pings, then STOPPING=1."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
        self.send("STOPPING=1", f"STATUS={_flat(status)}")
        if watchdog is not None:
            watchdog.join()
            watchdog.alive.close()

    def _failed(self, exc: OSError) -> None:
        with self._lock:
            first, self._warned = not self._warned, True
        if first:
            log.warning("cannot notify systemd at NOTIFY_SOCKET=%s: %s (further failures are not logged)",
                        self.address, exc)


class Watchdog:
    """A thread that sends WATCHDOG=1 every `period_s` seconds, each time only if `alive(period_s / 2)`
    says the daemon serves; a ping late by a slow probe does not delay the ones after it."""

    def __init__(self, notifier: Notifier, alive: Probe, period_s: float) -> None:
        self.notifier = notifier
        self.alive = alive
        self.period_s = period_s
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        """No ping after this returns."""
        self._cancelled.set()

    def join(self) -> None:
        """Waits for the thread, at most as long as one probe may take."""
        self._cancelled.set()
        if self._thread.ident is not None:
            self._thread.join(self.period_s)

    def _loop(self) -> None:
        due = time.monotonic()
        serving = True
        while not self._cancelled.is_set():
            was, serving = serving, self._probe()
            if serving and not self._cancelled.is_set():
                self.notifier.send("WATCHDOG=1")
            if serving != was:
                log.log(logging.INFO if serving else logging.WARNING, "watchdog: %s",
                        "serving again: pinging" if serving else "not serving: no pings, so systemd "
                        "restarts the daemon unless it recovers within WatchdogSec")
            due = max(due + self.period_s, time.monotonic())
            self._cancelled.wait(due - time.monotonic())

    def _probe(self) -> bool:
        try:
            return self.alive(self.period_s / 2)
        except Exception:  # noqa: BLE001 - a probe that breaks means the daemon is unwell, not dead
            log.exception("watchdog: liveness probe failed")
            return False


class Liveness:
    """Whether the daemon really serves: every batcher thread of `engine` is alive, and a health
    check through the daemon's own gRPC server at `target` answers SERVING within the timeout."""

    def __init__(self, target: str, engine: Engine | None) -> None:
        self.target = target
        self.engine = engine
        self._channel: grpc.Channel | None = None
        self._reason = ""

    def __call__(self, timeout: float) -> bool:
        reason = self._dead_batchers() or self._health(timeout)
        if reason and reason != self._reason:
            log.warning("watchdog: %s", reason)
        self._reason = reason
        return not reason

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _dead_batchers(self) -> str:
        if self.engine is None:
            return ""
        # _threads: the batcher's own list of its replica threads (a thread that died encodes nothing)
        dead = [t.name for b in self.engine.batchers.values() for t in b._threads if not t.is_alive()]
        return f"batcher threads died: {', '.join(dead)}" if dead else ""

    def _health(self, timeout: float) -> str:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target, options=[("grpc.enable_http_proxy", 0)])
        check = health_pb2_grpc.HealthStub(self._channel).Check
        try:
            status = check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError as exc:
            return f"health check on {self.target} failed: {exc.code().name}"
        if status != SERVING:
            return f"health check on {self.target} answered {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}"
        return ""


def encoder_status(name: str, options: Mapping[str, Any]) -> str:
    """The STATUS line while encoder `name` loads, e.g. "loading encoder vae on cuda:0"."""
    devices = options.get("devices") or ["cpu"]
    where = ", ".join(map(str, devices)) if isinstance(devices, (list, tuple)) else str(devices)
    return f"loading encoder {name} on {where}"


def _socket_address(address: str) -> str:
    return "\0" + address[1:] if address.startswith("@") else address


def _watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds within which systemd expects a ping, or None: no watchdog, or another process's."""
    usec, owner = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if owner and owner != str(pid):
        return None
    try:
        interval = int(usec)
    except ValueError:
        interval = 0
    if interval <= 0:
        log.warning("WATCHDOG_USEC=%s is not a positive number of microseconds: no watchdog pings", usec)
        return None
    return interval / 1e6


def _flat(text: str) -> str:
    return " ".join(text.split())
