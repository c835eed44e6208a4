"""Read throughput of every reader (readers.py) over the same latents, against the real ceiling:
views at known offsets of one mapped arena, stacked in the trainer's own process.

In-process readers are built first (persistent workers started, one untimed epoch each: page
cache, mappings, handles), then timed in rounds; each round runs every reader for `epochs` epochs,
in an order rotated round by round, so drift on the machine falls on all alike. Each round also
starts fresh trainer processes: one whose first epoch over the warm daemon is timed (the loader,
and the ceiling for reference), and four at once per reader (the loader, the ceiling), whose
items/s are summed. Tables report medians over rounds; ratios are the median of per-round ratios.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any

from common import median, table
from readers import READERS, make_reader, timed

if TYPE_CHECKING:
    from corpus import Corpus
    from methods import Latents

__all__ = ["run", "report", "plot"]

CEILING = "arena, main process (ceiling)"
FRESH = {"loader, first epoch (fresh trainer)": "loader", "ceiling, first epoch (fresh trainer)": CEILING}
MANY = {"loader, 4 trainers at once": "loader", "ceiling, 4 trainers at once": CEILING}
# (numerator, denominator, target): issue 10's
TARGETS = [("loader", CEILING, 0.8), ("loader, first epoch (fresh trainer)", CEILING, 0.5),
           ("handle mode, 4 workers", "arena, 4 workers", 0.9), ("loader, 4 trainers at once", "ceiling, 4 trainers at once", 0.8)]
INFO = [("loader", "arena, prefetching thread"), ("arena, prefetching thread", CEILING),
        ("loader", "safetensors/item, 4 workers"), ("loader", "CachedDataset, 4 workers"),
        ("arena, 4 workers", CEILING)]


def run(corpus: Corpus, rounds: int = 5, epochs: int = 2, process_rounds: int = 3) -> dict[str, dict[str, list[float]]]:
    """{size: {reader: [items/s per round]}}."""
    results: dict[str, dict[str, list[float]]] = {}
    for size, lat in corpus.sizes.items():
        readers = {}
        for name in READERS:
            t0 = time.perf_counter()
            readers[name] = make_reader(name, corpus.address, lat)
            timed(readers[name])
            print(f"  {size} {name}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
        per: dict[str, list[float]] = {name: [] for name in [*READERS, *FRESH, *MANY]}
        try:
            names = list(READERS)
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    per[name].append(timed(readers[name], epochs))
                if r < process_rounds:
                    _process_round(corpus.address, lat, per)
                print(f"  {size} round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:,.0f}" for n, v in per.items() if v),
                      flush=True)
        finally:
            for reader in readers.values():
                if hasattr(reader, "close"):
                    reader.close()
            readers.clear()  # persistent workers shut down now
        results[size] = {k: v for k, v in per.items() if v}
    return results


def _process_round(address: str, lat: Latents, per: dict[str, list[float]]) -> None:
    for label, method in FRESH.items():
        [report] = _trainers(address, lat, method, k=1, epochs=1)
        per[label].append(report["rates"][0])
    for label, method in MANY.items():
        reports = _trainers(address, lat, method, k=4, epochs=2)
        per[label].append(sum(r["items"] for r in reports) / max(r["wall_s"] for r in reports))


def _trainers(address: str, lat: Latents, method: str, k: int, epochs: int) -> list[dict[str, Any]]:
    """k trainer processes started together (readers.py trainer), after a barrier; their reports."""
    with tempfile.TemporaryDirectory(prefix="cached-bench-dl-") as tmp:
        config = os.path.join(tmp, "config.pkl")
        with open(config, "wb") as f:
            pickle.dump({"address": address, "latents": lat, "method": method, "k": k, "epochs": epochs,
                         "barrier": tmp}, f)
        here = os.path.dirname(os.path.abspath(__file__))
        procs = [subprocess.Popen([sys.executable, os.path.join(here, "readers.py"), "trainer", config],
                                  stdout=subprocess.PIPE, text=True) for _ in range(k)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError(f"a {method} trainer failed: exit codes {[p.returncode for p in procs]}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def _paired(per: dict[str, list[float]], a: str, b: str) -> float:
    """a / b as the median over rounds of the ratio within each round (both measured moments apart)."""
    pairs = list(zip(per[a], per[b], strict=False))
    return median([x / y for x, y in pairs])


def report(results: dict[str, dict[str, list[float]]], corpus: Corpus, rounds: int, epochs: int) -> str:
    sizes = list(results)
    methods = list(next(iter(results.values())))
    med = {s: {m: median(v) for m, v in results[s].items()} for s in sizes}
    rows = [[m] + [f"{med[s][m]:,.0f}" for s in sizes] for m in methods]
    ratios = []
    for a, b, target in TARGETS:
        cells = []
        for s in sizes:
            x = _paired(results[s], a, b)
            verdict = "met" if x >= target else f"missed by {100 * (1 - x / target):.0f}%"
            cells.append(f"{x:.2f} ({verdict}; target >= {target})")
        ratios.append([f"{a} / {b}", *cells])
    ratios += [[f"{a} / {b}", *(f"{_paired(results[s], a, b):.2f}" for s in sizes)] for a, b in INFO]
    n = len(next(iter(corpus.sizes.values())))
    shapes = ", ".join(f"{s} = {'x'.join(map(str, lat.shape))} fp32" for s, lat in corpus.sizes.items())
    return "\n\n".join([
        "### Read throughput: items/s, batch 32, shuffled",
        f"{n} latents per size ({shapes}), in shared memory (cached), one arena file in /dev/shm (the "
        f"ceiling) or per-item files in the page cache; in-process readers: median of {rounds} interleaved "
        f"rounds of {epochs} epochs each after an untimed one; fresh trainers: new processes over the warm "
        "daemon, their first epoch; 4 trainers: four processes at once, items/s summed.",
        table(["reader"] + [f"items/s, {s}" for s in sizes], rows),
        table(["ratio (issue 10 target)"] + sizes, ratios),
    ])


def plot(results: dict[str, dict[str, list[float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    methods = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, len(sizes), figsize=(7 * len(sizes), 5), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        values = [median(results[size][m]) for m in methods]
        colors = ["tab:blue" if m.startswith(("loader", "handle")) else "tab:gray" if "ceiling" in m
                  else "tab:orange" for m in methods]
        ax.barh(methods[::-1], values[::-1], color=colors[::-1])
        for y, v in enumerate(values[::-1]):
            ax.text(v, y, f" {v:,.0f}", va="center", fontsize=7)
        ax.set_title(f"{size} latents")
        ax.set_xlabel("items/s (higher is better)")
        ax.set_xlim(0, max(values) * 1.25)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("Reading cached latents: cached (blue) against the main-process arena ceiling (gray)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
