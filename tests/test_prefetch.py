"""prefetch is a non-blocking hint that makes later get(compute=False) succeed."""

from __future__ import annotations

import time

from cached_client import CacheMiss, ImageSpec


def test_prefetch_makes_later_compute_false_gets_succeed(daemon, images):
    client = daemon.client()
    specs = [ImageSpec(p, (56, 56), flip=True) for p in images] + [ImageSpec("/nope.png", (56, 56))]
    client.prefetch(specs, encoder="vae")  # returns at once; the bad spec is skipped, not raised
    deadline = time.monotonic() + 120
    while True:
        try:
            entries = client.get(specs[:-1], encoder="vae", compute=False)
            break
        except CacheMiss:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert [e.spec for e in entries] == specs[:-1]
    assert client.stats()["prefetch_queued"] >= len(images)


def test_prefetch_to_an_unknown_encoder_or_a_dead_daemon_does_not_raise(daemon, images, tmp_path):
    from cached_client import CacheClient

    daemon.client().prefetch([ImageSpec(images[0], (64, 64))], encoder="nope")
    CacheClient(f"unix://{tmp_path}/none.sock").prefetch([ImageSpec(images[0], (64, 64))], encoder="vae")
