"""`make bench`: every benchmark in one run, tables printed and written to bench/results/.

    .venv/bin/python bench/run.py            # the full run (7-8 minutes on a 2-core VM)
    .venv/bin/python bench/run.py --quick    # a smoke run in a minute; results in a temp dir

Builds the latents once (a daemon plus the same bytes as files and an arena), then runs the
DataLoader, lookup and memory benchmarks over them, then every other script in bench/ (compression,
disk restart, weights loading, encoding: owned by other parts of the project) as a subprocess. The
results include README-table.md: the machine, the command and every table, ready to paste into the
README.

Heavy imports stay inside main(): spawned DataLoader workers re-import this module.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import common  # light (no torch at import); bench/ is on sys.path as the script's directory

HERE = os.path.dirname(os.path.abspath(__file__))
OWN = {"common.py", "corpus.py", "methods.py", "readers.py", "dataloader.py", "lookup.py", "memory.py", "run.py"}


def _peers() -> list[str]:
    """The other benchmark scripts in bench/ (compression, disk restart, weights loading, encoding,
    cluster warm (cluster.py: a second node's cold start from a loopback S3 server, s3:// sources),
    ...), owned by other parts of the project: whichever exist."""
    return sorted(f for f in os.listdir(HERE) if f.endswith(".py") and f not in OWN)


def _settings(quick: bool) -> dict[str, int]:
    if quick:
        return {"n": 128, "rounds": 2, "epochs": 1, "process_rounds": 1, "mem_epochs": 2, "lookup_batch": 64,
                "lookup_reps": 50}
    return {"n": 1024, "rounds": 5, "epochs": 2, "process_rounds": 3, "mem_epochs": 3, "lookup_batch": 256,
            "lookup_reps": 200}


def _peer(script: str, quick: bool, out: str, limit_s: int) -> str | None:
    """Runs a peer benchmark; returns the markdown it wrote (<out or results>/<name>.md), else what
    it printed. Its options are read off its source: --quick and --out are passed when it has them,
    and under --quick a script without a quick mode is skipped (a full run would overwrite its
    committed results)."""
    path = os.path.join(HERE, script)
    with open(path) as f:
        source = f.read()
    if quick and "--quick" not in source:
        print(f"== {script}: skipped (no --quick mode)", flush=True)
        return None
    args = (["--quick"] if quick else []) + (["--out", out] if "--out" in source else [])
    print(f"== {script} {' '.join(args)}", flush=True)
    started = time.time()
    # its own process group, so a hung run is stopped with everything it started (daemons included)
    proc = subprocess.Popen([sys.executable, path, *args], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        print(f"   stopped after {limit_s} s", flush=True)
        return f"_bench/{script} ran past {limit_s} s and was stopped._"
    finally:
        _kill_group(proc)
    print(stdout, flush=True)
    if proc.returncode:
        return f"_bench/{script} failed with exit code {proc.returncode}._"
    results = out if "--out" in source else common.RESULTS
    md = os.path.join(results, script.removesuffix(".py") + ".md")
    if os.path.exists(md) and os.path.getmtime(md) >= started:
        with open(md) as f:
            stdout = f.read()
    return _nest_headings(stdout.strip())


def _nest_headings(md: str) -> str:
    """Markdown headings two levels down, to sit under README-table.md's "### Benchmarks"."""
    lines, fenced = [], False
    for line in md.splitlines():
        fenced ^= line.startswith("```")
        lines.append("##" + line if line.startswith("#") and not fenced else line)
    return "\n".join(lines)


def _kill_group(proc: subprocess.Popen) -> None:
    """Stops whatever of the peer's process group is still running: itself on a timeout or an
    interrupt, a daemon it left behind otherwise. SIGTERM first, so that the script cleans up (its
    daemons, its directories in /dev/shm: common.py), then SIGKILL for what is left after 20 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is still there
    except ProcessLookupError:  # nothing (left) in the group
        pass
    proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny N, few rounds: a smoke run")
    ap.add_argument("--out", help="results directory (default: bench/results, or a temp dir with --quick)")
    ap.add_argument("--skip-peers", action="store_true", help="don't run the other benchmark scripts")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*worker processes in total.*")  # 4 workers on 2 cores, on purpose
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints where a stuck process (or worker) is

    import dataloader
    import lookup
    import memory
    from corpus import corpus

    s = _settings(args.quick)
    out = args.out or (tempfile.mkdtemp(prefix="cached-bench-quick-") if args.quick else common.RESULTS)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    host = common.machine()
    print(f"== building {s['n']} latents per size", flush=True)
    with corpus(s["n"]) as c:
        print(f"   daemon computed {2 * s['n']} latents in {c.warm_s:.0f} s", flush=True)
        print("== read throughput", flush=True)
        dl = dataloader.run(c, rounds=s["rounds"], epochs=s["epochs"], process_rounds=s["process_rounds"])
        dl_md = dataloader.report(dl, c, s["rounds"], s["epochs"])
        dataloader.plot(dl, os.path.join(out, "dataloader.png"))
        common.write_result(out, "dataloader.md", dl_md)
        print(dl_md, flush=True)
        print("== lookup latency", flush=True)
        lk_md = lookup.report(lookup.run(c, reps=s["lookup_reps"], batch=s["lookup_batch"]))
        common.write_result(out, "lookup.md", lk_md)
        print(lk_md, flush=True)
        print("== memory", flush=True)
        size = "512KiB"
        ks = (1, 2) if args.quick else (1, 2, 4)
        trials = memory.run(c, size, ks=ks, workers=2, epochs=s["mem_epochs"])
        mem_md = memory.report(trials, c.sizes[size], s["mem_epochs"])
        memory.plot(trials, c.sizes[size], os.path.join(out, "memory.png"))
        common.write_result(out, "memory.md", mem_md)
        print(mem_md, flush=True)
    peers = [] if args.skip_peers else [md for p in _peers() if (md := _peer(p, args.quick, out, 180 if args.quick else 600))]
    minutes = (time.perf_counter() - t0) / 60
    host["load average (1 min) at end"] = f"{os.getloadavg()[0]:.1f}"
    header = "\n".join([
        "### Benchmarks",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in host.items()) + ".",
        "",
        f"Command: `make bench` (`.venv/bin/python bench/run.py{' --quick' if args.quick else ''}`), "
        f"{minutes:.1f} min in all. Ratios compare methods measured in the same run.",
    ])
    rel = os.path.relpath(out, os.path.dirname(HERE))
    block = "\n\n".join([header, dl_md, f"![Read throughput]({rel}/dataloader.png)",
                         mem_md, f"![Memory vs trainers]({rel}/memory.png)", lk_md, *peers])
    common.write_result(out, "README-table.md", block)
    print(f"== done in {minutes:.1f} min; results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
