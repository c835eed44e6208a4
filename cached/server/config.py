"""The daemon's TOML config, with defaults and flag overrides. Keys a build does not implement yet
are accepted with a warning, never a crash; bad values fail at load with the value named."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any

from cached_client.units import parse_size

from ..engine.limits import Limits
from ..store.compress import MODES as COMPRESSIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Config", "load_config"]

log = logging.getLogger(__name__)



@dataclass
class Config:
    socket: str = ""                # empty: resolved as DESIGN.md says
    tcp: str = ""                   # e.g. "127.0.0.1:7070"; off when empty
    tcp_token_file: str = ""        # the token TCP calls need; "": tcp-token beside the socket
    group: str = ""                 # group owning the socket and the segments
    workers: int = 32               # gRPC handler threads
    shutdown_grace: float = 10.0    # seconds SIGTERM gives calls in flight (systemd's TimeoutStopSec must be longer)
    shm_dir: str = "/dev/shm"
    shm_bytes: str = "4GiB"         # bytes or a percentage of shm_dir
    disk_dir: str | None = None     # None: /var/cache/cached if writable, else ~/.cache/cached; "": off
    disk_bytes: str = "200GiB"
    compression: str = "lz4"
    allowed_roots: list[str] = field(default_factory=list)
    max_pixels: int = 16384 * 16384
    decode_workers: int = 0         # 0: min(8, cpus)
    check_caller_access: bool = True  # serve a source only to a caller that could read it itself
    limits: dict[str, Any] = field(default_factory=dict)  # [limits], as written (see engine/limits.py)
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)

    def disk_directory(self) -> str | None:
        """The disk tier's directory, or None when it is turned off."""
        if self.disk_dir is not None:
            return self.disk_dir or None
        system = "/var/cache/cached"
        if os.access(system if os.path.isdir(system) else os.path.dirname(system), os.W_OK):
            return system
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "cached")

    def disk_capacity(self) -> int:
        return parse_size(self.disk_bytes, what="disk_bytes")

    def engine_limits(self) -> Limits:
        """[limits] with sizes parsed ("16MiB"); the defaults of engine/limits.py for the rest."""
        values = {k: parse_size(v, what=f"limits.{k}") if k in _SIZE_LIMITS else v
                  for k, v in self.limits.items()}
        return Limits(**values)  # type: ignore[arg-type]  # checked per key by _LIMITS

    def client_leased_bytes_of(self, capacity: int) -> int:
        return parse_size(self.engine_limits().client_leased_bytes, total=capacity,
                          what="limits.client_leased_bytes")

    def shm_capacity(self) -> int:
        st = os.statvfs(self.shm_dir)
        return parse_size(self.shm_bytes, total=st.f_blocks * st.f_frsize, what="shm_bytes")


_SECTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "server": {"socket": str, "tcp": str, "tcp_token_file": str, "group": str, "workers": int,
               "shutdown_grace": (int, float)},
    "store": {"shm_dir": str, "shm_bytes": (str, int), "allowed_roots": list, "max_pixels": int,
              "decode_workers": int, "disk_dir": str, "disk_bytes": (str, int), "compression": str,
              "check_caller_access": bool},
}
_SIZE_LIMITS = {"max_request_bytes", "max_source_bytes", "max_text_bytes", "decoded_bytes_in_flight",
                "key_memo_bytes"}
_LIMITS: dict[str, type | tuple[type, ...]] = {
    f.name: ((str, int) if f.name in _SIZE_LIMITS or f.name == "client_leased_bytes" else int)
    for f in fields(Limits)}


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Config from a TOML file (optional) plus flag overrides (None values ignored)."""
    raw: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path}: not valid TOML: {exc}") from None
    cfg = Config()
    for section, table in raw.items():
        if section == "encoders":
            if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
                raise ValueError("[encoders.NAME] tables must each be a table of options")
            cfg.encoders = {name: dict(opts) for name, opts in table.items()}
        elif section == "limits":
            cfg.limits = _checked("limits", table, _LIMITS)
        elif section in _SECTIONS:
            _apply(cfg, section, table)
        else:
            log.warning("config section [%s] is not implemented in this build; ignored", section)
    for key, value in (overrides or {}).items():
        if value is not None:
            setattr(cfg, key, value)
    _validate(cfg)
    return cfg


def _apply(cfg: Config, section: str, table: dict[str, Any]) -> None:
    for key, value in _checked(section, table, _SECTIONS[section]).items():
        setattr(cfg, key, value)


def _checked(section: str, table: dict[str, Any], known: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """The table's known keys, type-checked; unknown keys are warned about and dropped."""
    out = {}
    for key, value in table.items():
        if key not in known:
            log.warning("config key %s.%s is unknown to this build; ignored", section, key)
            continue
        if isinstance(value, bool) != (known[key] is bool) or not isinstance(value, known[key]):
            raise ValueError(f"{section}.{key} has the wrong type: {value!r}")
        out[key] = value
    return out


def _validate(cfg: Config) -> None:
    if cfg.shutdown_grace < 0:
        raise ValueError(f"server.shutdown_grace must be >= 0 seconds, got {cfg.shutdown_grace!r}")
    if cfg.workers < 1:
        raise ValueError(f"server.workers must be >= 1, got {cfg.workers!r}")
    if cfg.max_pixels < 1:
        raise ValueError(f"store.max_pixels must be >= 1, got {cfg.max_pixels!r}")
    if not all(isinstance(r, str) and os.path.isabs(r) for r in cfg.allowed_roots):
        raise ValueError(f"store.allowed_roots must be absolute paths, got {cfg.allowed_roots!r}")
    if not os.path.isdir(cfg.shm_dir):
        raise ValueError(f"store.shm_dir {cfg.shm_dir!r} is not a directory")
    cfg.shm_capacity()  # parses shm_bytes, naming a bad value
    cfg.disk_capacity()
    cfg.client_leased_bytes_of(cfg.shm_capacity())  # parses and checks every limit, naming a bad one
    if cfg.compression not in COMPRESSIONS:
        raise ValueError(f"store.compression must be one of {sorted(COMPRESSIONS)}, got {cfg.compression!r}")
    if cfg.disk_dir and not os.path.isabs(cfg.disk_dir):
        raise ValueError(f"store.disk_dir must be an absolute path, got {cfg.disk_dir!r}")
