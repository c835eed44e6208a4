"""Operating the config: `cached serve --check-config`, SIGHUP reloads of a running daemon, `cached init`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from conftest import vae_config

from cached.server.cli import main
from cached.server.config import load_config
from cached_client import CacheError, ImageSpec, UnknownEncoder
from cached_testing.harness import ROOT, Daemon, write_config

WAIT_S = 120.0  # bound on waiting for a reload (an added encoder loads in it)


def check(capsys: pytest.CaptureFixture[str], path: str) -> tuple[int, str]:
    rc = main(["serve", "--check-config", "--config", path])
    out = capsys.readouterr()
    return rc, out.out + out.err


def good_config(tmp_path: Any, tiny_vae: str) -> dict[str, dict[str, Any]]:
    config = vae_config(tiny_vae, disk_dir=str(tmp_path / "disk"))
    config["server"] = {"socket": str(tmp_path / "c.sock")}
    return config


def test_check_config_passes_a_good_config(tmp_path, tiny_vae, capsys):
    path = write_config(str(tmp_path / "c.toml"), good_config(tmp_path, tiny_vae))
    rc, out = check(capsys, path)
    assert rc == 0, out
    assert f"{path}: ok" in out
    assert f"socket unix://{tmp_path}/c.sock" in out and "shared memory 64.0 MiB" in out
    assert "vae (diffusers-vae on cpu, fp32)" in out


@pytest.mark.parametrize("edit,expected", [
    (lambda c: c["server"].update(workers=0), "[server] workers: must be >= 1, got 0"),
    (lambda c: c["store"].update(shm_byts="1GiB"), "[store] shm_byts: is unknown to this build"),
    (lambda c: c["encoders"]["vae"].update(path="/nonexistent/vae"), "[encoders.vae] path: '/nonexistent/vae' does not exist"),
    (lambda c: c["encoders"]["vae"].update(dtype="fp8"), "[encoders.vae] dtype: must be one of"),
    (lambda c: c["encoders"]["vae"].update(max_batch=0), "[encoders.vae] max_batch: must be an integer >= 1"),
    (lambda c: c["encoders"]["vae"].update(kind="stable-vae"), "[encoders.vae] kind: must be one of"),
], ids=["bad-value", "unknown-key", "missing-weights", "bad-dtype", "bad-batch", "unknown-kind"])
def test_check_config_names_what_is_wrong_and_where(tmp_path, tiny_vae, capsys, edit, expected):
    config = good_config(tmp_path, tiny_vae)
    edit(config)
    path = write_config(str(tmp_path / "c.toml"), config)
    rc, out = check(capsys, path)
    assert rc == 1
    assert f"{path}: {expected}" in out, out


def test_check_config_reports_every_problem_and_toml_positions(tmp_path, capsys):
    path = str(tmp_path / "c.toml")
    with open(path, "w") as f:
        f.write('[server]\nworkers = 0\n[store]\nshm_bytes = "lots"\ncompression = "zip"\n')
    rc, out = check(capsys, path)
    assert rc == 1
    for line in ("[server] workers:", "[store] shm_bytes:", "[store] compression:"):
        assert f"{path}: {line}" in out, out
    with open(path, "w") as f:
        f.write('[server]\nworkers = 4\n[store\nshm_bytes = "1GiB"\n')
    rc, out = check(capsys, path)
    assert rc == 1 and f"{path}: not valid TOML" in out and "line 3, column 7" in out, out


def test_check_config_from_the_command_line(tmp_path, tiny_vae):
    """The real entry point: one line per problem, no traceback, exit 1."""
    config = good_config(tmp_path, tiny_vae)
    config["encoders"]["vae"]["path"] = str(tmp_path / "missing")
    path = write_config(str(tmp_path / "c.toml"), config)
    proc = subprocess.run([sys.executable, "-m", "cached", "serve", "--check-config", path],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"{path}: [encoders.vae] path: '{tmp_path}/missing' does not exist"


# SIGHUP


def wait_for(what: str, ready: Callable[[], bool], daemon: Daemon) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {WAIT_S} s:\n{daemon.log()}")
        time.sleep(0.1)


def resolve(client: Any, specs: list[ImageSpec], encoder: str, compute: bool = True) -> None:
    """The specs asked of the daemon itself (`get` may answer from this process's handle cache)."""
    resolved = client.resolve(specs, encoder, compute=compute)
    client.release(resolved.lease_ids)
    resolved.check(np.arange(len(specs)))


def serves(client: Any, encoder: str, spec: ImageSpec) -> bool:
    try:
        resolve(client, [spec], encoder)
    except UnknownEncoder:
        return False
    return True


def log_has(daemon: Daemon, text: str) -> Callable[[], bool]:
    return lambda: text in daemon.log()


def test_sighup_adds_and_removes_encoders_without_dropping_entries(daemon_factory, tiny_vae, images):
    config = vae_config(tiny_vae)
    d = daemon_factory(config)
    client = d.client()
    specs = [ImageSpec(p, size=(64, 64)) for p in images[:4]]
    before = [e["latent"].clone() for e in client.get(specs, encoder="vae")]
    entries = client.stats()["tiers"]["shm"]["entries"]

    config["encoders"]["vae2"] = dict(config["encoders"]["vae"], max_batch=4, sample="sample")  # other keys
    d.reload(config)
    wait_for("serving vae2", lambda: serves(client, "vae2", specs[0]), d)
    assert "config reloaded: added vae2; removed nothing" in d.log()
    assert client.health() == "SERVING"

    stats = client.stats()
    resolve(client, specs, "vae", compute=False)  # CacheMiss if a reload dropped them
    after = client.stats()
    assert after["hits"] - stats["hits"] == len(specs) and after["computed"] == stats["computed"]
    again = client.get(specs, encoder="vae", compute=False)
    assert all(torch.equal(e["latent"], b) for e, b in zip(again, before, strict=True))

    del config["encoders"]["vae"]
    d.reload(config)
    wait_for("without vae", lambda: not serves(client, "vae", specs[0]), d)
    with pytest.raises(UnknownEncoder, match="no encoder named 'vae'"):
        resolve(client, specs, "vae", compute=False)
    resolve(client, specs[:1], "vae2", compute=False)
    assert client.stats()["tiers"]["shm"]["entries"] == entries + 1  # vae's entries stay; vae2's one added
    wait_for("vae retired", log_has(d, "encoder vae: removed"), d)


GATED_PLUGIN = """
import os
import time

import torch


class Gated(torch.nn.Module):
    \"\"\"Encodes only once the gate file exists (at most 120 s later): a request held in flight.\"\"\"

    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def forward(self, x):
        open(self.gate + ".entered", "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.05)
        return torch.nn.functional.avg_pool2d(x, 8)


def make(gate):
    return Gated(gate)
"""


def test_sighup_removal_lets_requests_in_flight_finish(daemon_factory, tiny_vae, images, tmp_path):
    plugin, gate = tmp_path / "gatedplug.py", str(tmp_path / "gate")
    plugin.write_text(GATED_PLUGIN)
    config = vae_config(tiny_vae)
    config["encoders"]["gated"] = {"kind": "python", "factory": "gatedplug:make", "path": str(plugin),
                                   "options": {"gate": gate}}
    d = daemon_factory(config)
    client = d.client()
    spec = ImageSpec(images[0], size=(64, 64))
    done: list[Any] = []
    waiter = threading.Thread(target=lambda: done.append(d.client().get([spec], encoder="gated")))
    waiter.start()
    wait_for("encoding in the gated encoder", lambda: os.path.exists(gate + ".entered"), d)

    del config["encoders"]["gated"]
    d.reload(config)
    wait_for("reloaded", log_has(d, "config reloaded: added nothing; removed gated"), d)
    with pytest.raises(UnknownEncoder):
        resolve(client, [ImageSpec(images[1], size=(64, 64))], "gated")
    resolve(client, [spec], "vae")
    assert "encoder gated: removed" not in d.log()  # the request in flight holds it

    open(gate, "w").close()
    waiter.join(WAIT_S)
    [[entry]] = done
    assert entry["latent"].shape == (3, 8, 8)
    wait_for("gated retired", log_has(d, "encoder gated: removed"), d)
    resolve(client, [spec], "vae", compute=False)


def test_sighup_with_a_bad_config_keeps_the_running_one(daemon_factory, tiny_vae, images):
    config = vae_config(tiny_vae)
    d = daemon_factory(config)
    client = d.client()
    spec = ImageSpec(images[0], size=(64, 64))
    client.get([spec], encoder="vae")

    bad = {**config, "encoders": {"vae": config["encoders"]["vae"],
                                  "clip": {"kind": "hf-text", "path": "/nonexistent/clip"}},
           "server": {"workers": 0}}
    d.reload(bad)
    wait_for("rejecting the config", log_has(d, "config not reloaded: 2 problem(s)"), d)
    log = d.log()
    assert "reload: server.workers must be >= 1, got 0" in log
    assert "reload: encoders.clip.path" in log
    assert client.health() == "SERVING"
    resolve(client, [spec], "vae", compute=False)
    with pytest.raises(UnknownEncoder):
        resolve(client, [spec], "clip")

    changed = {**config, "server": {"log_level": "DEBUG"}, "store": {"shm_bytes": "32MiB"},
               "limits": {"max_items": 2, "max_calls": 8},
               "encoders": {"vae": dict(config["encoders"]["vae"], max_batch=2)}}
    d.reload(changed)
    wait_for("a second reload", log_has(d, "config reloaded:"), d)
    log = d.log()
    assert "needs a restart: store.shm_bytes changed" in log and "needs a restart: limits.max_calls" in log
    assert "changed server.log_level, limits.max_items, encoders.vae.max_batch;" in log
    assert client.stats()["encoders"]["vae"]["max_batch"] == 2
    with pytest.raises(CacheError, match="limits.max_items"):
        resolve(client, [ImageSpec(p, size=(64, 64)) for p in images[:3]], "vae")
    resolve(client, [spec], "vae", compute=False)


# cached init


def test_init_writes_a_config_that_loads_and_checks(tmp_path, tiny_vae, capsys):
    out = str(tmp_path / "cached.toml")
    assert main(["init", "--out", out, "--vae", tiny_vae]) == 0
    text = open(out).read()
    values = [line for line in text.splitlines() if " = " in line and not line.startswith("#")]
    assert len(values) >= 14 and all(" # " in line for line in values)  # each value says why
    cfg = load_config(out)
    assert cfg.encoders["vae"]["path"] == tiny_vae and cfg.shm_capacity() > 0
    capsys.readouterr()
    rc, report = check(capsys, out)
    assert rc == 0 and f"{out}: ok" in report, report


def test_init_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "cached.toml"
    out.write_text("# mine\n")
    assert main(["init", "--out", str(out)]) == 1
    assert "FileExistsError" in capsys.readouterr().err and out.read_text() == "# mine\n"
    assert main(["init", "--out", str(out), "--force"]) == 0
    assert load_config(str(out)).encoders == {}  # the example encoder is commented out
    assert main(["init"]) == 0
    assert "[store]" in capsys.readouterr().out and os.path.exists(out)


def test_sighup_under_systemd_sends_reloading_then_ready(tiny_vae, tmp_path):
    from test_systemd import SYSTEMD_VARIABLES, Listener

    listener = Listener(str(tmp_path / "notify.sock"))
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
    env["NOTIFY_SOCKET"] = listener.address
    (tmp_path / "daemon").mkdir()
    d = Daemon(str(tmp_path / "daemon"), vae_config(tiny_vae), env=env)
    try:
        d.start()
        config = vae_config(tiny_vae, limits={"max_items": 8})
        d.reload(config)
        messages: list[list[str]] = []
        deadline = time.monotonic() + WAIT_S
        while not any("RELOADING=1" in m for m in messages) or "READY=1" not in messages[-1]:
            assert time.monotonic() < deadline, f"{messages}\n{d.log()}"
            message = listener.receive(1.0)
            if message is not None:
                messages.append(message[0])
        [reloading] = [m for m in messages if "RELOADING=1" in m]
        [usec] = [f for f in reloading if f.startswith("MONOTONIC_USEC=")]
        assert abs(int(usec.split("=")[1]) - time.monotonic_ns() // 1000) < WAIT_S * 1e6  # CLOCK_MONOTONIC
        assert "config reloaded: added nothing; removed nothing; changed limits.max_items" in d.log()
    finally:
        d.cleanup()
        listener.close()


def test_init_sizes_the_config_for_the_machine_it_describes():
    import tomllib

    from cached.server.initconfig import GiB, Machine, render

    node = Machine([("NVIDIA H100 80GB HBM3", 80 * GiB)] * 8, True, 64, 1024 * GiB, 64 * GiB, False,
                   "/var/cache/cached", 4000 * GiB)
    cfg = tomllib.loads(render(node, "/models/sdxl-vae"))
    vae = cfg["encoders"]["vae"]
    assert vae["devices"] == [f"cuda:{i}" for i in range(8)] and vae["dtype"] == "bf16" and vae["max_batch"] == 32
    assert cfg["store"]["shm_backend"] == "dev-shm"
    assert cfg["store"]["shm_bytes"] == "57GiB"  # a quarter of 1 TiB would not fit a 64 GiB /dev/shm
    assert cfg["store"]["disk_bytes"] == "2000GiB" and cfg["store"]["decode_workers"] == 8

    laptop = Machine([], False, 4, 16 * GiB, 8 * GiB, True, "/home/me/.cache/cached", 1 * GiB)
    text = render(laptop)
    cfg = tomllib.loads(text)
    assert cfg["store"]["shm_backend"] == "memfd" and cfg["store"]["shm_bytes"] == "4GiB"
    assert cfg["store"]["disk_dir"] == "" and "encoders" not in cfg
    assert '# devices = ["cpu"]' in text and "only 1.0 GiB free" in text
