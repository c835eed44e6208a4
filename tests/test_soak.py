"""Many client processes at once for a while: no errors, no wrong values, no leaked leases or fds.

Scaled to the CI machine (16 processes for 15 s); CACHED_SOAK_CLIENTS=64 CACHED_SOAK_S=60 runs the
64-process minute that issue 9 measured.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time

import psutil

from cached_client import CacheClient, ImageSpec

CLIENTS = int(os.environ.get("CACHED_SOAK_CLIENTS", "16"))
SECONDS = float(os.environ.get("CACHED_SOAK_S", "15"))

WORKER = """
import hashlib, json, random, sys, time
from cached_client import CacheClient, ImageSpec
address, expected_path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
expected = json.load(open(expected_path))
specs = [ImageSpec(p, tuple(s), flip=f) for p, s, f in json.load(open(expected_path + ".specs"))]
client = CacheClient(address, tensors="numpy", timeout=60)
rng = random.Random()
calls = errors = wrong = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    batch = rng.sample(specs, 8)
    try:
        for spec, e in zip(batch, client.get(batch, "vae")):
            if hashlib.blake2b(e["latent"].tobytes(), digest_size=16).hexdigest() != expected[spec.wire_json()]:
                wrong += 1
    except Exception as exc:
        errors += 1
        print(type(exc).__name__, exc, file=sys.stderr)
    calls += 1
    if calls % 25 == 0:
        client.close()
print(json.dumps({"calls": calls, "errors": errors, "wrong": wrong}))
"""


def digest(arr) -> str:
    return hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest()


def test_many_client_processes_get_right_values_and_leak_nothing(daemon_factory, tiny_vae, images, tmp_path):
    from conftest import vae_config

    d = daemon_factory(vae_config(tiny_vae))
    specs = [ImageSpec(p, s, flip=f) for p in images for s in ((64, 64), (72, 64)) for f in (False, True)]
    reference = CacheClient(d.address, tensors="numpy")
    expected = {e.spec.wire_json(): digest(e["latent"]) for e in reference.get(specs, "vae")}
    reference.close()
    path = str(tmp_path / "expected.json")
    with open(path, "w") as f:
        json.dump(expected, f)
    with open(path + ".specs", "w") as f:
        json.dump([[s.path, list(s.size), s.flip] for s in specs], f)
    daemon = psutil.Process(d.proc.pid)
    fds_before = daemon.num_fds()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, d.address, path, str(SECONDS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(CLIENTS)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=SECONDS + 300)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert sum(r["calls"] for r in results) > CLIENTS
    assert sum(r["errors"] for r in results) == 0
    assert sum(r["wrong"] for r in results) == 0
    client = CacheClient(d.address)
    deadline = time.monotonic() + 5
    while client.stats()["leases"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.stats()["leases"] == 0  # every process's session ended with it
    assert daemon.num_fds() <= fds_before + 4  # no descriptor left behind per client
