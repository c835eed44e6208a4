"""SIGHUP: the daemon re-reads its config file and applies what can change without a restart.

Live: encoders added (loaded while everything else serves, then served by name), encoders removed
(new requests fail with UnknownEncoder, requests in flight finish, their entries stay in the tiers),
an encoder's batching options (max_batch, max_queue_delay_ms), the [limits] that each request reads
afresh (`LIVE_LIMITS`) and server.log_level. Everything else (the socket, the shared memory, the
disk tier, an encoder's weights, ...) is left as it was, with one "needs a restart" log line per key.
A new config with any problem is rejected whole, one log line per problem, and the daemon keeps
running the one it has. Encoders that stay are not touched, so none of their entries is dropped.

Under systemd, RELOADING=1 (with MONOTONIC_USEC=, which newer systemd wants) goes before and READY=1
after, so `systemctl reload cached` shows the reload in progress until added encoders serve.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from ..engine import Batcher, EncoderOptions
from ..engine.batcher import FitLimits
from .config import Config, Problem, encoder_options, section_of

if TYPE_CHECKING:
    from .app import Daemon

__all__ = ["Plan", "Reloader", "plan_reload", "LIVE_LIMITS"]

log = logging.getLogger(__name__)

# [limits] that requests read each time they are checked; the others were built into the gRPC server,
# the servicer or the decode budget at start.
LIVE_LIMITS = frozenset({"max_items", "max_path_depth", "max_text_bytes", "key_memo_bytes", "client_leased_bytes"})
BATCHING = frozenset({"max_batch", "max_queue_delay_ms"})
_OWN_RULES = {"encoders", "limits", "log_level"}  # Config fields compared by rules of their own


@dataclass
class Plan:
    """What a reload changes, from the config running (`old`) to the one read (`new`)."""

    added: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> its table
    removed: list[str] = field(default_factory=list)
    retuned: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> table, new batching
    limits: dict[str, Any] | None = None    # the [limits] to run, when a live one changed
    log_level: str | None = None            # when it changed
    changed: list[str] = field(default_factory=list)   # live keys changed, "limits.max_items"
    restart: list[str] = field(default_factory=list)   # keys changed that need a restart

    def config(self, old: Config) -> Config:
        """The config the daemon runs once this is applied (encoders being added not yet in it)."""
        encoders = {n: t for n, t in old.encoders.items() if n not in self.removed}
        return replace(old, encoders={**encoders, **self.retuned},
                       limits=old.limits if self.limits is None else self.limits,
                       log_level=old.log_level if self.log_level is None else self.log_level)

    def summary(self, failed: list[str]) -> str:
        added = [n for n in self.added if n not in failed]
        return (f"config reloaded: added {_names(added)}; removed {_names(self.removed)}; "
                f"changed {_names(self.changed)}; needs a restart {_names(self.restart)}"
                + (f"; failed to load {_names(failed)}" if failed else ""))


def plan_reload(old: Config, new: Config) -> Plan:
    plan = Plan()
    for f in fields(Config):
        if f.name not in _OWN_RULES and getattr(old, f.name) != getattr(new, f.name):
            plan.restart.append(f"{section_of(f.name)}.{f.name}")
    if old.log_level != new.log_level:
        plan.log_level = new.log_level
        plan.changed.append("server.log_level")
    _plan_limits(plan, old.limits, new.limits)
    for name in old.encoders.keys() - new.encoders.keys():
        plan.removed.append(name)
    for name, table in new.encoders.items():
        if name not in old.encoders:
            plan.added[name] = table
            continue
        was = old.encoders[name]
        keys = sorted(k for k in was.keys() | table.keys() if was.get(k) != table.get(k))
        plan.restart += [f"encoders.{name}.{k}" for k in keys if k not in BATCHING]
        if any(k in BATCHING for k in keys):
            plan.retuned[name] = {**{k: v for k, v in was.items() if k not in BATCHING},
                                  **{k: v for k, v in table.items() if k in BATCHING}}
            plan.changed += [f"encoders.{name}.{k}" for k in keys if k in BATCHING]
    plan.removed.sort()
    return plan


def _plan_limits(plan: Plan, old: dict[str, Any], new: dict[str, Any]) -> None:
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    plan.restart += [f"limits.{k}" for k in keys if k not in LIVE_LIMITS]
    live = [k for k in keys if k in LIVE_LIMITS]
    if live:
        plan.changed += [f"limits.{k}" for k in live]
        plan.limits = {**{k: v for k, v in old.items() if k not in LIVE_LIMITS},
                       **{k: v for k, v in new.items() if k in LIVE_LIMITS}}


def _names(names: list[str]) -> str:
    return ", ".join(names) if names else "nothing"


class Reloader:
    """Reloads on `request()` (safe in a signal handler: it only sets an event), one reload at a
    time, in a thread of its own, so loading an added encoder never holds up a stop."""

    def __init__(self, daemon: Daemon, read: Callable[[], tuple[Config, list[Problem]]],
                 default_level: str = "INFO", wanted: threading.Event | None = None) -> None:
        """`wanted`: the event a SIGHUP sets (one set before this starts is a reload to do now)."""
        self.daemon = daemon
        self.read = read
        self.default_level = default_level  # the log level when the config sets none
        self.reloads = 0
        self._wanted = wanted or threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="reload", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def close(self) -> None:
        """No reload starts after this (one loading an encoder finishes into a stopped daemon)."""
        self._closed = True
        self._wanted.set()

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closed:
                return
            try:
                self.reload()
            except Exception:  # a bug here must not end reloading, nor the daemon
                log.exception("reload failed; still running the previous config")

    def reload(self) -> Plan | None:
        """Applies the config file as it is now; None when it was rejected."""
        notifier = self.daemon.notifier
        notifier.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", "STATUS=reloading the config")
        try:
            return self._reload()
        finally:
            self.reloads += 1
            notifier.send("READY=1", f"STATUS=serving on {self.daemon.target}")

    def _reload(self) -> Plan | None:
        new, problems = self.read()
        for p in problems:
            (log.warning if p.unknown else log.error)("reload: %s%s", p, "; ignored" if p.unknown else "")
        errors = sum(not p.unknown for p in problems)
        if errors:
            log.error("config not reloaded: %d problem(s); still running the previous config", errors)
            return None
        old, daemon = self.daemon.config, self.daemon
        plan = plan_reload(old, new)
        for key in plan.restart:
            log.warning("needs a restart: %s changed (left as it was)", key)
        engine = daemon.engine
        if engine is None or self._closed:
            return None
        for name in plan.removed:
            engine.remove_encoder(name)
        for name, table in plan.retuned.items():
            _retune(engine.batchers[name], encoder_options(name, table)[0])
        running = daemon.config = plan.config(old)
        if plan.limits is not None:
            _apply_limits(daemon, running)
        if plan.log_level is not None:
            logging.getLogger().setLevel(plan.log_level.upper() or self.default_level)
        failed = []
        for name, table in plan.added.items():
            if self._closed:
                break
            try:
                daemon.add_encoder(name, table)
            except Exception as exc:  # noqa: BLE001 - one encoder that fails to load is logged, not fatal
                log.error("reload: encoder %s not added: %s", name, exc)
                failed.append(name)
                continue
            daemon.config = replace(daemon.config, encoders={**daemon.config.encoders, name: table})
            log.info("encoder %s: added", name)
        log.info("%s", plan.summary(failed))
        return plan


def _retune(batcher: Batcher, options: EncoderOptions) -> None:
    """New batching options for a running batcher. A new max_batch starts the out-of-memory limits
    afresh: ones learned under the old maximum may be above the new one."""
    batcher.max_delay_s = options.max_queue_delay_ms / 1000
    if options.max_batch != batcher.max_batch:
        batcher.limits = FitLimits(batcher.encoder.name, options.max_batch)
        batcher.max_batch = options.max_batch


def _apply_limits(daemon: Daemon, config: Config) -> None:
    """The live [limits] of `config` into the objects that check them on every request."""
    limits = config.engine_limits()
    daemon.limits = limits
    if daemon.engine is not None:
        daemon.engine.limits = daemon.engine.items.limits = limits
    if daemon.store is not None:
        daemon.store.owner_cap = config.client_leased_bytes_of(config.shm_capacity())
