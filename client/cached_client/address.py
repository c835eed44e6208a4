"""Where the daemon listens. The daemon and every client resolve it with this one function.

Order: an explicit address; else CACHED_ADDRESS; else the config's socket; else the first of
/run/cached/cached.sock, $XDG_RUNTIME_DIR/cached/cached.sock, /tmp/cached-$UID/cached.sock that
already has a socket, or failing that the first whose directory this process can write.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["resolve_address", "socket_path", "default_socket_candidates"]


def default_socket_candidates(env: Mapping[str, str]) -> list[str]:
    out = ["/run/cached/cached.sock"]
    if env.get("XDG_RUNTIME_DIR"):
        out.append(os.path.join(env["XDG_RUNTIME_DIR"], "cached", "cached.sock"))
    out.append(f"/tmp/cached-{os.getuid()}/cached.sock")
    return out


def _writable(directory: str) -> bool:
    probe = directory
    while not os.path.isdir(probe):  # the daemon creates missing directories, so test the nearest parent
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent
    return os.access(probe, os.W_OK | os.X_OK)


def _default_socket(env: Mapping[str, str]) -> str:
    candidates = default_socket_candidates(env)
    for path in candidates:
        if os.path.exists(path):
            return path
    for path in candidates:
        if _writable(os.path.dirname(path)):
            return path
    return candidates[-1]


def _normalize(address: str) -> str:
    if address.startswith("unix://"):
        return "unix://" + os.path.abspath(address[len("unix://"):])
    if address.startswith("unix:"):
        return "unix://" + os.path.abspath(address[len("unix:"):])
    if address.startswith(("/", ".")):
        return "unix://" + os.path.abspath(address)
    return address  # host:port, dns:///host:port, ...


def resolve_address(
    address: str | None = None,
    config_socket: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """A gRPC target: `unix:///abs/path.sock` or `host:port`."""
    env = os.environ if env is None else env
    for candidate in (address, env.get("CACHED_ADDRESS"), config_socket):
        if candidate:
            return _normalize(candidate)
    return "unix://" + _default_socket(env)


def socket_path(target: str) -> str | None:
    """The filesystem path of a unix target, or None for TCP."""
    return target[len("unix://"):] if target.startswith("unix://") else None
