"""The workerless loader and the DataLoader handle mode: batches equal get + stack, orders are
reproducible and disjoint across ranks, resume is exact, a dataset larger than shared memory streams."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import vae_config
from torch.utils.data import DataLoader

from cached_client import ImageSpec, InvalidSpec, SourceError, TextSpec
from cached_client.loader import epoch_batches
from cached_client.torch import BucketBatchSampler, CachedDataset, collate_handles, gathered
from cached_testing.fixtures import build_tiny_clip


def crops(images: list[str], n: int, size: tuple[int, int] = (32, 32)) -> list[ImageSpec]:
    """`n` distinct specs of one latent shape (crop boxes inside every test image)."""
    return [ImageSpec(images[i % len(images)], size, crop=(i // len(images), 0, i // len(images) + 128, 128))
            for i in range(n)]


def reference(client, specs: list[ImageSpec], indices) -> torch.Tensor:
    return torch.stack([e["latent"] for e in client.get([specs[i] for i in indices], "vae")])


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_batches_equal_get_and_stack(daemon, images, shuffle):
    client = daemon.client()
    specs = crops(images, 70)
    loader = client.loader(specs, "vae", batch_size=16, shuffle=shuffle, seed=1, window=32)
    seen = []
    for batch in loader:
        assert batch["latent"].shape == (len(batch["index"]), 4, 4, 4)
        torch.testing.assert_close(batch["latent"], reference(client, specs, batch["index"].tolist()), rtol=0, atol=0)
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(70)) and len(loader) == 5
    assert (seen == list(range(70))) != shuffle
    loader.close()


def test_orders_are_reproducible_and_disjoint_across_ranks():
    def share(rank: int, epoch: int = 0, **kw) -> list[int]:
        return np.concatenate(epoch_batches(103, 8, shuffle=True, seed=7, epoch=epoch, rank=rank, world_size=3,
                                            **{"drop_last": False, **kw})).tolist()

    assert share(0) == share(0) and share(0) != share(0, epoch=1)
    parts = [share(r) for r in range(3)]
    assert len({len(p) for p in parts}) == 1  # every rank as many items: DDP steps in lockstep
    assert sorted(set().union(*parts)) == list(range(103))  # every item; 2 repeated as padding
    dropped = [share(r, drop_last=True) for r in range(3)]
    flat = [i for p in dropped for i in p]
    assert len(flat) == len(set(flat)) == 3 * (102 // 3 // 8 * 8)  # disjoint: 34 each, 4 full batches
    assert all(len(p) % 8 == 0 for p in dropped)


def test_resume_mid_epoch_yields_exactly_the_rest(daemon, images):
    client = daemon.client()
    specs = crops(images, 64)
    first = client.loader(specs, "vae", batch_size=8, shuffle=True, seed=3, window=16)
    list(first)  # epoch 0
    it = iter(first)
    taken = [next(it)["index"].tolist() for _ in range(3)]  # epoch 1, three batches in
    state = first.state_dict()
    rest = [b["index"].tolist() for b in it]
    first.close()
    assert state == {**state, "epoch": 1, "batch": 3}
    again = client.loader(specs, "vae", batch_size=8, shuffle=True, seed=3, window=16)
    again.load_state_dict(state)
    resumed = [b["index"].tolist() for b in again]
    assert resumed == rest and len(taken) + len(rest) == 8
    assert again.state_dict()["epoch"] == 2  # and then it goes on to the next epoch
    with pytest.raises(InvalidSpec, match="seed"):
        client.loader(specs, "vae", batch_size=8, seed=4).load_state_dict(state)
    again.close()


def test_kept_batches_are_never_overwritten(daemon, images):
    client = daemon.client()
    specs = crops(images, 48)
    loader = client.loader(specs, "vae", batch_size=4, shuffle=True, window=8, prefetch_batches=2)
    kept = list(loader) + list(loader)  # buffers are reused only once nothing refers to them
    for batch in kept:
        torch.testing.assert_close(batch["latent"], reference(client, specs, batch["index"].tolist()), rtol=0, atol=0)
    loader.close()


def test_a_dataset_twice_the_size_of_shared_memory_streams(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae, {"client_leased_bytes": "100%"}, shm_bytes="512KiB"))
    client = d.client()
    specs = crops(images, 96, size=(128, 128))  # 96 entries of 2 pages: 768 KiB, shm holds 512 KiB
    loader = client.loader(specs, "vae", batch_size=8, window=16)
    peak = 0
    for _epoch in range(2):
        for batch in loader:
            peak = max(peak, client.stats()["leases"])
            expected = torch.stack([client.get([specs[i]], "vae")[0]["latent"].clone() for i in batch["index"].tolist()])
            client.close()  # the reference reads must not pin memory either
            torch.testing.assert_close(batch["latent"], expected, rtol=0, atol=0)
    assert 0 < peak <= 3 * 16 + 8  # three windows of leases at most, whatever the dataset
    assert client.stats()["evictions"] > 0
    loader.close()


def test_bucketed_batches_of_mixed_sizes_and_ranks(daemon, images):
    client = daemon.client()
    specs = [ImageSpec(p, s) for p in images for s in ((32, 32), (48, 32), (32, 48))]  # 36 items, 3 shapes
    sampler = BucketBatchSampler(specs, batch_size=4, seed=5)
    ranks = [client.loader(specs, "vae", batch_size=4, batch_sampler=sampler, rank=r, world_size=2) for r in range(2)]
    seen = []
    for loader in ranks:
        for batch in loader:
            shapes = {specs[i].size for i in batch["index"].tolist()}
            assert len(shapes) == 1
            seen += batch["index"].tolist()
        loader.close()
    assert sorted(set(seen)) == list(range(36)) and len(seen) == 40  # 9 batches, one repeated for rank 1
    with pytest.raises(InvalidSpec, match="different shapes"):
        mixed = client.loader(specs, "vae", batch_size=6)
        list(mixed)
    mixed.close()


def test_two_encoders_per_item(daemon_factory, tiny_vae, images, tmp_path):
    clip = build_tiny_clip(str(tmp_path / "clip"))
    config = vae_config(tiny_vae)
    config["encoders"]["clip"] = {"kind": "hf-text", "path": clip}
    d = daemon_factory(config)
    client = d.client()
    items = [(ImageSpec(p, (32, 32)), TextSpec(f"a photo of item {i}")) for i, p in enumerate(images)]
    loader = client.loader(items, ["vae", "clip"], batch_size=5)
    batch = next(iter(loader))
    assert batch["latent"].shape[0] == 5 and batch["hidden_states"].shape[0] == 5
    [e] = client.get([items[batch["index"][2].item()][1]], "clip")
    torch.testing.assert_close(batch["hidden_states"][2], e["hidden_states"], rtol=0, atol=0)
    loader.close()


def test_an_item_that_fails_raises_at_its_batch(daemon, images, tmp_path):
    client = daemon.client()
    specs = [*crops(images, 8), ImageSpec(str(tmp_path / "gone.png"), (32, 32))]
    loader = client.loader(specs, "vae", batch_size=4)
    it = iter(loader)
    next(it), next(it)
    with pytest.raises(SourceError, match="no such file"):
        next(it)
    loader.close()


def test_handle_mode_gathers_the_same_tensors_as_the_plain_path(daemon, images):
    client = daemon.client()
    specs = crops(images, 40)
    plain = DataLoader(CachedDataset(client, specs, "vae"), batch_size=8, num_workers=2)
    handles = DataLoader(CachedDataset(client, specs, "vae", handles=True), batch_size=8, num_workers=2,
                         collate_fn=collate_handles)
    for a, b in zip(plain, gathered(handles, client), strict=True):
        torch.testing.assert_close(a["latent"], b["latent"], rtol=0, atol=0)
        assert a["key"] == b["key"]


def test_a_resident_dataset_notices_a_rewritten_source(daemon, images, tmp_path):
    from PIL import Image

    from cached_testing.fixtures import settle

    paths = []
    for i in range(4):
        p = str(tmp_path / f"{i}.bmp")
        Image.open(images[i]).convert("RGB").resize((64, 64)).save(p, format="BMP")
        paths.append(p)
    settle(*paths)
    client = daemon.client()
    specs = [ImageSpec(p, (32, 32)) for p in paths]
    loader = client.loader(specs, "vae", batch_size=4)
    first = next(iter(loader))["latent"].clone()
    assert loader._resident is not None and loader._resident.complete  # later epochs resolve nothing
    before = os.stat(paths[2])
    Image.open(images[7]).convert("RGB").resize((64, 64)).save(paths[2], format="BMP")  # same size
    os.utime(paths[2], ns=(before.st_atime_ns, before.st_mtime_ns))
    second = next(iter(loader))["latent"]
    torch.testing.assert_close(second[[0, 1, 3]], first[[0, 1, 3]], rtol=0, atol=0)
    assert not torch.equal(second[2], first[2])
    torch.testing.assert_close(second[2], client.get([specs[2]], "vae")[0]["latent"], rtol=0, atol=0)
    loader.close()


def test_the_first_epoch_keeps_the_daemons_stamps_and_stats_nothing(daemon, images, tmp_path, monkeypatch):
    """A fresh loader's first epoch takes each source's stamp from the daemon's reply (taken when
    the key was made), so it stats nothing itself; a file changed too recently to trust has none,
    and is checked again (and stamped here) in the next epoch."""
    from PIL import Image

    from cached_client.resident import Resident
    from cached_client.stamp import stamp_of
    from cached_testing.fixtures import settle

    paths = [str(tmp_path / f"{i}.bmp") for i in range(3)]
    for i, p in enumerate(paths):
        Image.open(images[i]).convert("RGB").resize((64, 64)).save(p, format="BMP")
        if i == 1:
            settle(*paths[:2])  # the last one is written just now: its stamp is not to be trusted yet
    specs = [ImageSpec(p, (32, 32)) for p in paths]

    stamped = []  # items this process stamped itself (an item with no stamp, once the producer runs ahead)
    own_stamp = Resident.stamp
    monkeypatch.setattr(Resident, "stamp", lambda self, items: stamped.extend(items) or own_stamp(self, items))
    loader = daemon.client().loader(specs, "vae", batch_size=3)
    list(loader)
    resident = loader._resident
    assert resident is not None and resident.complete
    assert resident.stamps[:2] == [(stamp_of(os.stat(p)),) for p in paths[:2]]
    assert set(stamped) <= {2}
    settle(paths[2])
    for _ in range(2):  # the producer may have checked the next epoch's window before the settle
        second = next(iter(loader))["latent"]
    assert resident.changed([0, 1, 2]) == [] and set(stamped) <= {2}
    torch.testing.assert_close(second, reference(loader.client, specs, [0, 1, 2]), rtol=0, atol=0)
    loader.close()


def test_resident_leases_go_back_on_close(quiet_leases):
    client, specs = quiet_leases
    loader = client.loader(specs, "vae", batch_size=8)
    list(loader)
    assert client.stats()["leases"] >= len(specs)  # kept for the next epochs
    loader.close()
    assert client.stats()["leases"] == 0
    streaming = client.loader(specs, "vae", batch_size=8, resident=False, window=8)
    list(streaming)
    streaming.close()
    assert client.stats()["leases"] == 0


@pytest.fixture
def quiet_leases(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae))
    return d.client(), crops(images, 32)
