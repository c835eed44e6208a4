"""cachectl for operators against a real daemon: key prefixes, unknown encoders, warm that can't or
needn't do anything, the progress bar, --json everywhere, --config, diagnose with a client that
writes into its views, and top in a terminal (tmux)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import vae_config

from cached_client import ImageSpec
from cached_testing.fixtures import build_tiny_clip, write_images
from cached_testing.harness import Daemon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT_S = 60.0  # bound of every poll below


@pytest.fixture(scope="module")
def daemon(tiny_vae: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon with the tiny VAE and a tiny CLIP whose config file names its socket ([server]
    socket), as a deployed daemon's does."""
    config = vae_config(tiny_vae)
    config["encoders"]["clip"] = {"kind": "hf-text", "path": build_tiny_clip(str(tmp_path_factory.mktemp("clip")))}
    workdir = str(tmp_path_factory.mktemp("daemon"))
    d = Daemon(workdir, {"server": {"socket": os.path.join(workdir, "cached.sock")}, **config})
    d.start()
    yield d
    d.stop()
    d.cleanup()


def cachectl(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cached_client.cachectl", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def ctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess:
    return cachectl("--address", daemon.address, *args)


def last_line(r: subprocess.CompletedProcess) -> str:
    return r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""


def fresh(directory: Any, n: int) -> list[str]:
    """New images no other test has: entries (and keys) of this test's own."""
    return write_images(str(directory), n, [(64, 64)], seed=uuid.uuid4().int % (1 << 32))


def entries(daemon: Daemon, source_prefix: str) -> list[dict[str, Any]]:
    r = ctl(daemon, "ls", "--json", "--limit", "0", "--source-prefix", source_prefix)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["entries"]


# evict --key takes the 16 digits ls prints

def test_evict_by_the_prefix_ls_prints(daemon, tmp_path):
    mine = fresh(tmp_path / "img", 2)
    ctl(daemon, "warm", "--encoder", "vae", "--size", "32x32", *mine)
    before = entries(daemon, str(tmp_path))
    assert {e["tier"] for e in before} == {"shm", "disk"}
    shown = ctl(daemon, "ls", "--source-prefix", str(tmp_path)).stdout.split()[0]
    assert len(shown) == 16
    r = ctl(daemon, "evict", "--key", shown, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["entries"] == 1 and json.loads(r.stdout)["disk_entries"] == 1
    assert {e["key"][:16] for e in entries(daemon, str(tmp_path))} == {e["key"][:16] for e in before} - {shown}


def test_evict_prefix_matching_none_or_several_evicts_nothing(daemon, tmp_path):
    mine = fresh(tmp_path / "img", 20)  # 20 keys: two of them share a first digit
    r = ctl(daemon, "warm", "--encoder", "vae", "--size", "32x32", *mine)
    assert r.returncode == 0, r.stderr
    before = entries(daemon, str(tmp_path))
    keys = sorted({e["key"] for e in before})
    shared = next(a[0] for a, b in zip(keys, keys[1:], strict=False) if a[0] == b[0])
    everywhere = {e["key"] for e in json.loads(ctl(daemon, "ls", "--json", "--limit", "0").stdout)["entries"]}
    absent = next(p for p in (f"{i:04x}" for i in range(1 << 16)) if not any(k.startswith(p) for k in everywhere))
    good = keys[0][:16]
    r = ctl(daemon, "evict", "--key", good, absent)
    assert r.returncode == 1
    assert last_line(r) == f"CacheMiss: no entry's key starts with {absent}", r.stderr
    r = ctl(daemon, "evict", "--key", good, shared)
    assert r.returncode == 1
    assert last_line(r).startswith(f"InvalidSpec: key prefix matches several entries, give more digits: {shared} ("), r.stderr
    assert "Traceback" not in r.stderr
    assert entries(daemon, str(tmp_path)) == before  # nothing evicted, not even the good key
    r = ctl(daemon, "inspect", shared)
    assert r.returncode == 1 and last_line(r).startswith("InvalidSpec: key prefix matches several entries")


# unknown encoders are errors

@pytest.mark.parametrize("command", ["ls", "evict"])
def test_unknown_encoder_is_an_error(daemon, command):
    r = ctl(daemon, command, "--encoder", "nope")
    assert r.returncode == 1
    assert last_line(r) == "UnknownEncoder: no encoder named 'nope' (known: clip, vae)", r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_known_encoder_without_entries_is_no_error(daemon):
    r = ctl(daemon, "ls", "--encoder", "clip", "--json")
    assert r.returncode == 0, r.stderr
    assert all(e["encoder"] == "clip" for e in json.loads(r.stdout)["entries"])


# warm: nothing to do, and items the encoder can't take

@pytest.mark.parametrize("case", ["empty directory", "no image in the directory", "empty manifest"])
def test_warm_with_nothing_to_do_fails(daemon, tmp_path, case):
    folder = tmp_path / "data"
    folder.mkdir()
    if case == "no image in the directory":
        (folder / "notes.txt").write_text("not an image")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n\n")
    where = ["--manifest", str(manifest)] if case == "empty manifest" else [str(folder)]
    r = ctl(daemon, "warm", "--encoder", "vae", "--size", "32x32", *where)
    assert r.returncode == 1
    assert last_line(r).startswith("ValueError: nothing to warm"), r.stderr


def stats(daemon: Daemon) -> dict[str, Any]:
    return json.loads(ctl(daemon, "stats", "--json").stdout)


@pytest.mark.parametrize("encoder,items,message", [
    ("clip", "images", "encoder 'clip' takes text, not images: 3 of 3 items are images"),
    ("vae", "texts", "encoder 'vae' takes images, not text: 2 of 3 items are text"),
])
def test_warm_of_what_the_encoder_cant_take_fails_once(daemon, tmp_path, encoder, items, message):
    mine = fresh(tmp_path / "img", 3)
    manifest = tmp_path / "m.jsonl"
    lines = ([{"path": p, "size": [32, 32]} for p in mine] if items == "images"
             else [{"path": mine[0], "size": [32, 32]}, {"text": "a cat"}, {"text": "a dog"}])
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    before = stats(daemon)
    r = ctl(daemon, "warm", "--encoder", encoder, "--manifest", str(manifest))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"InvalidSpec: {message} (the first: "
                                             f"{mine[0] if items == 'images' else repr('a cat')}); nothing was warmed"]
    after = stats(daemon)
    assert (after["computed"], after["errors"]) == (before["computed"], before["errors"])  # nothing was sent


# the progress bar

def run_in_pty(argv: list[str], timeout: float) -> tuple[int, str]:
    """(exit status, what it wrote to its terminal): stderr on a pty, as a person sees the bar."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, cwd=ROOT)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), out.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_progress_bar_failed_count_only_grows(daemon, tmp_path):
    mine = fresh(tmp_path / "img", 6)
    manifest = tmp_path / "m.jsonl"
    lines = []
    for i, p in enumerate(mine):  # every batch of 2 has one item that fails
        lines += [{"path": p, "size": [32, 32]}, {"path": str(tmp_path / f"gone{i}.png"), "size": [32, 32]}]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc, screen = run_in_pty([sys.executable, "-m", "cached_client.cachectl", "--address", daemon.address, "warm",
                             "--encoder", "vae", "--batch", "2", "--manifest", str(manifest)], timeout=240)
    assert rc == 1
    bars = re.findall(r"\] (\d+)/12 [\d,.]+ items/s (\d+) failed", screen)
    assert bars, screen
    counts = [int(failed) for _, failed in bars]
    assert counts == sorted(counts), counts  # never back to 0 when a new batch starts
    assert counts[-1] == 6
    assert all(int(failed) >= int(done) // 2 for done, failed in bars), bars
    assert screen.count("failed: ") == 6


# --json on every command

@pytest.fixture
def warmed(daemon: Daemon, tmp_path: Any) -> str:
    """The key prefix of an entry of this test's own."""
    mine = fresh(tmp_path / "img", 1)
    daemon.client().warm([ImageSpec(mine[0], (32, 32))], encoder="vae")
    return entries(daemon, mine[0])[0]["key"][:16]


COMMANDS: dict[str, Any] = {
    "health": lambda key, tmp: ["health"],
    "stats": lambda key, tmp: ["stats"],
    "ls": lambda key, tmp: ["ls"],
    "leases": lambda key, tmp: ["leases"],
    "inspect": lambda key, tmp: ["inspect", key],
    "evict": lambda key, tmp: ["evict", "--key", key],
    "import": lambda key, tmp: ["import", "--format", "kohya", "--encoder", "vae", str(tmp)],
    "warm": lambda key, tmp: ["warm", "--encoder", "clip", "--manifest", str(tmp / "texts.jsonl")],
    "diagnose": lambda key, tmp: ["diagnose", "--interval", "0.2"],
    "top": lambda key, tmp: ["top", "--interval", "0.2"],
    "gc": lambda key, tmp: ["gc", "--dry-run"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_prints_one_json_document(daemon, warmed, tmp_path, command):
    (tmp_path / "texts.jsonl").write_text('{"text": "a cat"}\n')
    args = COMMANDS[command](warmed, tmp_path)
    try:  # gc with --config: it sweeps only this daemon's shm directory
        r = cachectl("--config", daemon.config_path, args[0], "--json", *args[1:], timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"cachectl {command} --json did not finish within {WAIT_S} s")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # the whole of stdout is one document
    assert isinstance(report, dict) and report


# --config FILE finds the daemon the way the daemon does

def test_config_file_socket_reaches_the_daemon(daemon):
    env = {k: v for k, v in os.environ.items() if k not in ("CACHED_ADDRESS", "XDG_RUNTIME_DIR")}
    r = cachectl("--config", daemon.config_path, "--timeout", "5", "stats", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["instance"] == daemon.client().stats()["instance"]


# diagnose: two client processes, one of which writes into its views

READER = """
import sys, time
from cached_client import CacheClient, ImageSpec
client = CacheClient(sys.argv[1])
specs = [ImageSpec(p, (32, 32)) for p in sys.argv[3:]]
held = client.get(specs, encoder="vae")
if sys.argv[2] == "write":
    for e in held:
        e["latent"].add_(1)  # into the view: the page becomes a private copy of this process
print("ready", flush=True)
while sys.stdin.readline():  # until the test closes stdin
    pass
"""

LOOPER = """
import sys, time
from cached_client import CacheClient, ImageSpec
client = CacheClient(sys.argv[1])
specs = [ImageSpec(p, (32, 32)) for p in sys.argv[2:]]
leases = []
print("ready", flush=True)
while True:  # the loader's way: one Get per batch, giving back the previous batch's leases
    leases = client.resolve(specs, "vae", release=leases).lease_ids
    time.sleep(0.02)
"""


def start_client(daemon: Daemon, script: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, daemon.address, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        proc.kill()
        pytest.fail(f"client did not start: {line!r} {proc.communicate(timeout=WAIT_S)[1]}")
    return proc


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.kill()
        p.communicate(timeout=WAIT_S)


def test_diagnose_names_both_clients_and_advises_the_writer(daemon, tmp_path):
    mine = fresh(tmp_path / "img", 4)
    reader = start_client(daemon, READER, "read", *mine)
    writer = start_client(daemon, READER, "write", *mine)
    try:
        r = ctl(daemon, "diagnose", "--interval", "0", "--json")
        text = ctl(daemon, "diagnose", "--interval", "0")
    finally:
        stop(reader, writer)
    assert r.returncode == 0 and text.returncode == 0, r.stderr + text.stderr
    report = json.loads(r.stdout)
    rows = {c["pid"]: c for c in report["clients"]}
    for proc in (reader, writer):
        row = rows[proc.pid]
        assert row["readable"], row
        assert row["memory"]["pss"] > 0 and row["memory"]["uss"] > 0
        assert row["leases"] == 4 and row["leased_bytes"] > 0
    assert rows[reader.pid]["memory"]["segments"]["private_dirty"] == 0
    assert rows[writer.pid]["memory"]["segments"]["private_dirty"] > 0
    advice = [a for a in report["recommendations"] if a["problem"] == "private-copies"]
    assert [a["pids"] for a in advice] == [[writer.pid]]
    assert "writes into the views it gets" in advice[0]["text"] and "clone" in advice[0]["text"].lower()
    for proc in (reader, writer):
        assert re.search(rf"pid {proc.pid} uid \d+: PSS [\d.]+ [KMG]iB, USS [\d.]+ [KMG]iB;", text.stdout), text.stdout
    assert f"- pid {writer.pid} (trainer" in text.stdout and "writes into the views it gets" in text.stdout
    assert f"- pid {reader.pid} " not in text.stdout


# top in a terminal

def test_top_in_tmux_shows_a_clients_rate_and_quits_on_q(daemon, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("needs tmux")
    mine = fresh(tmp_path / "img", 4)
    looper = start_client(daemon, LOOPER, *mine)
    server = f"cachectl-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # a private tmux server
    tmux = ["tmux", "-L", server]
    status = tmp_path / "status"
    command = (f"{sys.executable} -m cached_client.cachectl --address {daemon.address} top --interval 0.5; "
               f"echo $? > {status}")
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TMUX")}  # the pane's size
        subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "200", "-y", "50", "-c", ROOT, command],
                       check=True, timeout=WAIT_S, env=env)
        pane, deadline, rate = "", time.monotonic() + WAIT_S, 0.0
        while time.monotonic() < deadline and rate <= 0:
            time.sleep(0.5)
            pane = subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True,
                                  timeout=WAIT_S).stdout
            rows = [line.split() for line in pane.splitlines()]
            rate = max((float(f[2].replace(",", "")) for f in rows if len(f) > 2 and f[0] == str(looper.pid)),
                       default=0.0)
        assert rate > 0, pane
        assert "ITEMS/S" in pane and "(q quits)" in pane
        subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True, timeout=WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not status.exists():
            time.sleep(0.2)
        assert status.exists(), "top did not quit on q"
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not status.read_text().strip():
            time.sleep(0.2)
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=WAIT_S)
        stop(looper)
