"""The client's half of the identity handshake (cached/server/sessions.py has the daemon's).

A process connects once to the identity socket beside the daemon's gRPC socket, where the daemon
learns its pid, uid and groups from the kernel, and receives a session token that it sends with
every call. There is one session per process and daemon, shared by every CacheClient of the process,
and it stays open for the life of the process (views handed out may outlive the client object that
made them, and their leases must stay held): when the process exits, the kernel closes it and the
daemon gives back everything the process held at once. A forked child closes its copy at once (it
opens a session of its own on its first call), so it never keeps its parent's session alive.
"""

from __future__ import annotations

import array
import json
import os
import socket
import threading
import weakref
from dataclasses import dataclass, field

from .errors import DaemonUnavailable, ProtocolError

__all__ = ["Session", "process_session", "current_session", "forget_session", "identity_socket",
           "SESSION_METADATA",
           "PROTOCOL_VERSION"]

PROTOCOL_VERSION = 1
SESSION_METADATA = "cached-session"  # gRPC metadata key that carries the token
MEMFD_PREFIX = "memfd:"  # a segment the daemon names this way has no file: its descriptor comes from here
_MAX_FDS = 64
_MAX_REPLY = 4096

_open_sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_sessions: dict[str, Session] = {}  # this process's, by gRPC socket path
_lock = threading.Lock()


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", data[:len(data) - len(data) % 4]))
    return fds


def identity_socket(grpc_socket: str) -> str:
    """The identity socket's path for a daemon listening on `grpc_socket`."""
    return grpc_socket + ".id"


@dataclass(eq=False)
class Session:
    sock: socket.socket
    token: str
    instance: str
    pid: int  # this process's pid as the daemon sees it (another pid namespace may differ)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one request at a time on the socket

    def segment_fds(self, paths: list[str], timeout: float = 10.0) -> list[int]:
        """Read-only descriptors of the daemon's memfd segments `paths`, handed over this
        connection (SCM_RIGHTS). DaemonUnavailable when the daemon is gone, ProtocolError when it
        answers something else."""
        with self.lock:
            self.sock.settimeout(timeout)
            try:
                self.sock.send(json.dumps({"op": "segments", "paths": paths}).encode())
                data, ancillary, flags, _ = self.sock.recvmsg(_MAX_REPLY, socket.CMSG_SPACE(_MAX_FDS * 4))
            except OSError as exc:
                raise DaemonUnavailable(f"the daemon's identity socket: {exc.strerror or exc}") from None
            finally:
                self.sock.settimeout(None)
        fds = _received_fds(ancillary)
        if not data or flags & socket.MSG_CTRUNC or len(fds) != len(paths):
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"the daemon answered {data[:120]!r} for segments {paths}")
        return fds

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SESSION_METADATA, self.token),)

    def close(self) -> None:
        self.sock.close()

    def alive(self) -> bool:
        """False once the daemon closed the connection (it exited or restarted): one poll, no wait."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True  # nothing to read: connected
        except OSError:
            return False


def open_session(grpc_socket: str, timeout: float = 5.0) -> Session:
    """Handshakes with the daemon at `grpc_socket`; DaemonUnavailable when nobody answers."""
    path = identity_socket(grpc_socket)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.send(json.dumps({"op": "hello", "version": PROTOCOL_VERSION}).encode())
        reply = sock.recv(_MAX_REPLY)
    except OSError as exc:
        sock.close()
        raise DaemonUnavailable(f"no cached daemon answering at unix://{grpc_socket} (its identity socket: "
                                f"{exc.strerror or exc})") from None
    try:
        msg = json.loads(reply)
        session = Session(sock, str(msg["session"]), str(msg["instance"]), int(msg["pid"]))
    except (ValueError, KeyError, TypeError):
        sock.close()
        raise ProtocolError(f"{path}: not a cached identity socket (reply {reply[:80]!r})") from None
    sock.settimeout(None)
    _open_sockets.add(sock)
    return session


def process_session(grpc_socket: str, timeout: float = 5.0) -> Session:
    """This process's session with the daemon at `grpc_socket`, opened on first use."""
    with _lock:
        session = _sessions.get(grpc_socket)
        if session is None:
            session = _sessions[grpc_socket] = open_session(grpc_socket, timeout)
        return session


def current_session(grpc_socket: str) -> Session | None:
    """This process's session with the daemon at `grpc_socket`, if it opened one."""
    return _sessions.get(grpc_socket)


def forget_session(grpc_socket: str, token: str) -> None:
    """Drops the session of `token` when it is still this process's (the daemon restarted and no
    longer knows it); the next call opens a new one."""
    with _lock:
        stale = _sessions.get(grpc_socket)
        if stale is not None and stale.token == token:
            del _sessions[grpc_socket]
            stale.close()


def _close_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # the parent's threads did not come along
    _sessions.clear()
    for sock in list(_open_sockets):
        try:
            sock.close()
        except OSError:
            pass


os.register_at_fork(after_in_child=_close_in_child)
