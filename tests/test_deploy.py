"""The deploy files are valid: the unit passes `systemd-analyze verify`, the example config loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from cached.server.config import load_config

DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_file_verifies(tmp_path):
    with open(os.path.join(DEPLOY, "cached.service")) as f:
        unit = f.read()
    assert "ExecStart=/opt/cached/venv/bin/cached serve" in unit
    # verify checks that ExecStart exists: point it at this checkout's entry point
    unit = unit.replace("/opt/cached/venv/bin/cached", os.path.join(os.path.dirname(sys.executable), "cached"))
    path = tmp_path / "cached.service"
    path.write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    problems = [line for line in r.stderr.splitlines() if "cached.service" in line]
    assert r.returncode == 0 and not problems, r.stderr


def test_example_config_loads(tmp_path):
    cfg = load_config(os.path.join(DEPLOY, "cached.toml"), {"shm_bytes": "1MiB"})
    assert cfg.socket == "/run/cached/cached.sock"
    assert cfg.encoders["vae"]["kind"] == "diffusers-vae"
    assert cfg.allowed_roots == ["/data"]
