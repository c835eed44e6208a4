"""Small things every benchmark uses: system memory readings, the machine's description, summary
statistics and markdown tables. No torch, no daemon: this is imported by DataLoader workers too."""

from __future__ import annotations

import os
import platform
import signal
import statistics
import sys
import threading
from collections.abc import Sequence

__all__ = ["RESULTS", "meminfo", "used_bytes", "MemorySampler", "machine", "median", "percentile",
           "table", "write_result", "mib"]

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # what `make bench` writes

# SIGTERM (bench/run.py stopping a script past its limit) unwinds like an exception, so the `with`
# blocks of a script stop its daemons and remove its temporary directories in /dev/shm and /tmp.
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, rest = line.split(":", 1)
            fields = rest.split()
            out[name] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return out


def used_bytes() -> int:
    """System memory that holds data: anonymous pages plus shared memory (tmpfs, shm segments).

    Unlike USS or RSS this counts a shared page once, whoever maps it, and unlike MemTotal -
    MemAvailable it ignores the page cache the file-based methods leave behind (reclaimable)."""
    m = meminfo()
    return m["AnonPages"] + m["Shmem"]


class MemorySampler:
    """Samples used_bytes() in a thread; `peak` is the highest reading since start."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.baseline = used_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, used_bytes())

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, used_bytes())

    @property
    def delta(self) -> int:
        return self.peak - self.baseline


def mib(n: float) -> float:
    return n / (1 << 20)


def machine() -> dict[str, str]:
    """CPU model, cores, RAM, kernel and the library versions, for the header of every table."""
    import numpy
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "ram": f"{meminfo()['MemTotal'] / (1 << 30):.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "gpu": "none (the daemon encodes on CPU; the benchmarks read cached latents)",
        "load average (1 min) at start": f"{os.getloadavg()[0]:.1f}",
    }


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats keep the precision the caller formatted them with."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(out_dir: str, name: str, text: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")
    return path
