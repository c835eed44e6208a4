"""The core path end to end against a real daemon process: correctness, bad input, lifecycle."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time

import numpy as np
import pytest
import torch
from conftest import vae_config
from PIL import Image, ImageOps

from cached_client import (
    CacheMiss,
    DaemonUnavailable,
    ImageSpec,
    InvalidSpec,
    SourceError,
    SourceNotAllowed,
    UnknownEncoder,
)


def reference_latent(vae_dir: str, path: str, size: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """The latent a trainer would compute in-process, with its own PIL preprocessing."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    img = Image.open(path).convert("RGB")
    w, h = size
    scale = max(w / img.width, h / img.height)
    cover = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    if cover != img.size:
        img = img.resize(cover, Image.Resampling.LANCZOS)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    img = img.crop((left, top, left + w, top + h))
    if flip:
        img = ImageOps.mirror(img)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean[0] * vae.config.scaling_factor


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("index,size", [(0, (256, 256)), (1, (256, 128)), (2, (128, 192))],
                         ids=["square", "wide", "tall"])
@pytest.mark.parametrize("flip", [False, True], ids=["noflip", "flip"])
def test_latents_equal_in_process_encode(daemon, tiny_vae, images, index, size, flip):
    [e] = daemon.client().get([ImageSpec(images[index], size=size, flip=flip)], encoder="vae")
    ref = reference_latent(tiny_vae, images[index], size, flip)
    assert e["latent"].shape == (4, size[1] // 8, size[0] // 8)
    assert e["latent"].dtype == torch.float32
    assert rel_err(e["latent"], ref) < 1e-4
    assert len(e.key) == 64 and int(e.key, 16) >= 0


def test_batch_of_misses_is_one_encode_batch(daemon, images):
    client = daemon.client()
    before = client.stats()["encoders"]["vae"]
    specs = [ImageSpec(p, size=(64, 64), crop="center") for p in images[:8]]
    entries = client.get(specs, encoder="vae")
    after = client.stats()["encoders"]["vae"]
    assert [e.spec for e in entries] == specs
    assert after["items"] - before["items"] == 8
    assert after["batches"] - before["batches"] == 1


def test_same_spec_same_key_different_transform_different_key(daemon, images):
    client = daemon.client()
    a, b, c, d = client.get([ImageSpec(images[1], (64, 64)), ImageSpec(images[1], (64, 64)),
                             ImageSpec(images[1], (64, 64), flip=True), ImageSpec(images[1], (64, 64), crop="random")],
                            encoder="vae")
    assert a.key == b.key
    assert len({a.key, c.key, d.key}) == 3
    assert not torch.equal(a["latent"], c["latent"])
    [d2] = daemon.client().get([ImageSpec(images[1], (64, 64), crop="random")], encoder="vae")
    assert d2.key == d.key and torch.equal(d2["latent"], d["latent"])  # random crop is seeded by the spec


def test_rewritten_image_is_a_new_key(daemon, images, tmp_path):
    path = str(tmp_path / "a.png")
    shutil.copy(images[0], path)
    client = daemon.client()
    [old] = client.get([ImageSpec(path, (64, 64))], encoder="vae")
    old_latent = old["latent"].clone()
    Image.open(images[3]).save(path)  # same path, other content
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    [new] = daemon.client().get([ImageSpec(path, (64, 64))], encoder="vae")
    assert new.key != old.key
    assert not torch.equal(new["latent"], old_latent)


def test_another_vae_is_another_key(daemon_factory, tiny_vae, images, tmp_path):
    from cached_testing.fixtures import build_tiny_vae

    other = build_tiny_vae(str(tmp_path / "vae2"), seed=1)
    d1 = daemon_factory(vae_config(tiny_vae))
    d2 = daemon_factory(vae_config(other))
    spec = ImageSpec(images[0], (64, 64))
    [a] = d1.client().get([spec], encoder="vae")
    [b] = d2.client().get([spec], encoder="vae")
    assert a.key != b.key


def test_compute_false_miss_then_hit(daemon, images):
    client = daemon.client()
    spec = ImageSpec(images[4], (96, 96))
    with pytest.raises(CacheMiss, match="not cached"):
        client.get([spec], encoder="vae", compute=False)
    client.warm([spec], encoder="vae")
    [e] = client.get([spec], encoder="vae", compute=False)
    assert e["latent"].shape == (4, 12, 12)


def test_bad_input_fails_the_item_and_the_daemon_keeps_serving(daemon, images, tmp_path):
    client = daemon.client()
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    cases = [
        (ImageSpec(str(tmp_path / "missing.png"), (64, 64)), SourceError, "no such file"),
        (ImageSpec(str(not_image), (64, 64)), SourceError, "not a readable image"),
        (ImageSpec(str(tmp_path), (64, 64)), SourceError, "directory"),
    ]
    for spec, exc, message in cases:
        with pytest.raises(exc, match=message):
            client.get([ImageSpec(images[0], (64, 64)), spec], encoder="vae")
    with pytest.raises(UnknownEncoder, match="no encoder named 'nope'"):
        client.get([ImageSpec(images[0], (64, 64))], encoder="nope")
    [ok] = client.get([ImageSpec(images[0], (64, 64))], encoder="vae")
    assert ok["latent"].shape == (4, 8, 8)


def test_absurd_and_malformed_specs(daemon, images):
    with pytest.raises(ValueError, match="size must be within"):
        ImageSpec(images[0], (100_000, 64))
    with pytest.raises(ValueError, match="crop must be one of"):
        ImageSpec(images[0], (64, 64), crop="diagonal")
    # a client that skips validation (another language, an old version) gets InvalidSpec per item
    from cached_client._proto import cache_pb2 as pb

    client = daemon.client()
    proc = client._process()
    reply = proc.stub.Get(pb.GetRequest(encoder="vae", specs=b'["i", "/x.png", 0, 99999, "center", false]\n'
                                                           b'{not json\n["t", 1, 2]'),
                          metadata=client._credentials())
    assert [e.error for e in reply.errors] == ["InvalidSpec"] * 3
    assert "size" in reply.errors[0].message and "not JSON" in reply.errors[1].message
    with pytest.raises(InvalidSpec, match="crop box"):
        client.get([ImageSpec(images[0], (64, 64), crop=(0, 0, 999, 999))], encoder="vae")


def test_decompression_bomb_is_refused(daemon_factory, tiny_vae, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 3000)).save(big)
    d = daemon_factory({**vae_config(tiny_vae, max_pixels=1_000_000)})
    with pytest.raises(SourceError, match="decompression bomb"):
        d.client().get([ImageSpec(str(big), (64, 64))], encoder="vae")


def test_allowed_roots_refuse_escapes(daemon_factory, tiny_vae, images, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    inside = root / "a.png"
    shutil.copy(images[0], inside)
    outside = tmp_path / "secret.png"
    shutil.copy(images[1], outside)
    (root / "link.png").symlink_to(outside)
    d = daemon_factory(vae_config(tiny_vae, allowed_roots=[str(root)]))
    client = d.client()
    [ok] = client.get([ImageSpec(str(inside), (64, 64))], encoder="vae")
    assert ok["latent"].shape == (4, 8, 8)
    for path in (str(outside), str(root / ".." / "secret.png"), str(root / "link.png")):
        with pytest.raises(SourceNotAllowed, match="outside allowed_roots"):
            client.get([ImageSpec(path, (64, 64))], encoder="vae")


@pytest.mark.parametrize("backend", ["memfd", "dev-shm"])
def test_sigterm_leaves_no_segment_and_no_socket(daemon_factory, tiny_vae, images, backend):
    d = daemon_factory(vae_config(tiny_vae, shm_backend=backend))
    [e] = d.client().get([ImageSpec(images[0], (64, 64))], encoder="vae")
    assert any(name.startswith("cached-") for name in d.segments()) == (backend == "dev-shm")
    assert os.path.exists(d.socket)
    assert d.stop(signal.SIGTERM) == 0
    assert d.segments() == []
    assert not os.path.exists(d.socket)
    assert e["latent"].shape == (4, 8, 8)  # views handed out stay readable after the daemon is gone
    assert float(e["latent"].abs().sum()) > 0


def test_daemon_killed_then_back_same_client_works(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae))
    client = d.client(connect_timeout=1.0)
    spec = ImageSpec(images[0], (64, 64))
    [before] = client.get([spec], encoder="vae")
    deadline = time.monotonic() + 30
    while client.stats()["tiers"]["disk"]["entries"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # on disk before the kill: after it, the entry is promoted, not recomputed
    d.stop(signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(DaemonUnavailable):
        client.get([ImageSpec(images[1], (64, 64))], encoder="vae")
    assert time.monotonic() - start < 15  # bounded: connect_timeout plus one call
    d.start()
    [after] = client.get([ImageSpec(images[1], (64, 64)), spec], encoder="vae")[1:]
    assert after.key == before.key
    assert torch.equal(after["latent"], before["latent"])


def test_warm_waits_for_a_daemon_that_is_starting(daemon_factory, tiny_vae, images):
    """A warm made while the daemon restarts waits for it (up to connect_timeout), as unary calls do,
    and goes on with a new session, instead of failing at once."""
    d = daemon_factory(vae_config(tiny_vae))
    client = d.client(connect_timeout=120)
    assert client.stats()["instance"]  # this process's session with the first daemon
    d.stop()
    starter = threading.Thread(target=d.start)
    starter.start()
    try:
        result = client.warm([ImageSpec(p, (64, 64)) for p in images[:3]], encoder="vae")
    finally:
        starter.join()
    assert result.computed + result.cached == 3 and not result.failed


def test_restart_sweeps_segments_of_a_killed_daemon(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae, shm_backend="dev-shm"))
    d.client().get([ImageSpec(images[0], (64, 64))], encoder="vae")
    old = set(d.segments())
    d.stop(signal.SIGKILL)
    assert old and set(d.segments()) == old  # a killed daemon leaves its files behind
    d.start()
    assert not old & set(d.segments())


def test_socket_is_0660_and_tcp_only_when_configured(daemon_factory, tiny_vae, images):
    import socket
    import stat

    d = daemon_factory(vae_config(tiny_vae))
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o660
    import psutil

    def inet_listeners(pid: int) -> list:
        return [c for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]

    assert inet_listeners(d.proc.pid) == []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = vae_config(tiny_vae)
    config["server"] = {"tcp": f"127.0.0.1:{port}"}
    t = daemon_factory(config)
    from cached_client import CacheClient, PermissionDenied, Unauthenticated

    token_file = os.path.join(os.path.dirname(t.socket), "tcp-token")
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o640  # the group reads it, others don't
    with pytest.raises(Unauthenticated, match="token"):
        CacheClient(f"127.0.0.1:{port}", connect_timeout=1).stats()
    with pytest.raises(Unauthenticated, match="token"):
        CacheClient(f"127.0.0.1:{port}", token="guess", connect_timeout=1).warm(
            [ImageSpec(images[0], (64, 64))], encoder="vae")
    with open(token_file) as f:
        tcp = CacheClient(f"127.0.0.1:{port}", token=f.read().strip())
    # a TCP caller has no verified uid: it gets what anyone on the machine may read, nothing more
    [(_, _, refused)] = tcp.warm([ImageSpec(images[0], (64, 64))], encoder="vae").failed  # under 0700 dirs
    assert isinstance(refused, SourceNotAllowed)
    public = tempfile.mkdtemp(prefix="cached-public-")
    try:
        os.chmod(public, 0o755)
        shutil.copy(images[0], os.path.join(public, "a.png"))
        os.chmod(os.path.join(public, "a.png"), 0o644)
        assert tcp.warm([ImageSpec(os.path.join(public, "a.png"), (64, 64))], encoder="vae").computed == 1
    finally:
        shutil.rmtree(public)
    assert tcp.stats()["computed"] == 1
    with pytest.raises(PermissionDenied, match="unix socket"):  # leases need a kernel-verified process
        tcp.get([ImageSpec(images[0], (64, 64))], encoder="vae")
    [e] = t.client().get([ImageSpec(images[0], (64, 64))], encoder="vae")
    assert e["latent"].shape == (4, 8, 8)
    assert stat.S_IMODE(os.stat(t.socket).st_mode) == 0o660  # the unix socket is still there
    assert [c.laddr.port for c in inet_listeners(t.proc.pid)] == [port]
