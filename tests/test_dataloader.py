"""Real DataLoader workers under fork and spawn reading through a client made in the parent."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import psutil
import pytest
import torch

from cached_client import CacheClient, ImageSpec

TRAINER = os.path.join(os.path.dirname(__file__), "dataloader_trainer.py")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_read_correct_latents_and_hold_no_model(daemon, images, method):
    """A trainer that imports only torch and the client: its workers get the right bytes and never
    import diffusers or transformers, nor hold a model parameter."""
    specs = [ImageSpec(p, (64, 64)) for p in images]
    expected = {e.key: hashlib.sha256(e["latent"].numpy().tobytes()).hexdigest()
                for e in daemon.client().get(specs, encoder="vae")}
    out = subprocess.run(
        [sys.executable, TRAINER, daemon.address, method, "3", *(json.dumps([s.path, 64]) for s in specs)],
        capture_output=True, text=True, timeout=300, check=True).stdout
    items = [json.loads(line) for line in out.splitlines()]
    assert len(items) == len(specs)
    for item in items:
        assert item["sha"] == expected[item["key"]]
        assert item["heavy"] == [], f"a worker imported {item['heavy']}"
        assert item["params"] == 0
    assert len({item["pid"] for item in items}) == 3


def _read_many(address: str, specs: list[ImageSpec], rounds: int, queue) -> None:
    client = CacheClient(address)
    me = psutil.Process()
    pss = []
    total = 0.0
    for _ in range(rounds):
        for i in range(0, len(specs), 16):
            for e in client.get(specs[i:i + 16], encoder="vae"):
                total += float(e["latent"][0, 0, 0])
        pss.append(me.memory_full_info().uss)
    queue.put((pss, total))


def test_worker_memory_does_not_grow_with_entries_read(daemon, images):
    """Thousands of reads of 96 distinct entries: private memory (USS) after the first rounds stays
    flat. (Not PSS: its share of torch's libraries moves with every other process that maps them.)"""
    import multiprocessing as mp

    specs = [ImageSpec(p, (s, s), flip=f) for p in images for s in (128, 192, 256, 320) for f in (False, True)]
    daemon.client().warm(specs, encoder="vae")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_many, args=(daemon.address, specs, 40, queue))
    proc.start()
    pss, _ = queue.get(timeout=300)
    proc.join(60)
    assert len(pss) == 40  # 3,840 reads
    growth = max(pss[5:]) - pss[5]
    assert growth < 4 << 20, f"USS grew by {growth} bytes over {35 * len(specs)} reads"


def test_views_are_read_only_to_the_shared_copy(daemon, images):
    spec = ImageSpec(images[5], (64, 64))
    [a] = daemon.client().get([spec], encoder="vae")
    original = a["latent"].clone()
    a["latent"].zero_()  # torch has no read-only tensors: the write lands in a private page
    [b] = daemon.client().get([spec], encoder="vae")  # another client, like another worker
    assert torch.equal(b["latent"], original)
