"""Memory for K trainer processes (like DDP ranks on one node) x W DataLoader workers, every
trainer reading the same N latents for a few epochs.

The harness starts K trainer subprocesses at once and samples system memory in use (AnonPages +
Shmem from /proc/meminfo: a shared page counts once) while they run; the table shows the peak over
the baseline taken just before. Trainers wait for each other after loading and again before
exiting, so every trainer's data is alive at the same time. Each trainer also reports the PSS of
its tree (self + workers, at the final barrier) and of each worker after every epoch, which shows
whether a worker's memory grows with the entries it has read.

    python bench/memory.py trainer CONFIG.pkl   # one trainer (the harness runs this)
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common import MemorySampler, mib, table, used_bytes
from methods import METHODS, Latents, NoData, make_loader

if TYPE_CHECKING:
    from corpus import Corpus

__all__ = ["run", "report", "plot", "MEM_METHODS"]

MEM_METHODS = ("cached", "in-RAM fork", "in-RAM spawn")
# the same trainers reading nothing: what the processes themselves cost, per start method
CONTROLS = {f"no data {ctx}": ((lambda addr, lat: NoData(len(lat), lat.shape)), ctx) for ctx in ("fork", "spawn")}


@dataclass
class Trial:
    method: str
    k: int
    workers: int
    delta: int                      # peak system memory in use over the baseline, bytes
    tree_pss: int                   # sum over trainers of their tree's PSS at the final barrier
    worker_pss: list[list[float]] = field(default_factory=list)  # per worker: MiB after each epoch
    wall_s: float = 0.0


# the harness


def run(corpus: Corpus, size: str, ks: tuple[int, ...] = (1, 2, 4), workers: int = 2,
        epochs: int = 3) -> list[Trial]:
    lat = corpus.sizes[size]
    trials = []
    with tempfile.TemporaryDirectory(prefix="cached-bench-mem-") as tmp:
        for k in ks:
            for method in (*CONTROLS, *MEM_METHODS):
                trials.append(_trial(tmp, corpus.address, lat, method, k, workers, epochs))
                t = trials[-1]
                print(f"  memory {method}, K={k} x W={workers}: +{mib(t.delta):,.0f} MiB system, "
                      f"trainers' PSS {mib(t.tree_pss):,.0f} MiB ({t.wall_s:.0f} s)", flush=True)
    return trials


def _trial(tmp: str, address: str, lat: Latents, method: str, k: int, workers: int, epochs: int) -> Trial:
    run_dir = tempfile.mkdtemp(dir=tmp)
    config = os.path.join(run_dir, "config.pkl")
    with open(config, "wb") as f:
        pickle.dump({"address": address, "latents": lat, "method": method, "k": k, "workers": workers,
                     "epochs": epochs, "barrier": run_dir}, f)
    _settle()
    procs: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    try:
        with MemorySampler() as mem:
            procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "trainer", config],
                                      stdout=subprocess.PIPE, text=True) for _ in range(k)]
            while any(p.poll() is None for p in procs):
                if any(p.returncode for p in procs):  # the others would wait for it at the barrier
                    raise RuntimeError(f"a {method} trainer failed: exit codes {[p.poll() for p in procs]}")
                time.sleep(0.05)
            outs = [p.communicate()[0] for p in procs]  # one JSON line each: never fills the pipe
        if any(p.returncode for p in procs):
            raise RuntimeError(f"a {method} trainer failed: exit codes {[p.returncode for p in procs]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    reports = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    return Trial(method, k, workers, mem.delta, sum(r["tree_pss"] for r in reports),
                 [w for r in reports for w in r["worker_pss"]], time.perf_counter() - t0)


def _settle(timeout_s: float = 5.0) -> None:
    """Waits until memory in use stops falling (the last trial's processes are being torn down)."""
    last = used_bytes()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = used_bytes()
        if now >= last - (8 << 20):
            return
        last = now


# one trainer


def _barrier(directory: str, name: str, k: int, timeout_s: float = 600.0) -> None:
    open(os.path.join(directory, f"{name}-{os.getpid()}"), "w").close()
    deadline = time.monotonic() + timeout_s
    while sum(f.startswith(name + "-") for f in os.listdir(directory)) < k:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {name}: fewer than {k} trainers arrived")
        time.sleep(0.01)


def _pss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_full_info().pss


def trainer(config_path: str) -> dict[str, object]:
    import psutil

    with open(config_path, "rb") as f:
        cfg = pickle.load(f)
    dataset, context = {**METHODS, **CONTROLS}[cfg["method"]]
    loader = make_loader(dataset(cfg["address"], cfg["latents"]), cfg["workers"], context,
                         seed=os.getpid())
    _barrier(cfg["barrier"], "ready", cfg["k"])
    worker_pss: dict[int, list[float]] = {}
    for _ in range(cfg["epochs"]):
        for _batch in loader:
            pass
        for child in psutil.Process().children():
            worker_pss.setdefault(child.pid, []).append(round(mib(_pss(child.pid)), 1))
    tree = _pss(os.getpid()) + sum(_pss(c.pid) for c in psutil.Process().children())
    _barrier(cfg["barrier"], "done", cfg["k"])
    return {"tree_pss": tree, "worker_pss": list(worker_pss.values())}


# reporting


def _pss_growth(t: Trial) -> str:
    """Per-worker PSS after the first and the last epoch, worst worker."""
    first = max(w[0] for w in t.worker_pss)
    last = max(w[-1] for w in t.worker_pss)
    return f"{first:,.0f} -> {last:,.0f}"


def _data(t: Trial, trials: list[Trial], one_copy: int) -> tuple[int, int]:
    """Memory the data takes, (by system memory in use, by PSS): the run's minus the no-data run's
    with the same K and start method (the processes themselves), plus, for cached, the one copy
    in the daemon's shared memory, which is there before, during and after the run."""
    control = next(c for c in trials if c.k == t.k and c.method == f"no data {METHODS[t.method][1]}")
    daemon = one_copy if t.method == "cached" else 0
    return t.delta - control.delta + daemon, t.tree_pss - control.tree_pss + daemon


def report(trials: list[Trial], lat: Latents, epochs: int) -> str:
    one_copy = len(lat) * lat.nbytes
    rows = []
    for t in trials:
        row = [t.method, f"{t.k} x {t.workers}", f"{mib(t.delta):,.0f}", f"{mib(t.tree_pss):,.0f}"]
        if t.method in CONTROLS:
            row += ["", "", ""]
        else:
            system, pss = _data(t, trials, one_copy)
            row += [f"{mib(system):,.0f}", f"{mib(pss):,.0f}", f"{system / one_copy:.1f} / {pss / one_copy:.1f}"]
        rows.append(row + [_pss_growth(t)])
    return "\n\n".join([
        f"### Memory: K trainers x W workers, each reading the same {len(lat):,} latents of "
        f"{lat.name} ({mib(one_copy):,.0f} MiB) for {epochs} epochs",
        "System: memory in use (AnonPages + Shmem from /proc/meminfo; a shared page counts once), peak "
        "during the run minus the baseline just before it. PSS: the trainers' own (self + workers, "
        "summed, at the end), which other processes on the machine cannot disturb. Data: the run's "
        "figure minus the no-data run's with the same K and start method (the processes themselves); "
        "cached adds the one copy in the daemon's shared memory, there before and after the run.",
        table(["method", "K x W", "system delta MiB", "PSS MiB", "data MiB, system", "data MiB, PSS",
               "copies of the data, system / PSS", "worst worker PSS MiB, epoch 1 -> last"], rows),
    ])


def plot(trials: list[Trial], lat: Latents, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one_copy = len(lat) * lat.nbytes
    ks = sorted({t.k for t in trials})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for i, (ax, what) in enumerate(zip(axes, ("system memory in use (/proc/meminfo)", "trainers' PSS"),
                                       strict=True)):
        for method in MEM_METHODS:
            ts = [t for t in trials if t.method == method]
            ax.plot([t.k for t in ts], [mib(_data(t, trials, one_copy)[i]) for t in ts], marker="o",
                    label=method, lw=2.5 if method == "cached" else 1.5)
        ax.axhline(mib(one_copy), color="gray", ls=":", label="one copy of the data")
        ax.set_title(f"data, by {what}", fontsize=10)
        ax.set_xticks(ks)
        ax.set_xlabel(f"trainer processes K (x {trials[0].workers} workers each)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("MiB (minus the same trainers reading nothing)")
    fig.suptitle(f"Memory for {len(lat):,} latents of {lat.name} ({mib(one_copy):,.0f} MiB) read by every trainer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__" and sys.argv[1:2] == ["trainer"]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    result = trainer(sys.argv[2])
    print(json.dumps(result), flush=True)
