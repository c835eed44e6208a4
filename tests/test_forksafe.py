"""Forking while another thread is mid-call (a DataLoader starting workers while the sampler sends
prefetch hints) must not leave the child's gRPC hung."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import multiprocessing as mp, sys, threading
from cached_client import CacheClient, ImageSpec
address, path = sys.argv[1:]
spec = [ImageSpec(path, (64, 64))]
client = CacheClient(address)
client.get(spec, encoder="vae")
stop = threading.Event()

def busy():
    while not stop.is_set():
        client.get(spec, encoder="vae")
        client.prefetch(spec, encoder="vae")

threading.Thread(target=busy, daemon=True).start()

def child(q):
    CacheClient(address).get(spec, encoder="vae")
    q.put("ok")

ctx = mp.get_context("fork")
hung = 0
for _ in range(25):
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    p.join(20)
    if p.is_alive():
        hung += 1
        p.kill()
        p.join()
stop.set()
print("hung", hung)
"""


def test_fork_during_calls_in_another_thread(daemon, images):
    daemon.client().get([__import__("cached_client").ImageSpec(images[0], (64, 64))], encoder="vae")
    r = subprocess.run([sys.executable, "-c", SCRIPT, daemon.address, images[0]], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "hung 0"
