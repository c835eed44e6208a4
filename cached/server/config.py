"""The daemon's TOML config, with defaults and flag overrides. Keys a build does not implement yet
are accepted with a warning, never a crash; bad values fail at load with the value named."""

from __future__ import annotations

import copy
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Any

from cached_client.units import parse_size

from ..engine import EncoderOptions
from ..engine.limits import Limits
from ..store.arena import BACKENDS, memfd_supported
from ..store.compress import MODES as COMPRESSIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Config", "Problem", "load_config", "read_config", "encoder_options", "section_of", "LOG_LEVELS"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

log = logging.getLogger(__name__)



@dataclass
class Config:
    socket: str = ""                # empty: resolved as DESIGN.md says
    tcp: str = ""                   # e.g. "127.0.0.1:7070"; off when empty
    tcp_token_file: str = ""        # the token TCP calls need; "": tcp-token beside the socket
    metrics: str = ""               # HOST:PORT of Prometheus /metrics, e.g. "127.0.0.1:9464"; off when empty
    log_level: str = ""             # one of LOG_LEVELS; "": `cached serve --log-level` (INFO)
    group: str = ""                 # group (name or gid) owning the socket and the segments
    workers: int = 32               # gRPC handler threads
    shutdown_grace: float = 10.0    # seconds SIGTERM gives calls in flight (systemd's TimeoutStopSec must be longer)
    shm_backend: str = "auto"       # "memfd" (the default where the kernel has it) or "dev-shm"
    shm_dir: str = "/dev/shm"       # the dev-shm backend's tmpfs
    shm_bytes: str = "4GiB"         # bytes, or a percentage of shm_dir (dev-shm) or of memory (memfd)
    disk_dir: str | None = None     # None: /var/cache/cached if writable, else ~/.cache/cached; "": off
    disk_bytes: str = "200GiB"
    compression: str = "lz4"
    allowed_roots: list[str] = field(default_factory=list)  # absolute paths, and s3://bucket/prefix entries
    remote: str = ""                # the remote tier, "s3://bucket/prefix"; off when empty
    remote_endpoint: str = ""       # an S3-compatible server's URL; "": AWS (or the env's AWS_ENDPOINT_URL)
    remote_region: str = ""         # "": the environment's (AWS_REGION)
    remote_upload_bytes: str | int = "256MiB"  # entries queued for upload in memory, at most
    remote_upload_workers: int = 4  # uploads in flight
    remote_get_timeout: float = 2.0  # seconds one remote lookup may take before it is a miss
    sources_endpoint: str = ""      # the S3 server of s3:// sources; "": remote_endpoint
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

    def backend(self) -> str:
        """The shared-memory backend this config asks for, "auto" settled."""
        if self.shm_backend == "auto":
            return "memfd" if memfd_supported() else "dev-shm"
        return self.shm_backend

    def shm_capacity(self) -> int:
        if self.backend() == "memfd":
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        else:
            st = os.statvfs(self.shm_dir)
            total = st.f_blocks * st.f_frsize
        return parse_size(self.shm_bytes, total=total, what="shm_bytes")


_SECTIONS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "server": {"socket": str, "tcp": str, "tcp_token_file": str, "metrics": str, "group": str, "workers": int,
               "shutdown_grace": (int, float), "log_level": str},
    "store": {"shm_backend": str, "shm_dir": str, "shm_bytes": (str, int), "allowed_roots": list, "max_pixels": int,
              "decode_workers": int, "disk_dir": str, "disk_bytes": (str, int), "compression": str,
              "check_caller_access": bool, "remote": str, "remote_endpoint": str, "remote_region": str,
              "remote_upload_bytes": (str, int), "remote_upload_workers": int, "remote_get_timeout": (int, float),
              "sources_endpoint": str},
}
_SIZE_LIMITS = {"max_request_bytes", "max_source_bytes", "max_text_bytes", "decoded_bytes_in_flight",
                "key_memo_bytes"}
_LIMITS: dict[str, type | tuple[type, ...]] = {
    f.name: ((str, int) if f.name in _SIZE_LIMITS or f.name == "client_leased_bytes" else int)
    for f in fields(Limits)}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (`section`, `key`; empty where unknown) and what.
    `unknown`: a key or section this build does not know, which `load_config` only warns about."""

    section: str
    key: str
    what: str
    unknown: bool = False

    def __str__(self) -> str:
        where = ".".join(p for p in (self.section, self.key) if p)
        return f"{where} {self.what}" if where else self.what

    def line(self, path: str) -> str:
        """`FILE: [section] key: what`, as `cached serve --check-config` prints it."""
        where = f"[{self.section}]{' ' + self.key if self.key else ''}: " if self.section else ""
        return f"{path}: {where}{self.what}"


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Config from a TOML file (optional) plus flag overrides (None values ignored). ValueError
    names every bad value; unknown keys and sections are warned about and ignored."""
    cfg, problems = read_config(path, overrides)
    for p in problems:
        if p.unknown and p.key:
            log.warning("config key %s.%s is unknown to this build; ignored", p.section, p.key)
        elif p.unknown:
            log.warning("config section [%s] is not implemented in this build; ignored", p.section)
    errors = [p.line(path) if path and not p.section else str(p) for p in problems if not p.unknown]
    if errors:
        raise ValueError("; ".join(errors))
    return cfg


def read_config(path: str | None, overrides: dict[str, Any] | None = None) -> tuple[Config, list[Problem]]:
    """The config and every problem found in it; it is usable when each problem is `unknown`."""
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            return Config(), [Problem("", "", f"not valid TOML: {exc}")]
        except OSError as exc:
            return Config(), [Problem("", "", f"cannot be read: {exc.strerror or exc}")]
    cfg, problems = Config(), []
    for section, table in raw.items():
        if section not in (*_SECTIONS, "limits", "encoders"):
            problems.append(Problem(section, "", "is not a section this build knows", unknown=True))
        elif not isinstance(table, dict):
            problems.append(Problem(section, "", f"must be a table, got {table!r}"))
        elif section == "encoders":
            cfg.encoders = _encoder_tables(table, problems)
        elif section == "limits":
            cfg.limits = _checked("limits", table, _LIMITS, problems)
        else:
            for key, value in _checked(section, table, _SECTIONS[section], problems).items():
                setattr(cfg, key, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            setattr(cfg, key, value)
    return cfg, problems + _value_problems(cfg)


def encoder_options(name: str, table: dict[str, Any]) -> tuple[EncoderOptions, dict[str, Any]]:
    """An [encoders.NAME] table split into its batching options (the engine's) and the rest (the
    encoder kind's); ValueError names a bad batching value."""
    problems = _batching_problems(name, table)
    if problems:
        raise ValueError(str(problems[0]))
    rest = dict(table)
    return EncoderOptions(**{k: rest.pop(k) for k in _BATCHING if k in rest}), rest


# the engine's options of an encoder table: (types, least value, what it must be)
_BATCHING: dict[str, tuple[type | tuple[type, ...], float, str]] = {
    "max_batch": (int, 1, "an integer >= 1"),
    "max_queue_delay_ms": ((int, float), 0, "a number of milliseconds >= 0"),
}


def _batching_problems(name: str, table: dict[str, Any]) -> list[Problem]:
    out = []
    for key, (types, least, what) in _BATCHING.items():
        value = table.get(key, least)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(value, types)
        if not (number and value >= least):
            out.append(Problem(f"encoders.{name}", key, f"must be {what}, got {value!r}"))
    return out


def _encoder_tables(table: dict[str, Any], problems: list[Problem]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, options in table.items():
        if not isinstance(options, dict):
            problems.append(Problem("encoders", name, f"must be a table [encoders.{name}] of options"))
            continue
        problems += _batching_problems(name, options)
        out[name] = dict(options)
    return out


def _checked(section: str, table: dict[str, Any], known: dict[str, type | tuple[type, ...]],
             problems: list[Problem]) -> dict[str, Any]:
    """The table's known keys, type-checked; the others are problems."""
    out = {}
    for key, value in table.items():
        if key not in known:
            problems.append(Problem(section, key, "is unknown to this build", unknown=True))
        elif isinstance(value, bool) != (known[key] is bool) or not isinstance(value, known[key]):
            types = known[key]
            expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            problems.append(Problem(section, key, f"has the wrong type: {value!r} (expected {expected})"))
        else:
            out[key] = value
    return out


def _value_problems(cfg: Config) -> list[Problem]:
    """Every bad value `_validate` finds. It stops at the first, so each key it names is set back to
    its default in a copy and the copy validated again."""
    trial, out = copy.deepcopy(cfg), []
    for _ in range(len(fields(Config)) + len(_LIMITS)):
        try:
            _validate(trial)
            break
        except ValueError as exc:
            out.append(_named(str(exc)))
            if not _reset(trial, out[-1]):
                break
    return out


def section_of(key: str) -> str:
    """The section a key of `Config` is written in ("" for limits and encoders, tables of their own)."""
    return next((s for s, keys in _SECTIONS.items() if key in keys), "")


def _named(message: str) -> Problem:
    """A `_validate` message ("store.shm_dir '/x' is not a directory") as a Problem."""
    head, _, rest = message.partition(" ")
    section, _, key = head.rstrip(":").rpartition(".")
    section = section or section_of(key)
    if section not in (*_SECTIONS, "limits") or not key:
        return Problem("", "", message)
    return Problem(section, key, rest)


def _reset(cfg: Config, problem: Problem) -> bool:
    """Sets the problem's key back to its default; False when that changes nothing."""
    if problem.section == "limits":
        return cfg.limits.pop(problem.key, None) is not None
    default = {f.name: f for f in fields(Config)}.get(problem.key)
    if default is None:
        return False
    value = default.default_factory() if callable(default.default_factory) else default.default
    if getattr(cfg, problem.key) == value:
        return False
    setattr(cfg, problem.key, value)
    return True


def _validate(cfg: Config) -> None:
    if cfg.log_level and cfg.log_level.upper() not in LOG_LEVELS:
        raise ValueError(f"server.log_level must be one of {', '.join(LOG_LEVELS)}, got {cfg.log_level!r}")
    if cfg.shutdown_grace < 0:
        raise ValueError(f"server.shutdown_grace must be >= 0 seconds, got {cfg.shutdown_grace!r}")
    if cfg.workers < 1:
        raise ValueError(f"server.workers must be >= 1, got {cfg.workers!r}")
    if cfg.max_pixels < 1:
        raise ValueError(f"store.max_pixels must be >= 1, got {cfg.max_pixels!r}")
    if not all(isinstance(r, str) and (os.path.isabs(r) or r.startswith("s3://")) for r in cfg.allowed_roots):
        raise ValueError(f"store.allowed_roots must be absolute paths or s3://bucket/prefix, got {cfg.allowed_roots!r}")
    _validate_remote(cfg)
    if cfg.shm_backend not in ("auto", *BACKENDS):
        raise ValueError(f"store.shm_backend must be one of auto, {', '.join(BACKENDS)}; got {cfg.shm_backend!r}")
    if cfg.shm_backend == "memfd" and not memfd_supported():
        raise ValueError("store.shm_backend is memfd, which this kernel does not support: use dev-shm")
    if cfg.backend() == "dev-shm" and not os.path.isdir(cfg.shm_dir):
        raise ValueError(f"store.shm_dir {cfg.shm_dir!r} is not a directory")
    cfg.shm_capacity()  # parses shm_bytes, naming a bad value
    cfg.disk_capacity()
    cfg.client_leased_bytes_of(cfg.shm_capacity())  # parses and checks every limit, naming a bad one
    if cfg.compression not in COMPRESSIONS:
        raise ValueError(f"store.compression must be one of {sorted(COMPRESSIONS)}, got {cfg.compression!r}")
    if cfg.disk_dir and not os.path.isabs(cfg.disk_dir):
        raise ValueError(f"store.disk_dir must be an absolute path, got {cfg.disk_dir!r}")


def _validate_remote(cfg: Config) -> None:
    """The remote tier's and s3:// sources' keys: URLs that parse, bounds that are positive."""
    from ..engine.objectsources import object_roots  # here: the object-store modules load only for these keys
    from ..store.remoteclient import parse_url

    if cfg.remote:
        try:
            parse_url(cfg.remote)
        except ValueError:
            raise ValueError(f"store.remote must be an s3://bucket/prefix URL, got {cfg.remote!r}") from None
    try:
        object_roots(cfg.allowed_roots)
    except ValueError as exc:
        raise ValueError(f"store.allowed_roots: {exc}") from None
    for key in ("remote_endpoint", "sources_endpoint"):
        url = getattr(cfg, key)
        if url and not (url.startswith(("http://", "https://")) and len(url) > len("https://")):
            raise ValueError(f"store.{key} must be an http:// or https:// URL, got {url!r}")
    if parse_size(cfg.remote_upload_bytes, what="store.remote_upload_bytes") < 1:
        raise ValueError(f"store.remote_upload_bytes must be positive, got {cfg.remote_upload_bytes!r}")
    if cfg.remote_upload_workers < 1:
        raise ValueError(f"store.remote_upload_workers must be >= 1, got {cfg.remote_upload_workers!r}")
    if not cfg.remote_get_timeout > 0:
        raise ValueError(f"store.remote_get_timeout must be > 0 seconds, got {cfg.remote_get_timeout!r}")
