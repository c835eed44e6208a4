"""Read throughput with memfd arenas (handed over the socket) against /dev/shm files (mapped by
name): two daemons with the same latents, one per backend, the same readers over each.

Rounds alternate the backends (and which goes first), so drift on the machine falls on both. The
verdict compares the median per-round ratio memfd / dev-shm with the round-to-round spread of the
dev-shm readings themselves: within that spread is within noise.

    .venv/bin/python bench/backends.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import common
from common import median, table

READERS = ("loader, streaming (not resident)", "CachedDataset, 0 workers", "loader")
BACKENDS = ("memfd", "dev-shm")
SIZE = "512KiB"


def run(n: int, rounds: int, epochs: int) -> dict[str, dict[str, list[float]]]:
    """{reader: {backend: [items/s per round]}}."""
    from corpus import corpus
    from readers import make_reader, timed

    per: dict[str, dict[str, list[float]]] = {r: {b: [] for b in BACKENDS} for r in READERS}
    with contextlib.ExitStack() as stack:
        corpora = {b: stack.enter_context(corpus(n, (SIZE,), backend=b)) for b in BACKENDS}
        readers = {}
        for b, c in corpora.items():
            for r in READERS:
                readers[r, b] = make_reader(r, c.address, c.sizes[SIZE])
                timed(readers[r, b])  # mappings, resident handles, page tables
        for i in range(rounds):
            order = BACKENDS if i % 2 == 0 else BACKENDS[::-1]
            for r in READERS:
                for b in order:
                    per[r][b].append(timed(readers[r, b], epochs))
            print(f"  round {i + 1}/{rounds}: " + ", ".join(
                f"{r} {b} {per[r][b][-1]:,.0f}" for r in READERS for b in BACKENDS), flush=True)
        for reader in readers.values():
            if hasattr(reader, "close"):
                reader.close()
    return per


def report(per: dict[str, dict[str, list[float]]], n: int, rounds: int, epochs: int) -> str:
    rows = []
    for r, by in per.items():
        ratios = [m / d for m, d in zip(by["memfd"], by["dev-shm"], strict=True)]
        ratio = median(ratios)
        spread = max(by["dev-shm"]) / min(by["dev-shm"]) - 1
        verdict = "within noise" if abs(ratio - 1) <= spread else ("faster" if ratio > 1 else "slower")
        rows.append([r, f"{median(by['memfd']):,.0f}", f"{median(by['dev-shm']):,.0f}", f"{ratio:.2f}",
                     f"{min(ratios):.2f}-{max(ratios):.2f}", f"±{spread:.0%}", verdict])
    return "\n".join([
        "# memfd arenas vs /dev/shm files",
        "",
        f"{n} latents of {SIZE}, batches of 32, {rounds} rounds of {epochs} epochs, backends alternating; "
        "items/s are medians over rounds, the ratio the median of per-round ratios, the noise the "
        "dev-shm readings' own max/min spread over rounds.",
        "",
        table(["reader", "memfd items/s", "dev-shm items/s", "memfd / dev-shm", "per-round range",
               "dev-shm noise", "verdict"], rows),
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few latents, two rounds: a smoke run")
    ap.add_argument("--out", default=common.RESULTS, help="results directory (default: bench/results)")
    args = ap.parse_args(argv)
    n, rounds, epochs = (128, 2, 1) if args.quick else (1024, 6, 2)
    t0 = time.perf_counter()
    md = report(run(n, rounds, epochs), n, rounds, epochs)
    common.write_result(args.out, "backends.md", md)
    print(md, flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
