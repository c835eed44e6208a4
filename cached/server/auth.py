"""Every call's caller, from what the transport proves: a session on the unix socket, a token on TCP.

- unix socket: the call carries a session token (`cached-session` metadata) that the identity
  socket issued to a kernel-verified process (sessions.py); no token, or one the daemon does not
  know (it restarted), is UNAUTHENTICATED, and the client opens a new session.
- TCP (only when configured): the call carries `authorization: Bearer <token>`, the contents of
  `server.tcp_token_file` (readable by the daemon's group); anything else is UNAUTHENTICATED. A TCP
  caller has no verified uid (it reads what anyone may read) and no session, so it may not hold
  leases: Get and Release need the unix socket.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets

import grpc

from cached_client.errors import Unauthenticated

from ..engine.caller import TCP_CALLER, Caller
from .sessions import SessionServer, token_of

__all__ = ["Authenticator", "load_or_create_token"]

log = logging.getLogger(__name__)


class Authenticator:
    def __init__(self, sessions: SessionServer | None, tcp_token: str | None) -> None:
        self.sessions = sessions
        self._tcp = f"Bearer {tcp_token}".encode() if tcp_token else None

    def caller(self, context: grpc.ServicerContext) -> Caller:
        metadata = tuple(context.invocation_metadata() or ())
        if context.peer().startswith("unix:"):
            token = token_of(metadata)
            caller = self.sessions.caller(token) if token and self.sessions is not None else None
            if caller is None:
                raise Unauthenticated("no session, or one this daemon did not issue: handshake on the "
                                      "identity socket first (the client does it by itself)")
            return caller
        if self._tcp is not None and hmac.compare_digest(_bearer(metadata), self._tcp):
            return TCP_CALLER
        raise Unauthenticated("TCP calls need the daemon's token (the file server.tcp_token_file names)")


def _bearer(metadata: tuple) -> bytes:
    for key, value in metadata:
        if key == "authorization":
            return value.encode() if isinstance(value, str) else bytes(value)
    return b""


def load_or_create_token(path: str, group: int | None) -> str:
    """The TCP token in `path`; a new random one, written 0640 (group-readable), when there is none."""
    try:
        with open(path) as f:
            token = f.read().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.fchmod(fd, 0o640)
        if group is not None:
            os.fchown(fd, -1, group)
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    log.info("wrote a new TCP token to %s (group-readable; clients send it with CACHED_TOKEN_FILE)", path)
    return token
