"""Thin client for the cached daemon: zero-copy, read-only tensor views of cached latents.

    from cached_client import CacheClient, ImageSpec
    client = CacheClient()
    [e] = client.get([ImageSpec("/data/a.png", size=(1024, 1024))], encoder="vae")
    e["latent"]  # (C, H/8, W/8) view of shared memory

Imports nothing heavier than grpcio, protobuf, numpy and psutil; torch is used when present.
"""

from .client import CacheClient, WarmResult
from .errors import (
    Busy,
    CacheError,
    CacheMiss,
    Cancelled,
    CapacityError,
    DaemonError,
    DaemonUnavailable,
    DeadlineExceeded,
    EncoderError,
    InvalidSpec,
    LimitExceeded,
    PermissionDenied,
    ProtocolError,
    SourceError,
    SourceNotAllowed,
    Unauthenticated,
    UnknownEncoder,
)
from .specs import ImageSpec, TextSpec
from .views import Entry

__all__ = [
    "CacheClient", "WarmResult", "Entry", "ImageSpec", "TextSpec",
    "Busy", "CacheError", "CacheMiss", "Cancelled", "CapacityError", "DaemonError", "DaemonUnavailable",
    "DeadlineExceeded", "EncoderError", "InvalidSpec", "LimitExceeded", "PermissionDenied", "ProtocolError",
    "SourceError", "SourceNotAllowed", "Unauthenticated", "UnknownEncoder",
]

__version__ = "0.1.0"
