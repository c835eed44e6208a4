"""`cached serve --check-config`: a config validated as `serve` (and a reload) would use it, without
starting anything or loading weights.

On top of `read_config` it checks each `[encoders.NAME]` table the way its kind would at load: the
kind exists, required options are there, weight files exist and are readable by this user, devices
and dtype parse. Unknown keys are problems here, although `serve` only warns about them: a typo in a
key silently keeps the default, which is what a check is for.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from cached_client.address import resolve_address
from cached_client.units import format_bytes

from ..encoders import KINDS, options_of
from ..encoders.base import parse_devices, parse_dtype, parse_flag
from .config import Config, Problem, read_config

__all__ = ["check_config", "encoder_problems", "summary"]

_BATCHING = ("max_batch", "max_queue_delay_ms")  # the engine's options, checked by read_config
_PATHS = ("path", "config", "tokenizer")         # options naming files or directories to read


def check_config(path: str | None, overrides: dict[str, Any] | None = None) -> tuple[Config, list[Problem]]:
    """The config and every problem in it, encoder tables included."""
    cfg, problems = read_config(path, overrides)
    for name, table in cfg.encoders.items():
        problems += encoder_problems(name, table)
    return cfg, problems


def encoder_problems(name: str, table: dict[str, Any]) -> list[Problem]:
    """What would stop encoder `name` from loading, found without loading it."""
    from ..encoders import _encoder_class  # the kind's class, imported without building it

    section = f"encoders.{name}"
    options = {k: v for k, v in table.items() if k not in _BATCHING}
    kind = options.pop("kind", None)
    if kind not in KINDS:
        return [Problem(section, "kind", f"must be one of {sorted(KINDS)}, got {kind!r}")]
    cls = _encoder_class(kind)
    params = inspect.signature(cls).parameters
    known = options_of(cls)
    out = [Problem(section, key, f"is not an option of kind {kind}", unknown=True)
           for key in sorted(set(options) - known)]
    out += [Problem(section, key, f"is required by kind {kind}") for key in sorted(known - set(options))
            if params[key].default is inspect.Parameter.empty]
    for key in sorted(set(options) & known):
        what = _option_problem(key, options[key], params[key].default)
        if what:
            out.append(Problem(section, key, what))
    if not out:
        out += _weights_problems(section, kind, name, options)
    return out


def _option_problem(key: str, value: Any, default: Any) -> str | None:
    try:
        if key == "dtype":
            parse_dtype(value)
        elif key == "devices":
            parse_devices(value)
        elif key in _PATHS:
            return _path_problem(value)
        elif isinstance(default, bool):
            parse_flag(key, value)
        elif isinstance(default, (int, float, str)) and (isinstance(value, bool) or not isinstance(value, type(default))):
            return f"must be a {type(default).__name__}, got {value!r}"
    except ValueError as exc:
        return str(exc).removeprefix(f"{key} ")
    return None


def _path_problem(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return f"must be a path, got {value!r}"
    if not os.path.exists(value):
        return f"{value!r} does not exist"
    if not os.access(value, os.R_OK | (os.X_OK if os.path.isdir(value) else 0)):
        return f"{value!r} is not readable by this user (uid {os.getuid()})"
    return None


def _weights_problems(section: str, kind: str, name: str, options: dict[str, Any]) -> list[Problem]:
    """The kind's own lookup of its weight files (the one it runs at load), then their permissions."""
    try:
        if kind == "diffusers-vae":
            from ..encoders.vae import _locate

            _, config_dir, files = _locate(name, options["path"], options.get("config"))
            files = [*files, os.path.join(config_dir, "config.json")]
        elif kind == "hf-text":
            from ..encoders.text import _model_files

            files = [*_model_files(name, options["path"]), os.path.join(options["path"], "config.json")]
        else:
            return []  # a plugin's factory is user code: only running it says whether it loads
    except ValueError as exc:
        return [Problem(section, "path", str(exc).removeprefix(f"encoder {name!r}: "))]
    return [Problem(section, "path", f"{f!r} is not readable by this user (uid {os.getuid()})")
            for f in files if not os.access(f, os.R_OK)]


def summary(cfg: Config, socket: str | None = None) -> str:
    """One paragraph: where the daemon of this config listens, what it holds where, what it encodes."""
    parts = [f"socket {resolve_address(socket, cfg.socket or None)}"]
    if cfg.tcp:
        parts.append(f"tcp {cfg.tcp}")
    if cfg.metrics:
        parts.append(f"metrics on {cfg.metrics}")
    parts.append(f"shared memory {format_bytes(cfg.shm_capacity())} ({cfg.backend()})")
    disk = cfg.disk_directory()
    parts.append(f"disk tier {disk}, {format_bytes(cfg.disk_capacity())} ({cfg.compression})" if disk
                 else "no disk tier")
    if cfg.remote:
        parts.append(f"remote tier {cfg.remote}")
    parts.append(f"sources under {', '.join(cfg.allowed_roots)}" if cfg.allowed_roots
                 else "sources anywhere this daemon can read")
    encoders = [f"{name} ({t.get('kind')} on {', '.join(parse_devices(t.get('devices')))}, {t.get('dtype', 'fp32')})"
                for name, t in cfg.encoders.items()]
    parts.append(f"encoders: {'; '.join(encoders)}" if encoders else "no encoders (every request fails)")
    return "; ".join(parts) + "."
