"""One error tree for the client and the daemon.

The daemon raises these same classes; its interceptor sends each as its gRPC status code (and, for
per-item failures inside a batch, as a code plus class name), and the client turns them back into
the class here. Every gRPC status code maps to exactly one class.

    CacheError                                   base of everything cached raises
    ├── DaemonUnavailable (ConnectionError)      UNAVAILABLE: no daemon at the address, after retries
    ├── DeadlineExceeded (TimeoutError)          DEADLINE_EXCEEDED: the call outlived its timeout
    ├── Cancelled                                CANCELLED: the call was cancelled
    ├── CacheMiss (KeyError)                     NOT_FOUND: not cached and compute=False
    ├── InvalidSpec (ValueError)                 INVALID_ARGUMENT, OUT_OF_RANGE: malformed or absurd spec
    │   └── UnknownEncoder                       no encoder of that name is configured
    ├── SourceError (OSError)                    FAILED_PRECONDITION: missing file, not an image, bomb
    │   └── SourceNotAllowed (PermissionError)   PERMISSION_DENIED: outside the daemon's allowed_roots
    ├── CapacityError (MemoryError)              RESOURCE_EXHAUSTED: shared memory or disk is full
    ├── EncoderError                             ABORTED: the encoder failed on this item
    ├── ProtocolError                            UNIMPLEMENTED, ALREADY_EXISTS: client and daemon disagree
    └── DaemonError                              UNKNOWN, INTERNAL, DATA_LOSS, UNAUTHENTICATED: a daemon bug
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
    "CapacityError",
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
    """No daemon answered at the address within the client's connect timeout."""

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
    """The request is malformed: a bad size, crop or flip, an empty batch item, unparsable JSON."""

    code = "INVALID_ARGUMENT"


class UnknownEncoder(InvalidSpec):
    """No encoder of that name is configured in the daemon."""


class SourceError(CacheError, OSError):
    """The source can't be used: missing, unreadable, not an image, or a decompression bomb."""

    code = "FAILED_PRECONDITION"


class SourceNotAllowed(SourceError, PermissionError):
    """The source resolves (after `..` and symlinks) outside the daemon's allowed_roots."""

    code = "PERMISSION_DENIED"


class CapacityError(CacheError, MemoryError):
    """Shared memory (or disk) is too small or full of entries that clients still hold."""

    code = "RESOURCE_EXHAUSTED"


class EncoderError(CacheError):
    """The encoder raised while encoding this item."""

    code = "ABORTED"


class ProtocolError(CacheError):
    """Client and daemon disagree about the protocol (different versions)."""

    code = "UNIMPLEMENTED"


class DaemonError(CacheError):
    """The daemon failed in a way that is its own fault; its log says more."""

    code = "INTERNAL"


_BY_NAME: dict[str, type[CacheError]] = {cls.__name__: cls for cls in (
    CacheError, DaemonUnavailable, DeadlineExceeded, Cancelled, CacheMiss, InvalidSpec, UnknownEncoder,
    SourceError, SourceNotAllowed, CapacityError, EncoderError, ProtocolError, DaemonError,
)}

# Every grpc.StatusCode except OK; tests/test_errors.py checks that none is missing.
_BY_CODE: dict[str, type[CacheError]] = {
    "CANCELLED": Cancelled,
    "UNKNOWN": DaemonError,
    "INVALID_ARGUMENT": InvalidSpec,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "NOT_FOUND": CacheMiss,
    "ALREADY_EXISTS": ProtocolError,
    "PERMISSION_DENIED": SourceNotAllowed,
    "RESOURCE_EXHAUSTED": CapacityError,
    "FAILED_PRECONDITION": SourceError,
    "ABORTED": EncoderError,
    "OUT_OF_RANGE": InvalidSpec,
    "UNIMPLEMENTED": ProtocolError,
    "INTERNAL": DaemonError,
    "UNAVAILABLE": DaemonUnavailable,
    "DATA_LOSS": DaemonError,
    "UNAUTHENTICATED": DaemonError,
}


def error_for(code: str, message: str, name: str = "") -> CacheError:
    """The client-side exception for a status code name (and, when known, the daemon's class name)."""
    cls = _BY_NAME.get(name) or _BY_CODE.get(code, DaemonError)
    return cls(message)
