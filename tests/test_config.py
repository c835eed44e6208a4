"""Config loading and address resolution, as DESIGN.md fixes them."""

from __future__ import annotations

import logging
import os

import pytest

from cached.server.config import load_config
from cached_client.address import resolve_address
from cached_client.units import parse_size


def test_address_precedence(tmp_path):
    env = {"CACHED_ADDRESS": "unix:///env.sock", "XDG_RUNTIME_DIR": str(tmp_path)}
    assert resolve_address("/explicit.sock", "/cfg.sock", env) == "unix:///explicit.sock"
    assert resolve_address(None, "/cfg.sock", env) == "unix:///env.sock"
    assert resolve_address(None, "/cfg.sock", {}) == "unix:///cfg.sock"
    assert resolve_address("127.0.0.1:7070", None, {}) == "127.0.0.1:7070"


def test_default_socket_falls_back_in_order(tmp_path, monkeypatch):
    import cached_client.address as address

    xdg = tmp_path / "xdg"
    xdg.mkdir()
    monkeypatch.setattr(address, "_writable", lambda d: d.startswith(str(xdg)) or d.startswith("/tmp"))
    assert resolve_address(None, None, {"XDG_RUNTIME_DIR": str(xdg)}) == f"unix://{xdg}/cached/cached.sock"
    assert resolve_address(None, None, {}) == f"unix:///tmp/cached-{os.getuid()}/cached.sock"
    # a socket that already exists wins over a writable directory earlier in the list
    sock = tmp_path / "run" / "cached.sock"
    sock.parent.mkdir()
    sock.touch()
    monkeypatch.setattr(address, "default_socket_candidates", lambda env: [str(sock) + ".none", str(sock)])
    assert resolve_address(None, None, {}) == f"unix://{sock}"


def test_sizes():
    assert parse_size("8GiB") == 8 << 30
    assert parse_size("512MB") == 512_000_000
    assert parse_size("50%", total=1000) == 500
    assert parse_size(4096) == 4096
    for bad in ("lots", "-1", "0", "12 parsecs"):
        with pytest.raises(ValueError, match="shm_bytes"):
            parse_size(bad, what="shm_bytes")


def test_config_file_overrides_and_unknown_keys(tmp_path, caplog):
    path = tmp_path / "c.toml"
    path.write_text("""
[server]
socket = "/tmp/x.sock"
[store]
shm_bytes = "1MiB"
disk_dir = "/var/cache/cached"
allowed_roots = ["/data"]
wibble = 1
[s3]
bucket = "later"
[encoders.vae]
kind = "diffusers-vae"
path = "/models/vae"
""")
    with caplog.at_level(logging.WARNING):
        cfg = load_config(str(path), {"shm_bytes": "2MiB", "tcp": None})
    assert cfg.socket == "/tmp/x.sock" and cfg.shm_bytes == "2MiB" and cfg.shm_capacity() == 2 << 20
    assert cfg.allowed_roots == ["/data"] and cfg.encoders["vae"]["path"] == "/models/vae"
    text = caplog.text
    assert "store.wibble" in text and "[s3]" in text
    writable = os.access("/var/cache", os.W_OK)
    assert cfg.disk_directory() == "/var/cache/cached" if writable else cfg.disk_directory().endswith("/cached")
    cfg.disk_dir = ""
    assert cfg.disk_directory() is None


@pytest.mark.parametrize("body,message", [
    ('[store]\nshm_bytes = "lots"', "shm_bytes must be a size"),
    ('[store]\nallowed_roots = ["relative"]', "absolute"),
    ('[server]\nworkers = "many"', "wrong type"),
    ("[store\n", "not valid TOML"),
])
def test_bad_config_values_are_named(tmp_path, body, message):
    path = tmp_path / "c.toml"
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
        load_config(str(path))
