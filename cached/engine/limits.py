"""Every bound on what one request, one client or all of them together may make the daemon do.

Each is a `[limits]` config key with the default here; hitting one is a precise error
(LimitExceeded, RESOURCE_EXHAUSTED, or InvalidSpec for a malformed item), never a hang or an
out-of-memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from cached_client import specs

__all__ = ["Limits"]


@dataclass(frozen=True)
class Limits:
    max_items: int = 4096                 # items in one Get, Warm or Prefetch
    max_request_bytes: int = 16 << 20     # one request's bytes (gRPC refuses larger messages)
    max_source_bytes: int = 256 << 20     # one source file (a 3 GiB sparse file is refused unread)
    max_path_bytes: int = specs.MAX_PATH_BYTES    # one spec's path
    max_path_depth: int = specs.MAX_PATH_DEPTH    # components of a path (realpath is quadratic in them)
    max_text_bytes: int = specs.MAX_TEXT_BYTES    # one text spec
    decoded_bytes_in_flight: int = 1 << 30  # decoded images and encoder inputs, all requests together
    key_memo_bytes: int = 64 << 20        # the spec-line -> key memo
    max_calls: int = 0                    # Get/Warm/Prefetch/Import calls at once (0: server.workers - 4)
    client_leased_bytes: str | int = "50%"  # leases one client process may hold (bytes or % of shm)

    def __post_init__(self) -> None:
        for name in ("max_items", "max_request_bytes", "max_source_bytes", "max_path_bytes", "max_path_depth",
                     "max_text_bytes", "decoded_bytes_in_flight", "key_memo_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_calls < 0:
            raise ValueError(f"limits.max_calls must be >= 0, got {self.max_calls!r}")
