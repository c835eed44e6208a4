"""Which daemon `cachectl` talks to, and where its files are, resolved as the daemon resolves them.

`--config FILE` reads the daemon's TOML: its [server] socket feeds the standard order
(cached_client/address.py: --address, then CACHED_ADDRESS, then the config's socket, then the
default sockets); `--tcp` takes [server] tcp instead, with the token in [server] tcp_token_file
(default: tcp-token beside the socket, as the daemon writes it). [store] shm_dir and disk_dir are
where `cachectl gc` looks.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

from .address import resolve_address, socket_path
from .client import CacheClient

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["DaemonConfig", "load", "client_for", "add_arguments"]

DEFAULT_SOCKET = "/run/cached/cached.sock"


@dataclass(frozen=True)
class DaemonConfig:
    """The parts of the daemon's config that cachectl needs ("" where the file says nothing)."""

    socket: str = ""
    tcp: str = ""
    tcp_token_file: str = ""
    shm_dir: str = ""
    disk_dir: str | None = None  # None: not set; "": the disk tier is off

    def token_file(self) -> str:
        """The TCP token's file, where the daemon puts it."""
        if self.tcp_token_file:
            return self.tcp_token_file
        sock = socket_path(resolve_address(None, self.socket or None)) or DEFAULT_SOCKET
        return os.path.join(os.path.dirname(sock), "tcp-token")


def _table(raw: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [{name}] must be a table")
    return table


def _text(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise ValueError(f"{where}.{key} must be a string, got {value!r}")
    return value


def load(path: str | None) -> DaemonConfig:
    """The daemon config at `path` (an empty one for None); ValueError naming a bad file or value."""
    if not path:
        return DaemonConfig()
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None
    server, store = _table(raw, "server", path), _table(raw, "store", path)
    return DaemonConfig(socket=_text(server, "socket", "server"), tcp=_text(server, "tcp", "server"),
                        tcp_token_file=_text(server, "tcp_token_file", "server"),
                        shm_dir=_text(store, "shm_dir", "store"),
                        disk_dir=_text(store, "disk_dir", "store") if "disk_dir" in store else None)


def _read_token(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        raise OSError(f"the TCP token {path}: {exc.strerror or exc}") from None


def client_for(args: argparse.Namespace) -> CacheClient:
    """A client of the daemon that --address, --config and --tcp name."""
    config = load(args.config)
    if args.tcp:
        if not config.tcp:
            raise ValueError("--tcp needs --config FILE with [server] tcp set")
        address = config.tcp
    else:
        address = resolve_address(args.address, config.socket or None)
    token = None
    if args.config and socket_path(address) is None:
        token = _read_token(config.token_file())
    return CacheClient(address, connect_timeout=args.timeout, token=token)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="daemon address (default: CACHED_ADDRESS, then the config's socket, "
                                     "then the standard sockets)")
    p.add_argument("--config", help="the daemon's TOML config: its socket, TCP address and token, shm and disk "
                                    "directories")
    p.add_argument("--tcp", action="store_true", help="connect to the config's [server] tcp with its token")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an unreachable daemon")
