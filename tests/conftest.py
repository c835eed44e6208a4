"""Fixtures: a real tiny VAE saved to disk, real images, and real daemon processes on private sockets
and private shared-memory directories (a tmpfs subdirectory of /dev/shm per daemon)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from cached_testing.fixtures import build_tiny_vae, settle, write_images
from cached_testing.harness import Daemon


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = build_tiny_vae(str(tmp_path_factory.mktemp("vae")))
    settle(path)  # old enough for its stamp to be trusted: the weight digest memo applies
    return path


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Twelve PNGs: square 256x256, non-square 320x200 and 200x288."""
    paths = write_images(str(tmp_path_factory.mktemp("images")), 12, [(256, 256), (320, 200), (200, 288)])
    settle(*paths)  # old enough for their stamps to be trusted: handle caches and key memos apply
    return paths


@pytest.fixture
def daemon_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(config: dict[str, dict[str, Any]], start: bool = True) -> Daemon:
        d = Daemon(str(tmp_path_factory.mktemp("daemon")), config)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.cleanup()


def vae_config(tiny_vae: str, limits: dict[str, Any] | None = None, **store: Any) -> dict[str, dict[str, Any]]:
    config = {"store": {"shm_bytes": "64MiB", **store},
              "encoders": {"vae": {"kind": "diffusers-vae", "path": tiny_vae, "max_queue_delay_ms": 20}}}
    if limits:
        config["limits"] = limits
    return config


@pytest.fixture(scope="module")
def daemon(tiny_vae: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon with the tiny VAE, shared by a module's tests."""
    d = Daemon(str(tmp_path_factory.mktemp("daemon")), vae_config(tiny_vae))
    d.start()
    yield d
    d.stop()
    d.cleanup()
