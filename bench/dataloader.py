"""DataLoader items/s for one trainer with 4 workers, every method over the same latents.

All loaders of a size are built first (persistent workers, one untimed epoch each), then timed in
rounds; each round runs every method once, in an order rotated round by round, so drift on the
machine (other processes, thermal, page cache) falls on all methods alike. The table reports the
median round.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from common import median, table
from methods import METHODS, Latents, make_loader
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from corpus import Corpus

__all__ = ["run", "report", "plot"]

TARGETS = {"shm ceiling": 0.9, "safetensors/item": 1.5}  # cached >= target x method (DESIGN.md)


def _timed_pass(loader: DataLoader, epochs: int) -> float:
    """items/s over `epochs` full passes."""
    items = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            items += batch.shape[0]
    return items / (time.perf_counter() - t0)


def _loaders(corpus: Corpus, lat: Latents, workers: int, batch_size: int) -> Iterator[tuple[str, DataLoader]]:
    for name, (dataset, context) in METHODS.items():
        t0 = time.perf_counter()
        loader = make_loader(dataset(corpus.address, lat), workers, context, batch_size)
        _timed_pass(loader, 1)  # starts the workers, maps files, fills handle caches and page cache
        print(f"  {lat.name} {name}: workers started, first epoch read in {time.perf_counter() - t0:.1f} s",
              flush=True)
        yield name, loader


def run(corpus: Corpus, rounds: int = 5, epochs: int = 2, workers: int = 4,
        batch_size: int = 32) -> dict[str, dict[str, list[float]]]:
    """{size: {method: [items/s per round]}}."""
    results: dict[str, dict[str, list[float]]] = {}
    for size, lat in corpus.sizes.items():
        loaders = dict(_loaders(corpus, lat, workers, batch_size))
        try:
            names = list(loaders)
            per = results[size] = {name: [] for name in names}
            for r in range(rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    per[name].append(_timed_pass(loaders[name], epochs))
                print(f"  {size} round {r + 1}/{rounds}: "
                      + ", ".join(f"{n} {per[n][-1]:,.0f}" for n in names), flush=True)
        finally:
            loaders.clear()  # the persistent workers shut down now, not at exit
    return results


def _paired(per: dict[str, list[float]], a: str, b: str) -> float:
    """a / b as the median over rounds of the ratio within each round: both were measured moments
    apart, so drift between rounds cancels."""
    return median([x / y for x, y in zip(per[a], per[b], strict=True)])


def _ratio(per: dict[str, list[float]], other: str, target: float) -> str:
    x = _paired(per, "cached", other)
    verdict = "met" if x >= target else f"missed by {100 * (1 - x / target):.0f}%"
    return f"{x:.2f} ({verdict}; target >= {target})"


def report(results: dict[str, dict[str, list[float]]], corpus: Corpus, workers: int, batch_size: int,
           rounds: int) -> str:
    sizes = list(results)
    methods = list(next(iter(results.values())))
    med = {s: {m: median(v) for m, v in results[s].items()} for s in sizes}
    rows = [[m] + [f"{med[s][m]:,.0f}" for s in sizes] for m in methods]
    ratios = [[f"cached / {m}"] + [_ratio(results[s], m, t) for s in sizes] for m, t in TARGETS.items()]
    ratios.append(["shm ceiling / safetensors/item (the most any shm reader gets here)"]
                  + [f"{_paired(results[s], 'shm ceiling', 'safetensors/item'):.2f}" for s in sizes])
    n = len(next(iter(corpus.sizes.values())))
    shapes = ", ".join(f"{s} = {'x'.join(map(str, lat.shape))} fp32" for s, lat in corpus.sizes.items())
    return "\n\n".join([
        f"### DataLoader items/s: one trainer, {workers} workers (fork unless noted), batch {batch_size}",
        f"{n} latents per size ({shapes}), shuffled, median of {rounds} interleaved rounds; "
        "per-item files are in the page cache (no disk reads timed).",
        table(["method"] + [f"items/s, {s}" for s in sizes], rows),
        table(["ratio (DESIGN.md target)"] + sizes, ratios),
    ])


def plot(results: dict[str, dict[str, list[float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    methods = list(next(iter(results.values())))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        values = [median(results[size][m]) for m in methods]
        colors = ["tab:blue" if m == "cached" else "tab:gray" if m == "shm ceiling" else "tab:orange"
                  for m in methods]
        ax.barh(methods[::-1], values[::-1], color=colors[::-1])
        for y, v in enumerate(values[::-1]):
            ax.text(v, y, f" {v:,.0f}", va="center", fontsize=8)
        ax.set_title(f"{size} latents")
        ax.set_xlabel("items/s (higher is better)")
        ax.set_xlim(0, max(values) * 1.2)
    fig.suptitle("DataLoader throughput, one trainer x 4 workers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
