"""A shared daemon nobody can hurt: hostile sources, callers without the rights, requests that try to
exhaust memory, threads or time. Every test injects the fault for real and checks that the daemon
still answers Stats within a second afterwards."""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import psutil
import pytest
from conftest import vae_config
from PIL import Image

from cached_client import (
    Busy,
    CacheClient,
    Cancelled,
    DeadlineExceeded,
    ImageSpec,
    LimitExceeded,
    SourceError,
    SourceNotAllowed,
)
from cached_client._proto import cache_pb2 as pb
from cached_testing.fixtures import settle
from cached_testing.harness import Daemon

GROUP, USER = "cached-hostile", "cached-hostile-u"


def stats_within_a_second(d: Daemon) -> None:
    t0 = time.monotonic()
    assert CacheClient(d.address, timeout=1.0, connect_timeout=1.0).stats()["instance"]
    assert time.monotonic() - t0 < 1.0


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """A directory every user may search (pytest's own are 0700): roots, images, sockets."""
    path = tempfile.mkdtemp(prefix="cached-hostile-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def test_user():
    """A throwaway system user in a throwaway group (the daemon's socket group)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to make a second user")
    subprocess.run(["groupadd", "--system", GROUP], capture_output=True)
    subprocess.run(["useradd", "--system", "--no-create-home", "-g", GROUP, USER], capture_output=True)
    try:
        yield pwd.getpwnam(USER), grp.getgrnam(GROUP)
    finally:
        subprocess.run(["userdel", USER], capture_output=True)
        subprocess.run(["groupdel", GROUP], capture_output=True)


@pytest.fixture(scope="module")
def hostile(tiny_vae, public, test_user, images):
    """A daemon whose sources must lie under <public>/root, whose socket belongs to the test group."""
    root = os.path.join(public, "root")
    os.makedirs(os.path.join(root, "d"))
    os.makedirs(os.path.join(public, "outside", "d"))
    for name, source in (("a.png", images[0]), ("b.png", images[1])):
        shutil.copy(source, os.path.join(root, "d", name))
        shutil.copy(images[5], os.path.join(public, "outside", "d", name))  # other pixels, same names
    for dirpath, dirnames, filenames in os.walk(public):
        for n in dirnames:
            os.chmod(os.path.join(dirpath, n), 0o755)
        for n in filenames:
            os.chmod(os.path.join(dirpath, n), 0o644)
    settle(public)
    config = vae_config(tiny_vae, allowed_roots=[root])
    config["server"] = {"group": GROUP}
    work = os.path.join(public, "daemon")
    os.makedirs(work, mode=0o755)
    d = Daemon(work, config)
    os.chmod(d.shm_dir, 0o750)
    os.chown(d.shm_dir, -1, test_user[1].gr_gid)
    d.start()
    yield d, root
    d.stop()
    d.cleanup()


# sources

RENAME_EXCHANGE = 2


def _exchanger(a: str, b: str, stop: threading.Event) -> None:
    """Swaps two names atomically (renameat2 RENAME_EXCHANGE) as fast as it can until told to stop."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    while not stop.is_set():
        libc.renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), RENAME_EXCHANGE)


def test_swapping_a_directory_for_a_symlink_never_serves_an_outside_file(hostile, public):
    d, root = hostile
    client = d.client()
    sizes = [(64, 64), (72, 64), (64, 72), (80, 64)]
    inside = {s: client.get([ImageSpec(os.path.join(root, "d", "a.png"), s)], "vae")[0].key for s in sizes}
    link = os.path.join(root, "swap")
    os.symlink(os.path.join(public, "outside", "d"), link)
    os.symlink(os.path.join(root, "d"), os.path.join(root, "via"))  # root/via -> root/d, swapped with swap
    stop = threading.Event()
    swapper = threading.Thread(target=_exchanger, args=(os.path.join(root, "via"), link, stop), daemon=True)
    swapper.start()
    served = refused = 0
    try:
        for i in range(400):
            spec = ImageSpec(os.path.join(root, "via", "a.png"), sizes[i % len(sizes)], flip=bool(i % 2))
            try:
                [e] = CacheClient(d.address).get([spec], "vae")
            except (SourceNotAllowed, SourceError):
                refused += 1
                continue
            served += 1
            if not spec.flip:
                assert e.key == inside[spec.size], "an outside file was served"
    finally:
        stop.set()
        swapper.join()
        for name in ("via", "swap"):
            os.unlink(os.path.join(root, name))
    assert served and refused  # the race was really run both ways
    stats_within_a_second(d)


def test_a_fifo_fails_at_once_and_holds_no_thread(hostile):
    d, root = hostile
    fifo = os.path.join(root, "f.png")
    os.mkfifo(fifo)
    try:
        client = d.client(connect_timeout=1)
        errors: list[BaseException] = []

        def ask() -> None:
            try:
                client.get([ImageSpec(fifo, (64, 64))], "vae")
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)

        threads = [threading.Thread(target=ask) for _ in range(40)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert time.monotonic() - t0 < 20
        assert len(errors) == 40 and all(isinstance(e, SourceError) and "regular file" in str(e) for e in errors)
        stats_within_a_second(d)
    finally:
        os.unlink(fifo)


def test_a_sparse_file_and_a_device_are_refused_unread(hostile):
    d, root = hostile
    sparse, device = os.path.join(root, "sparse.png"), os.path.join(root, "urandom.png")
    with open(sparse, "wb") as f:
        f.truncate(3 << 30)
    os.mknod(device, 0o644 | 0o020000, os.makedev(1, 9))  # a character device: /dev/urandom's numbers
    rss = psutil.Process(d.proc.pid).memory_info().rss
    try:
        with pytest.raises(LimitExceeded, match="max_source_bytes"):
            d.client().get([ImageSpec(sparse, (64, 64))], "vae")
        with pytest.raises(SourceError, match="regular file"):
            d.client().get([ImageSpec(device, (64, 64))], "vae")
        assert psutil.Process(d.proc.pid).memory_info().rss - rss < 64 << 20
        stats_within_a_second(d)
    finally:
        os.unlink(sparse)
        os.unlink(device)


# callers

AS_USER = """
import json, os, sys
import grpc._channel
from cached_client import CacheClient, ImageSpec
client = CacheClient(sys.argv[1], tensors="numpy")
os.setgroups([{gid}])
os.setgid({gid})
os.setuid({uid})
out = []
for path in sys.argv[2:]:
    try:
        [e] = client.get([ImageSpec(path, (64, 64))], "vae")
        out.append(["ok", e.key])
    except Exception as exc:
        out.append([type(exc).__name__, str(exc)])
print(json.dumps(out))
"""


def as_user(user, group, address: str, *paths: str) -> list[list[str]]:
    import json

    code = AS_USER.format(uid=user.pw_uid, gid=group.gr_gid)
    r = subprocess.run([sys.executable, "-c", code, address, *paths], capture_output=True, text=True,
                       timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_caller_gets_latents_only_of_files_it_could_read(hostile, test_user, images):
    d, root = hostile
    user, group = test_user
    private_dir = os.path.join(root, "private")
    os.makedirs(private_dir, mode=0o700, exist_ok=True)
    secret = os.path.join(root, "d", "secret.png")
    shutil.copy(images[2], secret)
    os.chmod(secret, 0o600)
    hidden = os.path.join(private_dir, "hidden.png")
    shutil.copy(images[3], hidden)
    readable = os.path.join(root, "d", "a.png")
    try:
        d.client().get([ImageSpec(secret, (64, 64))], "vae")  # root may, and fills the daemon's memo
        results = as_user(user, group, d.address, readable, secret, hidden,
                          os.path.join(private_dir, "missing.png"), os.path.join(root, "d", "missing.png"))
        ok, secret_r, hidden_r, hidden_missing, missing = results
        assert ok[0] == "ok"
        assert secret_r[0] == hidden_r[0] == hidden_missing[0] == "SourceNotAllowed"
        # a file it may not read and a file that does not exist in a directory it can't search
        # are refused alike: the answer does not tell whether the file exists
        assert hidden_r[1].replace("hidden.png", "X") == hidden_missing[1].replace("missing.png", "X")
        assert missing == ["SourceError", f"item 0: {os.path.join(root, 'd', 'missing.png')}: no such file"]
        stats_within_a_second(d)
    finally:
        os.unlink(secret)
        shutil.rmtree(private_dir)


def test_a_member_of_the_group_holds_leases_of_its_own(hostile, test_user):
    d, root = hostile
    user, group = test_user
    before = CacheClient(d.address).stats()["leases"]
    [[status, key]] = as_user(user, group, d.address, os.path.join(root, "d", "b.png"))
    assert status == "ok" and len(key) == 64
    deadline = time.monotonic() + 5
    while CacheClient(d.address).stats()["leases"] != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert CacheClient(d.address).stats()["leases"] == before  # its session ended with it


# bounded requests

def raw_get(d: Daemon, specs: bytes, timeout: float = 30) -> pb.GetResponse:
    client = d.client()
    return client._process().stub.Get(pb.GetRequest(encoder="vae", specs=specs, compute=True), timeout=timeout,
                                      metadata=client._credentials())


def test_a_request_of_four_million_empty_lines_is_refused_at_once(hostile):
    d, _ = hostile
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        raw_get(d, b"\n" * (4 << 20))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_items" in err.value.details()
    assert time.monotonic() - t0 < 5
    with pytest.raises(grpc.RpcError) as err:
        raw_get(d, b"x" * (20 << 20))  # past limits.max_request_bytes: gRPC refuses it unread
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    stats_within_a_second(d)


def test_padded_copies_of_a_line_do_not_fill_the_key_memo(hostile):
    d, root = hostile
    path = os.path.join(root, "d", "a.png")
    raw_get(d, ImageSpec(path, (48, 48)).wire_json().encode())
    before = d.client().stats()["key_memo_bytes"]
    for n in range(1, 201):
        line = f'["i", "{path}",{" " * n}48, 48, "center", false]'.encode()
        reply = raw_get(d, line)
        assert not reply.errors
    assert d.client().stats()["key_memo_bytes"] == before


def test_many_misses_stream_through_a_bounded_decode(daemon_factory, tiny_vae, images):
    budget = 4 << 20
    d = daemon_factory(vae_config(tiny_vae, {"decoded_bytes_in_flight": budget}))
    specs = [ImageSpec(p, (64, 64), crop=(i, i, i + 128, i + 128)) for i in range(12) for p in images]  # 144
    peak, done = [0], threading.Event()

    def watch() -> None:
        watcher = d.client()
        while not done.is_set():
            peak[0] = max(peak[0], watcher.stats()["decoded_bytes_in_flight"])
            time.sleep(0.01)

    t = threading.Thread(target=watch)
    t.start()
    try:
        entries = d.client(timeout=300).get(specs, "vae")
    finally:
        done.set()
        t.join()
    assert len(entries) == len(specs)
    assert 0 < peak[0] <= budget
    enc = d.client().stats()["encoders"]["vae"]
    assert enc["items"] == len(specs) and enc["batches"] >= len(specs) // 32


def test_store_max_pixels_is_the_limit_that_applies(daemon_factory, tiny_vae, tmp_path):
    big = str(tmp_path / "big.png")
    Image.new("L", (9600, 9600), 128).save(big)  # 92 Mpx: past Pillow's own 89.5 Mpx guard
    d = daemon_factory(vae_config(tiny_vae, max_pixels=100_000_000))
    [e] = d.client(timeout=120).get([ImageSpec(big, (64, 64))], "vae")
    assert e["latent"].shape == (4, 8, 8)
    small = daemon_factory(vae_config(tiny_vae, max_pixels=50_000_000))
    with pytest.raises(SourceError, match="store.max_pixels"):
        small.client().get([ImageSpec(big, (64, 64))], "vae")


def test_work_for_a_call_whose_deadline_passed_stops(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae))
    specs = [ImageSpec(p, (128, 128), crop=(i, 0, i + 160, 160)) for i in range(30) for p in images]  # 360
    with pytest.raises(DeadlineExceeded):
        d.client(timeout=1.0, connect_timeout=0).get(specs, "vae")
    # the batch being encoded when the deadline passed finishes; nothing after it starts: the count
    # settles (two readings 2 s apart agree) well short of every item
    def items() -> int:
        return d.client().stats()["encoders"]["vae"]["items"]

    before, deadline = -1, time.monotonic() + 60
    while (now := items()) != before and time.monotonic() < deadline:
        before = now
        time.sleep(2)
    assert now == before < len(specs)
    stats_within_a_second(d)


def test_a_full_daemon_answers_busy_instead_of_queueing(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae, {"max_calls": 1}))
    specs = [ImageSpec(p, (128, 128), crop=(i, 0, i + 160, 160)) for i in range(10) for p in images]
    long = threading.Thread(target=lambda: d.client(timeout=300).get(specs, "vae"))
    long.start()
    try:
        deadline = time.monotonic() + 30
        while d.client().stats()["encoders"]["vae"]["items"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(Busy, match="max_calls"):
            d.client(connect_timeout=0).get([ImageSpec(images[0], (64, 64))], "vae")
        stats_within_a_second(d)
        [e] = d.client(connect_timeout=120).get([ImageSpec(images[0], (64, 64))], "vae")  # retried until free
        assert e.key
    finally:
        long.join()


SLOW = '''
import time
import torch


class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 4, 8, stride=8)

    def forward(self, x):
        time.sleep(0.25)
        return self.proj(x)


def make():
    torch.manual_seed(0)
    return Slow()
'''


def test_sigterm_with_work_queued_stops_within_the_grace(daemon_factory, tmp_path, images):
    (tmp_path / "slow_plugin.py").write_text(SLOW)
    d = daemon_factory({"server": {"shutdown_grace": 3}, "store": {"shm_bytes": "64MiB"},
                        "encoders": {"slow": {"kind": "python", "factory": "slow_plugin:make",
                                              "path": str(tmp_path / "slow_plugin.py"), "max_batch": 4}}})
    specs = [ImageSpec(p, (64, 64), crop=(i, 0, i + 128, 128)) for i in range(40) for p in images]  # 480
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            d.client(timeout=None, connect_timeout=0).get(specs, "slow")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.monotonic() + 60
    while d.client().stats()["encoders"]["slow"]["items"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    assert d.stop(timeout=30) == 0
    assert time.monotonic() - t0 < 3 + 2
    t.join(timeout=10)
    assert len(errors) == 1 and isinstance(errors[0], Cancelled), errors
    assert d.segments() == []
