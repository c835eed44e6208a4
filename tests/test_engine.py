"""The engine through a real daemon: dynamic batching across clients, single flight, text encoders,
reproducible sampling, plugins, out-of-memory splits, per-item failures, health while loading."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from conftest import vae_config
from PIL import Image

from cached_client import CacheClient, DaemonUnavailable, EncoderError, ImageSpec, InvalidSpec, TextSpec
from cached_testing.fixtures import build_tiny_clip, tiny_clip_tokenizer

PLUGIN = '''
import time
import torch


class Patchify(torch.nn.Module):
    """8x8 patches to 4 channels: a cheap encoder with the VAE's geometry."""

    def __init__(self, oom_above):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 4, 8, stride=8)
        self.oom_above = oom_above

    def forward(self, x):
        if self.oom_above and x.shape[0] > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (GPU stand-in)")
        if (x[:, :, 0, 0] > 0.999).all(dim=1).any():
            raise ValueError("poisoned pixel")
        return self.proj(x)


def make(oom_above=0, load_delay=0.0):
    time.sleep(load_delay)
    torch.manual_seed(0)
    return Patchify(oom_above)
'''


@pytest.fixture(scope="module")
def plugin_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plugin") / "patchify_plugin.py"
    path.write_text(PLUGIN)
    return str(path)


def plugin_encoder(plugin_file, **options):
    return {"kind": "python", "factory": "patchify_plugin:make", "path": plugin_file, "options": options,
            "max_queue_delay_ms": 50, "max_batch": 32}


def concurrently(n: int, fn) -> list:
    results: list = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_eight_clients_distinct_misses_share_batches(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae))
    clients = [d.client() for _ in range(8)]
    concurrently(8, lambda i: clients[i].get([ImageSpec(images[i], (64, 64))], encoder="vae"))
    enc = clients[0].stats()["encoders"]["vae"]
    assert enc["items"] == 8
    assert enc["max_batch_seen"] > 1 and enc["batches"] < 8


def test_eight_clients_same_key_encode_once(daemon_factory, tiny_vae, images):
    d = daemon_factory(vae_config(tiny_vae))
    clients = [d.client() for _ in range(8)]
    spec = ImageSpec(images[2], (96, 64))
    entries = concurrently(8, lambda i: clients[i].get([spec], encoder="vae")[0])
    assert len({e.key for e in entries}) == 1
    assert clients[0].stats()["encoders"]["vae"]["items"] == 1


def test_text_embeddings_equal_an_in_process_run(daemon_factory, tmp_path):
    from transformers import CLIPTextModel

    clip = build_tiny_clip(str(tmp_path / "clip"))
    d = daemon_factory({"store": {"shm_bytes": "16MiB"},
                        "encoders": {"clip": {"kind": "hf-text", "path": clip}}})
    texts = ["a photo of a cat", "a painting of a dog"]
    cat, dog = d.client().get([TextSpec(t) for t in texts], encoder="clip")
    model = CLIPTextModel.from_pretrained(clip).eval()
    tokens = tiny_clip_tokenizer()(texts, padding="max_length", max_length=model.config.max_position_embeddings,
                                   truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens.input_ids)
    assert torch.allclose(cat["hidden_states"], out.last_hidden_state[0], atol=1e-5)
    assert torch.allclose(dog["pooled"], out.pooler_output[1], atol=1e-5)
    assert torch.equal(cat["attention_mask"], tokens.attention_mask[0].to(cat["attention_mask"].dtype))
    assert not torch.allclose(cat["hidden_states"], dog["hidden_states"])
    with pytest.raises(InvalidSpec, match="takes text"):
        d.client().get([ImageSpec("/x.png", (64, 64))], encoder="clip")


@pytest.mark.parametrize("mode,names", [("sample", ["latent"]), ("posterior", ["logvar", "mean"])])
def test_sampling_modes_are_reproducible_across_restarts(daemon_factory, tiny_vae, images, mode, names):
    config = {"store": {"shm_bytes": "16MiB"},
              "encoders": {"vae": {"kind": "diffusers-vae", "path": tiny_vae, "sample": mode}}}
    d = daemon_factory(config)
    specs = [ImageSpec(images[0], (64, 64)), ImageSpec(images[1], (64, 64))]
    first = [{k: v.clone() for k, v in e.items()} for e in d.client().get(specs, encoder="vae")]
    assert sorted(first[0]) == names
    d.stop()
    d.start()
    second = d.client().get(specs[::-1], encoder="vae")[::-1]  # other batch order, fresh process
    for a, b in zip(first, second, strict=True):
        for name in names:
            assert torch.equal(a[name], b[name])


def test_plugin_encoder_end_to_end(daemon_factory, plugin_file, images, tmp_path):
    small = str(tmp_path / "small.png")
    Image.open(images[0]).convert("RGB").resize((64, 64)).save(small)  # at the target size: not resampled
    d = daemon_factory({"store": {"shm_bytes": "16MiB"}, "encoders": {"patch": plugin_encoder(plugin_file)}})
    [e] = d.client().get([ImageSpec(small, (64, 64))], encoder="patch")
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("patchify_ref", plugin_file)
    module = module_from_spec(spec)
    spec.loader.exec_module(module)
    x = torch.from_numpy(np.asarray(Image.open(small), dtype=np.float32) / 127.5 - 1)
    with torch.no_grad():
        ref = module.make()(x.permute(2, 0, 1)[None])[0]
    assert e["latent"].shape == (4, 8, 8)
    assert torch.allclose(e["latent"], ref, atol=1e-5)


def test_out_of_memory_splits_the_batch_and_the_request_succeeds(daemon_factory, plugin_file, images):
    d = daemon_factory({"store": {"shm_bytes": "16MiB"},
                        "encoders": {"patch": plugin_encoder(plugin_file, oom_above=3)}})
    client = d.client()
    entries = client.get([ImageSpec(p, (64, 64)) for p in images[:10]], encoder="patch")
    assert len(entries) == 10
    enc = client.stats()["encoders"]["patch"]
    assert enc["items"] == 10 and enc["max_batch_seen"] <= 3
    assert "out of memory" in d.log()


def test_an_item_that_fails_alone_does_not_fail_its_batch(daemon_factory, plugin_file, images, tmp_path):
    poisoned = tmp_path / "poisoned.png"
    img = Image.open(images[0]).convert("RGB").resize((64, 64))  # at the target size: not resampled
    img.putpixel((0, 0), (255, 255, 255))
    img.save(poisoned)
    d = daemon_factory({"store": {"shm_bytes": "16MiB"}, "encoders": {"patch": plugin_encoder(plugin_file)}})
    client = d.client()
    specs = [ImageSpec(p, (64, 64)) for p in images[1:6]] + [ImageSpec(str(poisoned), (64, 64))]
    progress = client.warm(specs, encoder="patch")
    assert progress.computed == 5
    [(index, _, error)] = progress.failed
    assert index == 5 and isinstance(error, EncoderError) and "poisoned pixel" in str(error)
    assert len(client.get(specs[:5], encoder="patch", compute=False)) == 5


def test_health_is_not_serving_until_encoders_are_loaded(daemon_factory, plugin_file):
    d = daemon_factory({"store": {"shm_bytes": "16MiB"},
                        "encoders": {"patch": plugin_encoder(plugin_file, load_delay=6.0)}}, start=False)
    d.launch()
    client = CacheClient(d.address, connect_timeout=0)
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "SERVING" not in seen:
        try:
            status = client.health()
            if not seen or seen[-1] != status:
                seen.append(status)
        except DaemonUnavailable:
            pass
        time.sleep(0.05)
    assert seen == ["NOT_SERVING", "SERVING"], d.log()


def test_warm_stops_when_the_client_cancels(daemon_factory, plugin_file, images):
    d = daemon_factory({"store": {"shm_bytes": "64MiB"},
                        "encoders": {"patch": {**plugin_encoder(plugin_file), "max_batch": 4}}})
    specs = [ImageSpec(p, (8 * (8 + k), 64)) for k in range(60) for p in images]  # 720 distinct items

    class Stop(Exception):
        pass

    def progress(p):
        if p.done:
            raise Stop

    with pytest.raises(Stop):
        d.client().warm(specs, encoder="patch", progress=progress)
    counts = [-1]
    while True:  # the items already queued (a bounded window) finish; nothing new is started
        time.sleep(1.5)
        counts.append(d.client().stats()["encoders"]["patch"]["items"])
        if counts[-1] == counts[-2]:
            break
    assert counts[-1] < len(specs) / 2
