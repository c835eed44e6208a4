"""cached_client.torch under every start method and with threads: right latents, bucketed batches."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.utils.data import DataLoader

from cached_client import CacheMiss, ImageSpec
from cached_client.torch import BucketBatchSampler, CachedDataset

SIZES = [(64, 64), (96, 64), (64, 80)]


@pytest.fixture(scope="module")
def bucketed(daemon, images):
    specs = [ImageSpec(p, SIZES[i % 3], flip=bool(i % 2)) for i, p in enumerate(images * 2)]
    expected = {e.key: e["latent"].clone() for e in daemon.client().get(specs, encoder="vae")}
    return specs, expected


def check_batches(batches, expected, n_items):
    seen = 0
    for batch in batches:
        assert len({tuple(t.shape) for t in batch["latent"]}) == 1  # one size per batch
        for key, latent in zip(batch["key"], batch["latent"], strict=True):
            assert torch.equal(latent, expected[key])
        seen += len(batch["key"])
    assert seen == n_items


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_dataloader_start_methods_bucketed(daemon, bucketed, method):
    specs, expected = bucketed
    client = daemon.client()
    loader = DataLoader(CachedDataset(client, specs, encoder="vae"),
                        batch_sampler=BucketBatchSampler(specs, batch_size=3, seed=1),
                        num_workers=2, multiprocessing_context=method, persistent_workers=True, pin_memory=True)
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        check_batches(loader, expected, len(specs))


def test_thread_based_loading(daemon, bucketed):
    specs, expected = bucketed
    dataset = CachedDataset(daemon.client(), specs, encoder="vae")
    sampler = BucketBatchSampler(specs, batch_size=4)
    collate = torch.utils.data.default_collate
    with ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(lambda b: collate(dataset.__getitems__(b)), sampler))
    check_batches(batches, expected, len(specs))


def test_sampler_batches_are_bucketed_and_seeded(bucketed):
    specs, _ = bucketed
    sampler = BucketBatchSampler(specs, batch_size=3, seed=7)
    first = list(sampler)
    assert sorted(i for b in first for i in b) == list(range(len(specs)))
    assert all(len({specs[i].size for i in b}) == 1 for b in first)
    assert list(sampler) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    with pytest.raises(ValueError, match="batch_size"):
        BucketBatchSampler(specs, batch_size=0)


def test_sampler_prefetches_batches_ahead(daemon, images):
    specs = [ImageSpec(p, (72, 72), crop="random") for p in images]
    client = daemon.client()
    sampler = BucketBatchSampler(specs, batch_size=4, shuffle=False, prefetch=(client, {"vae": specs}), lookahead=3)
    iterator = iter(sampler)
    next(iterator)  # hints batches 0..3: every batch of this epoch
    deadline = time.monotonic() + 120
    while True:
        try:
            client.get(specs, encoder="vae", compute=False)
            break
        except CacheMiss:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_dataset_with_two_encoders_needs_equal_lengths(daemon, images):
    with pytest.raises(ValueError, match="one spec per item"):
        CachedDataset(daemon.client(), {"vae": [ImageSpec(images[0], (64, 64))], "clip": []})
    with pytest.raises(ValueError, match="encoder is required"):
        CachedDataset(daemon.client(), [ImageSpec(images[0], (64, 64))])
