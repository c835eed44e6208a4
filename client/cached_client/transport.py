"""How CacheClient talks to the daemon: the channel options, the call metadata, retries, and errors.

Transport is a mixin of CacheClient: `_call` makes one unary call with credentials, retrying while
the daemon is unreachable or busy and opening the session again once when the daemon restarted;
`_mapped` turns a failed call into the client's error tree (errors.py). Operator calls and the data
path both go through it, so none of them handles gRPC retries or status codes by itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import grpc

from . import forksafe
from .address import resolve_address, socket_path
from .errors import (
    ERROR_METADATA,
    CacheError,
    DaemonError,
    DaemonUnavailable,
    InvalidSpec,
    PermissionDenied,
    Unauthenticated,
    error_for,
)
from .handles import ProcessState
from .session import MEMFD_PREFIX, current_session, forget_session, process_session
from .views import open_readonly

__all__ = ["Transport", "CHANNEL_OPTIONS"]

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.enable_retries", 0),
]


class Transport:
    """The daemon's address and the calls to it, for a class that stores the configuration
    (CacheClient's __init__ sets these attributes)."""

    address: str | None
    timeout: float | None
    connect_timeout: float
    token: str | None
    _target: str | None

    @property
    def target(self) -> str:
        if self._target is None:
            self._target = resolve_address(self.address)  # resolved once: it reads the environment
        return self._target

    def _credentials(self) -> tuple[tuple[str, str], ...]:
        """Call metadata: this process's session token on a unix socket (the handshake on first use),
        the bearer token over TCP."""
        path = socket_path(self.target)
        if path is not None:
            return process_session(path, timeout=max(self.connect_timeout, 1.0)).metadata
        token = self.token
        if token is None and os.environ.get("CACHED_TOKEN_FILE"):
            path = os.environ["CACHED_TOKEN_FILE"]
            try:
                with open(path) as f:
                    token = self.token = f.read().strip()
            except OSError as exc:
                raise Unauthenticated(f"CACHED_TOKEN_FILE {path}: {exc.strerror or exc}") from None
        return (("authorization", f"Bearer {token}"),) if token else ()

    def _open_segment(self, path: str) -> int:
        """A read-only descriptor of a segment the daemon named: a memfd's from the identity
        socket (SCM_RIGHTS), a file's by opening it."""
        if not path.startswith(MEMFD_PREFIX):
            return open_readonly(path)
        sock = socket_path(self.target)
        if sock is None:
            raise PermissionDenied(f"{path}: a memory file is handed over the unix socket only, not over TCP")
        return process_session(sock, timeout=max(self.connect_timeout, 1.0)).segment_fds([path])[0]

    def _call(self, proc: ProcessState, method: str, request: Any) -> Any:
        """A unary call, made again as _retried says."""
        def attempt(metadata: tuple[tuple[str, str], ...]) -> Any:
            with forksafe.call():
                return getattr(proc.stub, method)(request, timeout=self.timeout, metadata=metadata)

        return self._retried(attempt)

    def _retried(self, attempt: Callable[[tuple[tuple[str, str], ...]], Any]) -> Any:
        """`attempt(metadata)`, made again while the daemon is unreachable or busy, for up to
        connect_timeout seconds; a session the daemon does not know (it restarted) is opened again
        once. An attempt that must not be repeated raises a CacheError rather than an RpcError."""
        deadline = time.monotonic() + self.connect_timeout
        delay, renewed = 0.05, False
        while True:
            try:
                metadata = self._credentials()
                return attempt(metadata)
            except DaemonUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNAUTHENTICATED and not renewed and self._renew_session(metadata):
                    renewed = True
                    continue
                if not _retryable(exc) or time.monotonic() + delay > deadline:
                    raise _mapped(exc, self.target) from exc
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _daemon_alive(self) -> bool:
        """False when the daemon that issued this process's session is gone (the identity
        connection closed); the session is forgotten then, and the next call opens a new one."""
        path = socket_path(self.target)
        session = current_session(path) if path is not None else None
        if session is None or session.alive():
            return True
        forget_session(path, session.token)  # type: ignore[arg-type]
        return False

    def _renew_session(self, metadata: tuple[tuple[str, str], ...]) -> bool:
        """Forgets the session a refused call carried (the daemon restarted and does not know it);
        True when the call carried one."""
        path = socket_path(self.target)
        if path is None or not metadata:
            return False
        forget_session(path, metadata[0][1])
        return True


def _message(cls: Callable[..., Any], **fields: Any) -> Any:
    """A request message; InvalidSpec when an argument does not fit its field (limit=-1, a size
    past uint32, keys that are not strings)."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as exc:
        raise InvalidSpec(f"{cls.__name__}: {exc} (in {_short(fields)})") from None


def _short(fields: dict[str, Any]) -> str:
    text = repr(fields)
    return text if len(text) <= 200 else text[:200] + "..."


def _error_name(exc: grpc.RpcError) -> str:
    """The daemon's error class named in the call's trailing metadata; "" when it names none."""
    return dict(exc.trailing_metadata() or ()).get(ERROR_METADATA, "") if hasattr(exc, "trailing_metadata") else ""


def _retryable(exc: grpc.RpcError) -> bool:
    """Unreachable, or busy: too many calls in flight (ours, or gRPC's own bound, which names none)."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    return _error_name(exc) in ("", "Busy")


def _mapped(exc: grpc.RpcError, target: str = "") -> CacheError:
    """The CacheError of a failed call: the daemon's class when its trailing metadata names one, else
    the status code's (errors.py); DaemonError for an RpcError that carries no status code."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    if not isinstance(code, grpc.StatusCode):
        return DaemonError(f"call to {target or 'the daemon'} failed without a status code: {exc!r}")
    name = _error_name(exc)
    if code == grpc.StatusCode.UNAVAILABLE and not name:
        return DaemonUnavailable(f"no cached daemon answering at {target or 'its address'}: {exc.details()}")
    return error_for(code.name, exc.details() or "", name)
