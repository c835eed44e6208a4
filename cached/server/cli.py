"""`cached serve`, `cached serve --check-config`, `cached init`: parse flags, configure logging, then
import and run the daemon (SIGTERM/SIGINT stop it, SIGHUP reloads its config: reload.py)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cached", description="Latent cache daemon for diffusion training.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon in the foreground (as a systemd service does)")
    s.add_argument("--config", help="TOML config file")
    s.add_argument("--socket", help="unix socket path (overrides the config and CACHED_ADDRESS)")
    s.add_argument("--shm-bytes", help="shared-memory capacity, e.g. 8GiB or 50%% of /dev/shm")
    s.add_argument("--shm-dir", help="tmpfs directory for segments (default /dev/shm)")
    s.add_argument("--disk-dir", help='persistent tier directory ("" turns the disk tier off)')
    s.add_argument("--tcp", help="also listen on HOST:PORT (off by default)")
    s.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="server.log_level, INFO by default")
    s.add_argument("--grace", type=float, help="seconds to drain calls on SIGTERM (server.shutdown_grace, 10)")
    s.add_argument("--check-config", nargs="?", const="", metavar="FILE",
                   help="validate FILE (or --config) as serve would use it, print what is wrong and exit")
    i = sub.add_parser("init", help="write a config sized for this machine, every choice commented")
    i.add_argument("--out", help="file to write (default: print to stdout)")
    i.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    i.add_argument("--vae", metavar="DIR", help="a diffusers VAE directory to configure as encoder vae")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"shm_bytes": args.shm_bytes, "shm_dir": args.shm_dir, "tcp": args.tcp, "disk_dir": args.disk_dir,
            "log_level": args.log_level}


def _check(args: argparse.Namespace) -> int:
    """`--check-config`: `FILE: ok` and a summary, or one `FILE: [section] key: what` per problem."""
    from .checkconfig import check_config, summary

    path = args.check_config or args.config
    name = path or "(no config file)"
    cfg, problems = check_config(path, _overrides(args))
    for p in problems:
        print(p.line(name), file=sys.stderr)
    if problems:
        return 1
    print(f"{name}: ok\n{summary(cfg, args.socket)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = getattr(args, "log_level", None) or "INFO"
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("cached")
    try:
        if args.command == "init":
            from .initconfig import write_init

            return write_init(args.out, args.force, args.vae)
        if args.check_config is not None:
            return _check(args)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        log.debug("%s failed", args.command, exc_info=True)
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    # heavy imports (torch, grpc, diffusers) only after logging is set up
    from .app import Daemon
    from .checkconfig import check_config
    from .config import load_config
    from .notify import Notifier
    from .reload import Reloader

    stop, reload_wanted = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload_wanted.set())  # one while starting is done once serving
    try:
        config = load_config(args.config, _overrides(args))
        if config.log_level:
            logging.getLogger().setLevel(config.log_level.upper())
        daemon = Daemon(config, args.socket, Notifier.from_environ(os.environ, os.getpid()))
        daemon.start()
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        log.debug("start failed", exc_info=True)
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    reloader = Reloader(daemon, lambda: check_config(args.config, _overrides(args)), level, reload_wanted)
    stop.wait()
    reloader.close()
    grace = config.shutdown_grace if args.grace is None else args.grace
    log.info("signal received: draining for up to %.0f s", grace)
    daemon.stop(grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
