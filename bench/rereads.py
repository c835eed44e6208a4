"""What it costs a re-read to never see bytes a caller wrote into a view (issue 8, item 1).

A client maps each arena MAP_PRIVATE: a write to a view lands in a private copy of the page, which a
later read in the same process must not see. The ways to guarantee that, each timed on a re-read of
one idle entry (its pages mapped from an earlier read, the lease cached) followed by reading its
bytes as a batch gather would (one memcpy into a buffer):

- unprotected: reuse the mapped pages as they are (what main did; wrong after a write);
- pagemap check: one pread of /proc/self/pagemap for the slot's pages, reuse them when none is a
  private copy (cached_client.views.Segment.dirty; what the client does);
- pagemap check after a write: the same when the caller did write: drop the pages, fault them in;
- always drop: MADV_DONTNEED on every re-read, then fault the pages in again;
- private copy: pread the slot from the segment into private memory on every read (a copy flag).

A read-only mapping is not in the table: torch has no read-only tensors, so a write into such a view
is a segfault of the trainer, not an error it could handle.

Runs on one arena file in /dev/shm through the client's own Segment class; no daemon. Writes
results/rereads.md.

    python bench/rereads.py [--reps 2000] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "client"))

from common import RESULTS, machine, table, write_result  # noqa: E402

from cached_client.views import Segment  # noqa: E402

SIZES = {"128KiB": 128 << 10, "512KiB": 512 << 10}
ROUNDS = 5


def _arena(size: int) -> str:
    fd, path = tempfile.mkstemp(prefix="cached-bench-rereads-", dir="/dev/shm")
    with os.fdopen(fd, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8).tobytes())
    return path


def _methods(seg: Segment, n: int, out: np.ndarray) -> dict[str, Callable[[], None]]:
    view = np.frombuffer(seg.map, dtype=np.uint8, count=n)

    def gather(src: np.ndarray) -> None:
        np.copyto(out, src)

    def checked() -> None:
        if seg.dirty(0, n):
            seg.drop_pages(0, n)
        gather(view)

    def written() -> None:
        view[0] = view[0]  # a caller's write: the first page becomes a private copy
        checked()

    def dropped() -> None:
        seg.drop_pages(0, n)
        gather(view)

    return {"unprotected (main; wrong after a write)": lambda: gather(view),
            "pagemap check, pages reused (chosen)": checked,
            "pagemap check after a write (drop, fault in)": written,
            "always drop pages, fault in": dropped,
            "private copy (pread) per read": lambda: gather(seg.clean_copy(0, n))}


def _time_us(fn: Callable[[], None], reps: int) -> float:
    fn()
    t0 = time.perf_counter_ns()
    for _ in range(reps):
        fn()
    return (time.perf_counter_ns() - t0) / reps / 1000


def run(reps: int) -> dict[str, dict[str, float]]:
    """{method: {size: median us per re-read over interleaved rounds}}."""
    samples: dict[str, dict[str, list[float]]] = {}
    for label, n in SIZES.items():
        path = _arena(n)
        try:
            seg = Segment(path)
            methods = _methods(seg, n, np.empty(n, dtype=np.uint8))
            for _ in range(ROUNDS):
                for name, fn in methods.items():
                    samples.setdefault(name, {}).setdefault(label, []).append(_time_us(fn, reps))
        finally:
            os.unlink(path)
    return {m: {s: statistics.median(xs) for s, xs in by.items()} for m, by in samples.items()}


def report(results: dict[str, dict[str, float]], reps: int) -> str:
    base = results["unprotected (main; wrong after a write)"]
    rows = [[m, *(f"{us[s]:.1f} ({us[s] - base[s]:+.1f})" for s in SIZES)] for m, us in results.items()]
    host = machine()
    return "\n\n".join([
        "### Re-reading a view: what never seeing a caller's writes costs",
        f"One idle entry re-read and gathered (one memcpy), us per re-read, median of {ROUNDS} interleaved "
        f"rounds of {reps}; in brackets the cost over the unprotected read. "
        f"{host['cpu']}, kernel {host['kernel']}. Command: `python bench/rereads.py`.",
        table(["method", *(f"us, {s}" for s in SIZES)], rows),
        "The client checks the pagemap: it costs less than any other way, and pages are dropped (and "
        "faulted in again) only where a caller did write.",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    reps = 200 if args.quick else args.reps
    md = report(run(reps), reps)
    write_result(args.out, "rereads.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
