"""Verified callers: leases bind to a process the kernel vouches for (the identity socket's session),
nothing a request says about its sender is trusted, and a process that goes gives its leases back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from conftest import vae_config

from cached_client import CacheClient, ImageSpec, LimitExceeded
from cached_client._proto import cache_pb2 as pb
from cached_client._proto import cache_pb2_grpc
from cached_client.session import SESSION_METADATA


def leases(client: CacheClient) -> int:
    return client.stats()["leases"]


def wait_until(predicate, timeout: float = 10.0) -> float:
    """Seconds until `predicate()` held; fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_request_without_a_session_or_with_a_forged_one_is_refused(daemon, images):
    spec = ImageSpec(images[0], (64, 64))
    channel = grpc.insecure_channel(daemon.address)
    stub = cache_pb2_grpc.CacheStub(channel)
    forged = pb.GetRequest(encoder="vae", specs=spec.wire_json().encode(),
                           owner=pb.Owner(pid=1, start_time=0.0, client_id="init", pid_ns=12345))
    for metadata in [(), ((SESSION_METADATA, "0" * 32),)]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Get(forged, metadata=metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    channel.close()


HOLDER = """
import sys, time
from cached_client import CacheClient, ImageSpec
client = CacheClient(sys.argv[1])
held = client.get([ImageSpec(p, (64, 64), flip=f) for p in sys.argv[2:] for f in (False, True)], encoder="vae")
print("holding", flush=True)
time.sleep(600)
"""


def start_holder(daemon, images, *prefix: str) -> subprocess.Popen:
    proc = subprocess.Popen([*prefix, sys.executable, "-c", HOLDER, daemon.address, *images],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_leases_of_a_killed_client_are_back_within_a_second(daemon, images):
    client = daemon.client()
    before = leases(client)
    holder = start_holder(daemon, images[:6])
    assert leases(client) == before + 12
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert wait_until(lambda: leases(client) == before) < 1.0
    assert client.evict(all=True, tier="shm")["pending"] == 0  # nothing left pinned


FORKER = """
import os, sys, time
from cached_client import CacheClient, ImageSpec
client = CacheClient(sys.argv[1])
held = client.get([ImageSpec(p, (72, 64)) for p in sys.argv[2:]], encoder="vae")
if os.fork() == 0:          # a child that outlives its parent, holding the parent's socket fd if any
    time.sleep(600)
print(os.getpid(), flush=True)
time.sleep(600)
"""


def test_a_forked_child_does_not_keep_its_parents_leases(daemon, images):
    client = daemon.client()
    before = leases(client)
    parent = subprocess.Popen([sys.executable, "-c", FORKER, daemon.address, *images[:5]],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        int(parent.stdout.readline())
        assert leases(client) == before + 5
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_until(lambda: leases(client) == before, timeout=2.0)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)


def test_a_client_in_another_pid_namespace_gives_its_leases_back(daemon, images):
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode:
        pytest.skip("unshare of a pid namespace is not allowed here")
    client = daemon.client()
    before = leases(client)
    holder = start_holder(daemon, images[6:9], "unshare", "--pid", "--fork", "--mount-proc", "--kill-child")
    assert leases(client) == before + 6
    holder.send_signal(signal.SIGKILL)  # unshare dies; --kill-child takes the client with it
    holder.wait()
    assert wait_until(lambda: leases(client) == before) < 1.0


def test_one_client_cannot_hold_more_than_its_cap(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae, {"client_leased_bytes": "16KiB"}, shm_bytes="256KiB"))
    greedy, honest = d.client(), d.client()
    specs = [ImageSpec(p, (64, 64), flip=f) for p in images for f in (False, True)]  # one page each
    held = greedy.get(specs[:4], encoder="vae")
    with pytest.raises(LimitExceeded, match="client_leased_bytes"):
        greedy.get(specs[4:5], encoder="vae")
    other = subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(600)", ""), d.address, *images[:2]],
                           capture_output=True, text=True, timeout=120)
    assert other.returncode == 0, other.stderr  # another process is not starved by the greedy one
    del held
    assert len(honest.get(specs[4:8], encoder="vae")) == 4  # idle leases go back, then it fits


def test_the_identity_socket_refuses_what_is_not_a_hello(daemon):
    import json
    import socket

    from cached_client.session import identity_socket

    for message in [b"GET / HTTP/1.0\r\n\r\n", json.dumps({"op": "hello", "version": 99}).encode()]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(5)
        s.connect(identity_socket(daemon.socket))
        s.send(message)
        assert s.recv(4096) == b""  # closed without a session
        s.close()
    assert daemon.client().stats()["instance"]  # still serving
