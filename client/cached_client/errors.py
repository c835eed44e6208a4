"""One error tree for the client and the daemon.

The daemon raises these same classes; its interceptor sends each as its gRPC status code (and, for
per-item failures inside a batch, as a code plus class name), and the client turns them back into
the class here. Every gRPC status code maps to exactly one class.

    CacheError                                   base of everything cached raises
    ├── DaemonUnavailable (ConnectionError)      UNAVAILABLE: no daemon at the address, after retries,
    │                                            or its shared memory is not visible in this process
    ├── DeadlineExceeded (TimeoutError)          DEADLINE_EXCEEDED: the call outlived its timeout
    ├── Cancelled                                CANCELLED: the call was cancelled
    ├── CacheMiss (KeyError)                     NOT_FOUND: not cached and compute=False
    ├── InvalidSpec (ValueError)                 INVALID_ARGUMENT, OUT_OF_RANGE: malformed request or spec
    │   └── UnknownEncoder                       no encoder of that name is configured
    ├── SourceError (OSError)                    FAILED_PRECONDITION: missing file, not an image, bomb
    │   └── SourceNotAllowed                     outside allowed_roots, or not readable by the caller
    ├── PermissionDenied (PermissionError)       PERMISSION_DENIED: the caller may not do this (or,
    │   │                                        client side, map the daemon's shared memory)
    │   ├── SourceNotAllowed                     (also a SourceError)
    │   └── Unauthenticated                      UNAUTHENTICATED: no session, or a wrong TCP token
    ├── CapacityError (MemoryError)              RESOURCE_EXHAUSTED: shared memory or disk is full
    │   └── LimitExceeded                        a request bound or a per-client cap was hit
    │       └── Busy                             too many calls in flight (retried by the client)
    ├── EncoderError                             ABORTED: the encoder failed on this item
    ├── ProtocolError                            UNIMPLEMENTED, ALREADY_EXISTS: client and daemon disagree,
    │                                            or a reply that does not decode
    └── DaemonError                              UNKNOWN, INTERNAL, DATA_LOSS: a daemon bug
"""

from __future__ import annotations

__all__ = [
    "CacheError",
    "DaemonUnavailable",
    "DeadlineExceeded",
    "Cancelled",
    "CacheMiss",
    "InvalidSpec",
    "UnknownEncoder",
    "SourceError",
    "SourceNotAllowed",
    "PermissionDenied",
    "Unauthenticated",
    "CapacityError",
    "LimitExceeded",
    "Busy",
    "EncoderError",
    "ProtocolError",
    "DaemonError",
    "error_for",
    "ERROR_METADATA",
]

ERROR_METADATA = "cached-error"  # trailing metadata key: the class name of the error a call failed with


class CacheError(Exception):
    """Base of every error cached raises. `code` is the gRPC status code name it travels as."""

    code = "UNKNOWN"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return self.message


class DaemonUnavailable(CacheError, ConnectionError):
    """No daemon answered at the address within the client's connect timeout, or the shared memory
    its reply named is not there (it restarted, or this container does not share its shm directory)."""

    code = "UNAVAILABLE"


class DeadlineExceeded(CacheError, TimeoutError):
    """The call took longer than its timeout."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(CacheError):
    """The call was cancelled, by the caller or by a daemon shutting down."""

    code = "CANCELLED"


class CacheMiss(CacheError, KeyError):
    """The entry is not cached and the caller asked not to compute it (compute=False)."""

    code = "NOT_FOUND"


class InvalidSpec(CacheError, ValueError):
    """The request is malformed: bytes that are no request, a bad size, crop, flip, path or text, an
    empty batch item, a line that is not a spec. The message names the bad value."""

    code = "INVALID_ARGUMENT"


class UnknownEncoder(InvalidSpec):
    """No encoder of that name is configured in the daemon."""


class SourceError(CacheError, OSError):
    """The source can't be used: missing, unreadable, not an image, or a decompression bomb."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(CacheError, PermissionError):
    """The caller may not do this (e.g. lease over TCP, read a segment of a daemon of another group)."""

    code = "PERMISSION_DENIED"


class SourceNotAllowed(SourceError, PermissionDenied):
    """The source is outside the daemon's allowed_roots, or the caller could not read it itself."""

    code = "PERMISSION_DENIED"


class Unauthenticated(PermissionDenied):
    """The call carries no session the daemon issued (it restarted), or a wrong TCP token."""

    code = "UNAUTHENTICATED"


class CapacityError(CacheError, MemoryError):
    """Shared memory (or disk) is too small or full of entries that clients still hold."""

    code = "RESOURCE_EXHAUSTED"


class LimitExceeded(CapacityError):
    """A bound was hit: items or bytes in a request, a source's size, decoded bytes in flight,
    leases one client holds. The message names the bound and its config key."""


class Busy(LimitExceeded):
    """The daemon has limits.max_calls calls in flight; the client retries by itself until its
    connect_timeout, so a caller sees this only when the daemon stays busy that long."""


class EncoderError(CacheError):
    """The encoder raised while encoding this item."""

    code = "ABORTED"


class ProtocolError(CacheError):
    """Client and daemon disagree about the protocol (different versions), or a reply does not decode."""

    code = "UNIMPLEMENTED"


class DaemonError(CacheError):
    """The daemon failed in a way that is its own fault; its log says more."""

    code = "INTERNAL"


_BY_NAME: dict[str, type[CacheError]] = {cls.__name__: cls for cls in (
    CacheError, DaemonUnavailable, DeadlineExceeded, Cancelled, CacheMiss, InvalidSpec, UnknownEncoder,
    SourceError, SourceNotAllowed, PermissionDenied, Unauthenticated, CapacityError, LimitExceeded, Busy,
    EncoderError, ProtocolError, DaemonError,
)}

# Every grpc.StatusCode except OK; tests/test_errors.py checks that none is missing.
_BY_CODE: dict[str, type[CacheError]] = {
    "CANCELLED": Cancelled,
    "UNKNOWN": DaemonError,
    "INVALID_ARGUMENT": InvalidSpec,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "NOT_FOUND": CacheMiss,
    "ALREADY_EXISTS": ProtocolError,
    "PERMISSION_DENIED": PermissionDenied,
    "RESOURCE_EXHAUSTED": CapacityError,
    "FAILED_PRECONDITION": SourceError,
    "ABORTED": EncoderError,
    "OUT_OF_RANGE": InvalidSpec,
    "UNIMPLEMENTED": ProtocolError,
    "INTERNAL": DaemonError,
    "UNAVAILABLE": DaemonUnavailable,
    "DATA_LOSS": DaemonError,
    "UNAUTHENTICATED": Unauthenticated,
}


def error_for(code: str, message: str, name: str = "") -> CacheError:
    """The client-side exception for a status code name (and, when known, the daemon's class name)."""
    cls = _BY_NAME.get(name) or _BY_CODE.get(code, DaemonError)
    return cls(message)
