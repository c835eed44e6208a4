"""Who is calling, from the kernel: a handshake on the identity socket issues per-process sessions.

gRPC does not tell a handler who is at the other end of a unix socket, and nothing a request says
about its sender can be trusted. So each client process first connects to a second unix socket (the
identity socket, beside the gRPC one), where the daemon reads the peer's credentials from the kernel
(SO_PEERCRED: pid, uid, gid; SO_PEERGROUPS: supplementary groups; SO_PEERPIDFD, or pidfd_open, a
handle on the process itself) and answers with a random session token. The client sends the token
as call metadata (`cached-session`); the servicer maps it back to the verified `Caller`.

The client keeps that connection open for its lifetime, and the daemon watches it and the pidfd: the
session ends when the connection closes (the process exited, in any pid namespace) or the process
exits (a forked child still holding the socket does not keep its parent's session alive), and
`on_close` gives back everything the session held, at once.

Protocol (SOCK_SEQPACKET, one JSON object per message):
    client -> {"op": "hello", "version": 1}
    daemon -> {"session": TOKEN, "instance": ID, "pid": PID as the daemon sees it, "uid": UID}
    client -> {"op": "segments", "paths": ["memfd:cached-...", ...]}        (any time after)
    daemon -> {"paths": [...]} with one read-only descriptor per path (SCM_RIGHTS), or {"error": ...}
A connection that sends anything else, or no hello within HELLO_TIMEOUT_S, is closed. The segments
request is how a client maps memfd arenas (cached/store/arena.py): a client in a container that
shares only the socket's directory gets the memory itself, no /dev/shm needed.
"""

from __future__ import annotations

import array
import json
import logging
import os
import secrets
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cached_client.session import PROTOCOL_VERSION, SESSION_METADATA

from ..engine.caller import Caller

__all__ = ["Session", "SessionServer", "token_of"]

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 5.0
MAX_MESSAGE = 4096
MAX_FDS = 64  # descriptors handed over in one reply (a daemon has a few segments)
MAX_SESSIONS = 65536  # one per client process: far beyond any machine's trainers and workers
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


@dataclass(eq=False)
class Session:
    token: str
    caller: Caller
    sock: socket.socket
    pidfd: int | None
    started: float = field(default_factory=time.monotonic)


class SessionServer:
    """Listens on the identity socket; issues, tracks and ends sessions. Thread-safe."""

    def __init__(self, path: str, instance: str, on_close: Callable[[Caller], object],
                 group: int | None = None, fds: Callable[[list[str]], list[int]] | None = None) -> None:
        self.path = path
        self.instance = instance
        self.on_close = on_close
        self.fds = fds or _no_segments
        self._sessions: dict[str, Session] = {}
        self._by_fd: dict[int, Session] = {}
        self._pending: dict[int, tuple[socket.socket, float]] = {}  # connected, no hello yet
        self._next_id = 1
        self._mu = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._listener = self._listen(path, group)
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="sessions", daemon=True)

    @staticmethod
    def _listen(path: str, group: int | None) -> socket.socket:
        if os.path.exists(path):
            os.unlink(path)  # the gRPC socket beside it was checked for a live daemon first
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind(path)
        os.chmod(path, 0o660)
        if group is not None:
            os.chown(path, -1, group)
        sock.listen(128)
        sock.setblocking(False)
        return sock

    def start(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread.start()

    # lookups, from the gRPC handler threads

    def caller(self, token: str) -> Caller | None:
        with self._mu:
            session = self._sessions.get(token)
            return None if session is None else session.caller

    def callers(self) -> list[Caller]:
        with self._mu:
            return [s.caller for s in self._sessions.values()]

    # the loop

    def _loop(self) -> None:
        while not self._stopped:
            for key, _ in self._selector.select(timeout=1.0):
                what = key.data
                if what == "accept":
                    self._accept()
                elif what == "wake":
                    os.read(self._wake_r, 4096)
                elif isinstance(what, tuple) and what[0] == "hello":
                    self._hello(what[1])
                elif isinstance(what, Session):
                    if key.fd == what.pidfd:
                        self._end(what, "process exited")
                    else:
                        self._message(what)
            self._expire_pending()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self._pending[conn.fileno()] = (conn, time.monotonic())
        self._selector.register(conn, selectors.EVENT_READ, ("hello", conn))

    def _hello(self, conn: socket.socket) -> None:
        self._pending.pop(conn.fileno(), None)
        self._selector.unregister(conn)
        try:
            msg = json.loads(conn.recv(MAX_MESSAGE) or b"null")
            if not (isinstance(msg, dict) and msg.get("op") == "hello"):
                raise ValueError(f"expected a hello, got {str(msg)[:80]!r}")
            if msg.get("version") != PROTOCOL_VERSION:
                raise ValueError(f"protocol version {msg.get('version')!r}, this daemon speaks {PROTOCOL_VERSION}")
            session = self._open(conn)
        except (OSError, ValueError) as exc:
            log.info("identity socket: refused a connection: %s", exc)
            self._drop(conn)
            return
        # known before the client has the token: its first call may arrive before this thread runs again
        with self._mu:
            self._sessions[session.token] = session
        try:
            conn.send(json.dumps({"session": session.token, "instance": self.instance,
                                  "pid": session.caller.pid, "uid": session.caller.uid}).encode())
        except OSError as exc:
            log.info("identity socket: could not answer a hello: %s", exc)
            with self._mu:
                del self._sessions[session.token]
            if session.pidfd is not None:
                os.close(session.pidfd)
            self._drop(conn)
            return
        self._by_fd[conn.fileno()] = session
        self._selector.register(conn, selectors.EVENT_READ, session)  # readable: EOF or chatter
        if session.pidfd is not None:
            self._selector.register(session.pidfd, selectors.EVENT_READ, session)

    def _message(self, session: Session) -> None:
        """A message on an open session: EOF ends it; a segments request is answered with the
        segments' read-only descriptors (SCM_RIGHTS); anything else ends the session."""
        try:
            data = session.sock.recv(MAX_MESSAGE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end(session, "connection closed")
            return
        try:
            paths = _segments_request(data)
        except ValueError as exc:
            log.info("session of pid %d sent a bad request (%s); closing it", session.caller.pid, exc)
            self._end(session, "protocol error")
            return
        self._send_fds(session, paths)

    def _send_fds(self, session: Session, paths: list[str]) -> None:
        try:
            fds = self.fds(paths)
            reply = json.dumps({"paths": paths}).encode()
            session.sock.sendmsg([reply], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        except ValueError as exc:  # not a segment of this daemon
            session.sock.send(json.dumps({"error": str(exc)}).encode())
        except OSError as exc:
            log.info("could not hand segments to pid %d: %s", session.caller.pid, exc)
            self._end(session, "send failed")

    def _open(self, conn: socket.socket) -> Session:
        if len(self._sessions) >= MAX_SESSIONS:
            raise ValueError(f"{MAX_SESSIONS} sessions are open; refusing more")
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        caller = Caller(self._next_id, uid, frozenset({gid, *_peer_groups(conn)}), pid)
        self._next_id += 1
        return Session(secrets.token_hex(16), caller, conn, _peer_pidfd(conn, pid))

    def _end(self, session: Session, why: str) -> None:
        with self._mu:
            if self._sessions.pop(session.token, None) is None:
                return
        self._by_fd.pop(session.sock.fileno(), None)
        if session.pidfd is not None:
            self._selector.unregister(session.pidfd)
            os.close(session.pidfd)
        self._drop(session.sock)
        log.debug("session of pid %d ended: %s", session.caller.pid, why)
        try:
            self.on_close(session.caller)
        except Exception:  # noqa: BLE001 - the loop must go on for every other session
            log.exception("releasing the session of pid %d failed", session.caller.pid)

    def _drop(self, conn: socket.socket) -> None:
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    def _expire_pending(self) -> None:
        now = time.monotonic()
        for fd, (conn, since) in list(self._pending.items()):
            if now - since > HELLO_TIMEOUT_S:
                del self._pending[fd]
                self._drop(conn)

    def close(self) -> None:
        """Stops listening and ends every session (without calling on_close: the store goes too)."""
        self._stopped = True
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for session in list(self._sessions.values()):
            if session.pidfd is not None:
                os.close(session.pidfd)
            session.sock.close()
        self._sessions.clear()
        for conn, _ in self._pending.values():
            conn.close()
        self._listener.close()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _no_segments(paths: list[str]) -> list[int]:
    raise ValueError("this daemon's segments are files: open them by path")


def _segments_request(data: bytes) -> list[str]:
    """The paths a {"op": "segments", "paths": [...]} request asks for (at most MAX_FDS)."""
    msg = json.loads(data)
    if not (isinstance(msg, dict) and msg.get("op") == "segments"):
        raise ValueError(f"unknown request {str(msg)[:80]!r}")
    paths = msg.get("paths")
    if not (isinstance(paths, list) and 0 < len(paths) <= MAX_FDS and all(isinstance(p, str) for p in paths)):
        raise ValueError(f"segments wants 1..{MAX_FDS} paths")
    return paths


def _peer_groups(conn: socket.socket) -> list[int]:
    """The peer's supplementary groups as the kernel recorded them at connect (Linux 4.13+)."""
    size = 4 * 64
    while size <= 4 * 65536:
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
            return list(struct.unpack(f"{len(raw) // 4}I", raw))
        except OSError as exc:
            if exc.errno != 34:  # ERANGE: more groups than the buffer holds
                return []
            size *= 4
    return []


def _peer_pidfd(conn: socket.socket, pid: int) -> int | None:
    """A pidfd of the peer process: exact with SO_PEERPIDFD (Linux 6.5+), else pidfd_open(pid)."""
    try:
        return int(conn.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError:
        pass
    if pid > 0 and hasattr(os, "pidfd_open"):
        try:
            return os.pidfd_open(pid)
        except OSError:
            return None
    return None


def token_of(metadata: tuple[tuple[str, str | bytes], ...]) -> str:
    """The session token a call carries, or ""."""
    for key, value in metadata:
        if key == SESSION_METADATA:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return ""
