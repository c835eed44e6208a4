"""`cached serve`: parse flags, configure logging, then import and run the daemon."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

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
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.add_argument("--grace", type=float, help="seconds to drain calls on SIGTERM (server.shutdown_grace, 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("cached")
    # heavy imports (torch, grpc, diffusers) only after logging is set up
    from .app import Daemon
    from .config import load_config

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        config = load_config(args.config, {"shm_bytes": args.shm_bytes, "shm_dir": args.shm_dir,
                                           "tcp": args.tcp, "disk_dir": args.disk_dir})
        daemon = Daemon(config, args.socket)
        daemon.start()
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        log.debug("start failed", exc_info=True)
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    stop.wait()
    grace = config.shutdown_grace if args.grace is None else args.grace
    log.info("signal received: draining for up to %.0f s", grace)
    daemon.stop(grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
