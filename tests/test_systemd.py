"""The daemon speaks systemd's notify protocol: the notify module against datagram sockets this test
binds (a path and an abstract name), and a real `cached serve` with NOTIFY_SOCKET and WATCHDOG_USEC
set, as systemd sets them for a `Type=notify` unit with `WatchdogSec=`."""

from __future__ import annotations

import logging
import os
import signal
import socket
import statistics
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from conftest import vae_config

from cached.server.notify import Liveness, Notifier
from cached_testing.harness import Daemon

SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Listener:
    """A datagram socket standing in for systemd's: each message comes with its sender's pid, which
    is what `NotifyAccess=main` checks."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.address = address

    def receive(self, timeout: float) -> tuple[list[str], int] | None:
        """The next message's lines and its sender's pid; None when none came within `timeout`."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:12])[0]
        return data.decode().split("\n"), pid

    def collect(self, seconds: float) -> list[tuple[float, list[str]]]:
        """Every message of the next `seconds`, with when it arrived."""
        out, end = [], time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            message = self.receive(left)
            if message is not None:
                out.append((time.monotonic(), message[0]))
        return out

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@") and os.path.exists(self.address):
            os.unlink(self.address)


@pytest.fixture
def listener(tmp_path) -> Iterator[Listener]:
    lst = Listener(str(tmp_path / "notify.sock"))
    yield lst
    lst.close()


class SwitchProbe:
    """A liveness probe whose answer the test sets."""

    def __init__(self) -> None:
        self.alive = threading.Event()
        self.alive.set()
        self.closed = False

    def __call__(self, timeout: float) -> bool:
        return self.alive.is_set()

    def close(self) -> None:
        self.closed = True


def pings(messages: list[tuple[float, list[str]]]) -> list[float]:
    return [t for t, fields in messages if "WATCHDOG=1" in fields]


# the notify module

def test_status_goes_to_a_path_socket_from_this_process(listener):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": listener.address}, os.getpid())
    assert notifier.enabled
    notifier.status("loading encoder vae\non cuda:0")
    assert listener.receive(5) == (["STATUS=loading encoder vae on cuda:0"], os.getpid())


def test_status_goes_to_an_abstract_socket():
    lst = Listener(f"@cached-test-{uuid.uuid4().hex}")
    try:
        Notifier.from_environ({"NOTIFY_SOCKET": lst.address}, os.getpid()).send("READY=1", "STATUS=serving")
        assert lst.receive(5) == (["READY=1", "STATUS=serving"], os.getpid())
    finally:
        lst.close()


def test_without_notify_socket_nothing_is_sent_and_no_watchdog_runs():
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "400000"}, os.getpid())
    probe = SwitchProbe()
    assert not notifier.enabled and notifier.watchdog_s is None
    assert notifier.send("READY=1") is False
    notifier.ready("serving", probe)
    notifier.stopping()
    assert not any(t.name == "watchdog" for t in threading.enumerate())


def test_an_unreachable_socket_is_logged_once_and_never_raises(tmp_path, caplog):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody")}, os.getpid())
    with caplog.at_level(logging.WARNING, logger="cached.server.notify"):
        assert [notifier.send("STATUS=x") for _ in range(3)] == [False, False, False]
        notifier.status("y")
    assert len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1


@pytest.mark.parametrize(("environ", "expected"), [
    ({"WATCHDOG_USEC": "400000"}, 0.4),                              # WATCHDOG_PID unset: ours
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 30.0),  # meant for this process
    ({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}, None),        # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_comes_from_the_environment(environ, expected):
    environ = {k: v.format(pid=os.getpid()) for k, v in environ.items()}
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@cached-test-unused", **environ}, os.getpid())
    assert notifier.watchdog_s == expected


def test_a_notify_socket_that_is_no_address_is_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="cached.server.notify"):
        assert not Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}, os.getpid()).enabled
    assert "neither a path nor an abstract socket" in caplog.text


def test_watchdog_pings_only_while_the_probe_says_serving(listener):
    notifier = Notifier(listener.address, watchdog_s=0.2)  # pings every 0.1 s
    probe = SwitchProbe()
    try:
        notifier.ready("serving", probe)
        assert ["READY=1", "STATUS=serving"] == listener.receive(5)[0]  # type: ignore[index]
        assert len(pings(listener.collect(0.6))) >= 3
        probe.alive.clear()
        listener.collect(0.15)  # a ping already probed may still arrive
        assert pings(listener.collect(0.5)) == []
        probe.alive.set()
        assert pings(listener.collect(0.5))
    finally:
        notifier.stopping()
    assert ["STOPPING=1", "STATUS=stopping: draining calls in flight"] in [f for _, f in listener.collect(0.3)]
    assert pings(listener.collect(0.3)) == [] and probe.closed


def test_liveness_fails_on_a_socket_that_never_answers(tmp_path):
    """A listening socket nobody accepts on: connecting works, no health answer ever comes."""
    path = str(tmp_path / "wedged.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wedged:
        wedged.bind(path)
        wedged.listen(8)
        probe = Liveness("unix://" + path, None)
        t0 = time.monotonic()
        assert probe(0.3) is False
        assert time.monotonic() - t0 < 3
        probe.close()
    assert Liveness("unix://" + str(tmp_path / "nothing.sock"), None)(0.3) is False


def test_liveness_fails_when_a_batcher_thread_died_stand_in_engine():
    """A stand-in engine (a real dead thread): the probe stops before any health call."""
    dead = threading.Thread(target=lambda: None, name="batcher-vae-0")
    dead.start()
    dead.join()
    engine = SimpleNamespace(batchers={"vae": SimpleNamespace(_threads=[dead])})
    assert Liveness("unix:///nonexistent/cached.sock", engine)(0.1) is False  # type: ignore[arg-type]


# a real daemon

def test_daemon_notifies_ready_status_watchdog_and_stopping(tiny_vae, tmp_path, listener):
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    env.update(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="400000")  # pings every 0.2 s
    (tmp_path / "daemon").mkdir()
    daemon = Daemon(str(tmp_path / "daemon"), vae_config(tiny_vae), env=env)
    try:
        proc = daemon.launch()
        statuses, ready, health = _until_ready(daemon, listener)
        assert health == "SERVING", "READY=1 came before health turned SERVING"
        assert f"STATUS=serving on {daemon.address}" in ready
        loading = [s for s in statuses if s.startswith("STATUS=loading encoder")]
        assert loading == ["STATUS=loading encoder vae on cpu"], statuses
        assert statuses.index("STATUS=mapping shared memory") < statuses.index(loading[0])

        arrived = pings(listener.collect(2.0))
        gaps = [b - a for a, b in zip(arrived[:-1], arrived[1:], strict=True)]
        assert len(arrived) >= 5, daemon.log()
        assert 0.1 <= statistics.median(gaps) <= 0.35, gaps

        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in _until(listener, "STOPPING=1", 30, proc.pid), daemon.log()
        assert proc.wait(30) == 0, daemon.log()
    finally:
        daemon.cleanup()


def _until_ready(daemon: Daemon, listener: Listener) -> tuple[list[str], list[str], str]:
    """The STATUS lines before READY=1, the READY message, and the health check right after it."""
    statuses: list[str] = []
    deadline = time.monotonic() + 120
    while True:
        fields = _until(listener, None, deadline - time.monotonic(), daemon.proc.pid, daemon)  # type: ignore[union-attr]
        if "READY=1" in fields:
            return statuses, fields, daemon.client().health()
        statuses += [f for f in fields if f.startswith("STATUS=")]


def _until(listener: Listener, field: str | None, timeout: float, pid: int, daemon: Daemon | None = None) -> list[str]:
    """The next message (with `field`, when given) from `pid`; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = listener.receive(min(left, 1.0))
        if message is None:
            if daemon is not None and daemon.proc is not None and daemon.proc.poll() is not None:
                pytest.fail(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log()}")
            continue
        fields, sender = message
        assert sender == pid, f"{fields} came from pid {sender}, not the daemon's {pid}: NotifyAccess=main drops it"
        if field is None or field in fields:
            return fields
    pytest.fail(f"no {field or 'message'} within {timeout:.0f} s" + (f":\n{daemon.log()}" if daemon else ""))
