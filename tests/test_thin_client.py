"""The thin client imports and runs with no torch, diffusers or transformers installed."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Makes the heavy packages unimportable, as in a venv that has only the client's dependencies.
BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers", "PIL", "cached", "safetensors"):
            raise ImportError(f"{name} is blocked: the thin client must not need it")
sys.meta_path.insert(0, _Block())
"""


def run_blocked(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code, *args], capture_output=True, text=True,
                          timeout=120, cwd="/")


def test_client_imports_without_heavy_packages():
    r = run_blocked("import cached_client, cached_client.cachectl; print(sorted(cached_client.__all__)[:2])")
    assert r.returncode == 0, r.stderr


def test_client_reads_numpy_views_and_cachectl_runs_without_torch(daemon, images):
    daemon.client().get([__import__("cached_client").ImageSpec(images[0], (64, 64))], encoder="vae")
    code = """
import numpy as np
from cached_client import CacheClient, ImageSpec
[e] = CacheClient(sys.argv[1]).get([ImageSpec(sys.argv[2], (64, 64))], encoder="vae")
assert isinstance(e["latent"], np.ndarray) and e["latent"].shape == (4, 8, 8), e
from cached_client.cachectl import main
sys.exit(main(["--address", sys.argv[1], "stats", "--json"]))
"""
    r = run_blocked(code, daemon.address, images[0])
    assert r.returncode == 0, r.stderr
    assert '"shm"' in r.stdout
