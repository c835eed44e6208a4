"""A `cached serve` subprocess on a private socket, shm directory and disk directory: the one daemon
harness of the tests, the benchmarks and anyone scripting the daemon."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from cached_client import CacheClient, DaemonUnavailable, DeadlineExceeded

__all__ = ["Daemon", "write_config"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(path: str, config: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, table in config.items():
        if section == "encoders":
            for name, opts in table.items():
                lines.append(f"[encoders.{name}]")
                lines += [f"{k} = {_toml(v)}" for k, v in opts.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class Daemon:
    """A `cached serve` subprocess with its own socket, shm directory and log file."""

    def __init__(self, workdir: str, config: dict[str, dict[str, Any]], env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:
        self.workdir = workdir
        self.env = env  # the child's whole environment; None: this process's
        self.prefix = prefix or []  # a command that execs the daemon, e.g. into a private mount namespace
        self.socket = os.path.join(workdir, "cached.sock")
        self.shm_dir = tempfile.mkdtemp(prefix="cached-test-", dir="/dev/shm")
        config = {k: dict(v) for k, v in config.items()}
        config.setdefault("store", {}).setdefault("shm_dir", self.shm_dir)
        self.disk_dir = config["store"].setdefault("disk_dir", os.path.join(workdir, "disk"))
        self.config_path = write_config(os.path.join(workdir, "cached.toml"), config)
        self.log_path = os.path.join(workdir, "daemon.log")
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return "unix://" + self.socket

    def launch(self) -> subprocess.Popen:
        """Starts the process without waiting for it to serve."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "cached", "serve", "--config", self.config_path, "--socket", self.socket],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env)
        return self.proc

    def start(self, timeout: float = 120.0) -> Daemon:
        """Starts the process and waits until its health check says SERVING."""
        proc = self.launch()
        client = CacheClient(self.address, connect_timeout=0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode}:\n{self.log()}")
            try:
                if client.health() == "SERVING":
                    return self
            except (DaemonUnavailable, DeadlineExceeded):
                pass  # not listening yet, or too busy loading to answer within the health timeout
            time.sleep(0.1)
        raise RuntimeError(f"daemon not SERVING after {timeout} s:\n{self.log()}")

    def reload(self, config: dict[str, dict[str, Any]]) -> None:
        """Rewrites the config file (this daemon's shm and disk directories kept) and sends SIGHUP."""
        config = {k: dict(v) for k, v in config.items()}
        config.setdefault("store", {}).setdefault("shm_dir", self.shm_dir)
        config["store"].setdefault("disk_dir", self.disk_dir)
        os.replace(write_config(self.config_path + ".new", config), self.config_path)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def client(self, **kwargs: Any) -> CacheClient:
        kwargs.setdefault("connect_timeout", 5.0)
        return CacheClient(self.address, **kwargs)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def segments(self) -> list[str]:
        return sorted(os.listdir(self.shm_dir)) if os.path.isdir(self.shm_dir) else []

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.shm_dir, ignore_errors=True)
