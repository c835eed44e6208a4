"""Containers as they come: memfd arenas handed over the socket, so a daemon and its clients share
nothing but the socket's directory. Namespaces stand in for containers (as root, with unshare(1)): a
private mount namespace with its own 64 MB /dev/shm, and a pid namespace of its own."""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

from cached_client import CacheClient, ImageSpec
from cached_testing.harness import Daemon

SIDE = 1024  # each latent: SIDE x SIDE float32, 4 MiB
N_IMAGES = 256  # 1 GiB of latents in all
SMALL_SHM = "64m"  # Docker's default /dev/shm

# A plugin encoder with big outputs that say which image they came from: image i is one grey level,
# so its latent is that level (in [-1, 1]) plus a ramp.
PLUGIN = textwrap.dedent('''
    import torch


    class Big(torch.nn.Module):
        def __init__(self, side):
            super().__init__()
            self.side = side

        def forward(self, x):
            ramp = torch.arange(self.side * self.side, dtype=x.dtype).view(self.side, self.side) % 977
            return x.mean(dim=(1, 2, 3)).view(-1, 1, 1) + ramp


    def make(side):
        return Big(side)
''')


def expected(level: int) -> np.ndarray:
    ramp = (np.arange(SIDE * SIDE, dtype=np.float32) % 977).reshape(SIDE, SIDE)
    return np.float32(level / 127.5 - 1.0) + ramp


@functools.cache
def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs in a private mount namespace needs root"
    if shutil.which("unshare") is None:
        return "needs unshare(1)"
    probe = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs -o size={SMALL_SHM} tmpfs /dev/shm"], capture_output=True, text=True, timeout=30)
    if probe.returncode:
        return f"cannot make private mount and pid namespaces here: {probe.stderr.strip()}"
    return None


@pytest.fixture
def namespaces() -> None:
    reason = _why_no_namespaces()
    if reason:
        pytest.skip(reason)


def in_container(*hide: str, pid: bool = False) -> list[str]:
    """A command prefix: a private mount namespace with its own 64 MB /dev/shm, `hide` covered by empty
    tmpfs mounts, and with `pid` a pid namespace of its own (killing the prefix kills what it runs)."""
    mounts = " && ".join(f"mount -t tmpfs -o size=1m tmpfs {p}" for p in hide)
    script = f"mount -t tmpfs -o size={SMALL_SHM} tmpfs /dev/shm {'&& ' + mounts if mounts else ''} && exec \"$@\""
    ns = ["--pid", "--fork", "--mount-proc", "--kill-child"] if pid else []
    return ["unshare", "--mount", "--propagation", "private", *ns, "sh", "-c", script, "sh"]


@pytest.fixture
def grey_images(tmp_path_factory) -> list[str]:
    directory = tmp_path_factory.mktemp("grey")
    paths = []
    for level in range(N_IMAGES):
        path = str(directory / f"{level:03d}.png")
        Image.new("RGB", (16, 16), (level, level, level)).save(path)
        paths.append(path)
    past = time.time() - 10  # old enough for their stamps to be trusted
    for path in paths:
        os.utime(path, (past, past))
    return paths


def big_daemon(tmp_path, prefix: list[str], shm_bytes: str = "1100MiB") -> Daemon:
    plugin = tmp_path / "big.py"
    plugin.write_text(PLUGIN)
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = {"store": {"shm_backend": "memfd", "shm_bytes": shm_bytes, "disk_dir": ""},
              "limits": {"client_leased_bytes": "100%"},
              "encoders": {"big": {"kind": "python", "factory": "big:make", "path": str(plugin),
                                   "options": {"side": SIDE}, "max_batch": 16}}}
    return Daemon(str(workdir), config, prefix=prefix)


def spec(path: str) -> ImageSpec:
    return ImageSpec(path, (16, 16))


def leases(client: CacheClient) -> int:
    return client.stats()["leases"]


def test_a_daemon_with_a_64mb_dev_shm_serves_a_gib_of_latents(namespaces, tmp_path, grey_images):
    daemon = big_daemon(tmp_path, in_container())
    try:
        daemon.start()
        client = daemon.client(timeout=300)
        for start in range(0, N_IMAGES, 16):
            batch = grey_images[start:start + 16]
            for i, entry in enumerate(client.get([spec(p) for p in batch], encoder="big")):
                latent = entry["latent"].numpy()
                np.testing.assert_allclose(latent, expected(start + i), atol=1e-4)
            del entry, latent
        stats = client.stats()
        assert stats["tiers"]["shm"]["bytes"] >= N_IMAGES * SIDE * SIDE * 4  # all of it in memory at once
        assert stats["evictions"] == 0
        shm = stats["tiers"]["shm"]
        assert shm["backend"] == "memfd" and shm["held_bytes"] >= shm["capacity_bytes"]  # reserved at start
        client.close()
    finally:
        daemon.cleanup()


CLIENT = f"""
import sys, time
import numpy as np
from cached_client import CacheClient, ImageSpec
client = CacheClient(sys.argv[1])
held = client.get([ImageSpec(p, (16, 16)) for p in sys.argv[2:]], encoder="big")
ramp = (np.arange({SIDE} * {SIDE}, dtype=np.float32) % 977).reshape({SIDE}, {SIDE})
for path, entry in zip(sys.argv[2:], held):
    level = int(path.rsplit("/", 1)[1][:3])
    assert np.allclose(entry["latent"].numpy(), np.float32(level / 127.5 - 1.0) + ramp, atol=1e-4), path
print("holding", len(held), open("/proc/self/stat").read().split()[0], flush=True)
time.sleep(600)
"""


def test_a_client_sharing_only_the_socket_directory_reads_latents_and_gives_leases_back(
        namespaces, tmp_path, grey_images):
    daemon = big_daemon(tmp_path, [], shm_bytes="256MiB")
    try:
        daemon.start()
        client = daemon.client(timeout=120)
        before = leases(client)
        shown = grey_images[:8]
        # its own /dev/shm (which hides the daemon's shm directory) and pids; the images are hidden too
        hidden = [os.path.dirname(shown[0])]
        holder = subprocess.Popen([*in_container(*hidden, pid=True), sys.executable, "-c", CLIENT,
                                   daemon.address, *shown], stdout=subprocess.PIPE, text=True)
        try:
            words = holder.stdout.readline().split()
            assert words[:2] == ["holding", "8"], daemon.log()[-2000:]
            assert int(words[2]) < 10  # it saw itself as one of the first pids of a namespace of its own
            assert leases(client) == before + 8
            holder.send_signal(signal.SIGKILL)  # unshare goes; --kill-child takes the client with it
            holder.wait()
            start = time.monotonic()
            while leases(client) != before:
                assert time.monotonic() - start < 1.0, "leases not back within a second"
                time.sleep(0.02)
        finally:
            holder.kill()
            holder.wait()
        client.close()
    finally:
        daemon.cleanup()


def memfds(pid: int) -> dict[int, str]:
    """inode -> name of the memfds a process holds open or mapped."""
    found: dict[int, str] = {}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/memfd:"):
                    found[os.stat(f"/proc/{pid}/fd/{fd}").st_ino] = target
            except OSError:
                continue
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].startswith("/memfd:"):
                    found[int(fields[4])] = fields[5].strip()
    except OSError:
        pass  # gone, or not ours to read
    return found


def test_after_kill_9_nothing_of_the_daemon_remains(namespaces, tmp_path, grey_images):
    daemon = big_daemon(tmp_path, in_container(), shm_bytes="128MiB")
    try:
        daemon.start()
        client = daemon.client(timeout=120)
        client.warm([spec(p) for p in grey_images[:16]], encoder="big")
        client.close()
        assert daemon.proc is not None
        held = memfds(daemon.proc.pid)
        ours = {ino: name for ino, name in held.items() if re.match(r"/memfd:cached-", name)}
        assert ours, f"the daemon holds no memfd arenas: {held}"
        files_before = {p for p in os.listdir(tmp_path / "run")}
        daemon.stop(signal.SIGKILL)
        # no process anywhere still holds or maps its arenas: the kernel has freed them
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            assert not set(memfds(pid)) & set(ours), f"pid {pid} still holds {ours}"
        # nothing in /dev/shm (ours, or in the namespace's own, which went with it), nothing new here
        assert os.listdir(daemon.shm_dir) == []
        assert not [n for n in os.listdir("/dev/shm") if daemon_instance_named(n, ours)]
        assert {p for p in os.listdir(tmp_path / "run")} == files_before
    finally:
        daemon.cleanup()


def daemon_instance_named(name: str, ours: dict[int, str]) -> bool:
    """Whether a /dev/shm name carries the instance of one of the daemon's memfds."""
    instances = {m.group(1) for n in ours.values() if (m := re.match(r"/memfd:cached-([0-9a-f]+)", n))}
    return any(i in name for i in instances)


@pytest.mark.parametrize("backend", ["memfd", "dev-shm"])
def test_stats_and_cachectl_say_which_backend_and_the_memory_it_holds(daemon_factory, backend):
    d = daemon_factory({"store": {"shm_backend": backend, "shm_bytes": "8MiB", "disk_dir": ""}})
    shm = d.client().stats()["tiers"]["shm"]
    assert shm["backend"] == backend
    assert shm["held_bytes"] >= shm["capacity_bytes"] >= 8 << 20  # fallocate'd: held from the start
    out = subprocess.run([sys.executable, "-m", "cached_client.cachectl", "--address", d.address, "stats"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.search(rf"shm .* {backend} holding 8\.\d+ MiB", out.stdout), out.stdout
