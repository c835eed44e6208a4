"""The diffusers-vae kind, weight digests and loading, replicas: real tiny models, in process."""

from __future__ import annotations

import json
import logging
import os
import threading

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLQwenImage
from safetensors.torch import load_file, save_file

from cached.encoders import WeightDigests, build_encoder
from cached.encoders.latents import seeded_normal
from cached.encoders.loading import choose_reader, fastsafetensors_available, load_model, read_safetensors
from cached_testing.fixtures import build_tiny_vae, settle

QWEN_CONFIG = {"base_dim": 16, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1, "attn_scales": [],
               "temperal_downsample": [False], "latents_mean": [0.1, -0.2, 0.3, 0.0],
               "latents_std": [2.0, 1.5, 0.5, 1.0]}


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = build_tiny_vae(str(tmp_path_factory.mktemp("vae")))
    settle(path)  # old enough for its stamp to be trusted: the weight digest memo applies
    return path


@pytest.fixture(scope="module")
def reference(vae_dir: str) -> AutoencoderKL:
    """The same VAE loaded the library's way, as a trainer would in process."""
    return AutoencoderKL.from_pretrained(vae_dir).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(3, 3, 64, 64) * 2 - 1


def vae(path: str, digests: WeightDigests | None = None, **options: object) -> object:
    return build_encoder("vae", {"kind": "diffusers-vae", "path": path, **options}, digests)


def test_mean_mode_is_scaled_posterior_mean(vae_dir: str, reference: AutoencoderKL, images: torch.Tensor) -> None:
    out = vae(vae_dir).encode(images, [1, 2, 3])
    with torch.no_grad():
        expected = reference.encode(images).latent_dist.mean * 0.13025
    assert list(out) == ["latent"] and out["latent"].shape == (3, 4, 8, 8)
    torch.testing.assert_close(out["latent"], expected)


def test_overrides_replace_config_scaling_and_shift(vae_dir: str, reference: AutoencoderKL,
                                                    images: torch.Tensor) -> None:
    enc = vae(vae_dir, scaling_factor=0.5, shift_factor=0.25)
    with torch.no_grad():
        expected = (reference.encode(images[:1]).latent_dist.mean - 0.25) * 0.5
    torch.testing.assert_close(enc.encode(images[:1], [0])["latent"], expected)
    assert enc.fingerprint != vae(vae_dir).fingerprint


def test_sample_mode_depends_on_each_items_seed_only(vae_dir: str, images: torch.Tensor) -> None:
    enc = vae(vae_dir, sample="sample")
    batch = enc.encode(images, [10, 11, 12])["latent"]
    alone = enc.encode(images[1:2], [11])["latent"]
    torch.testing.assert_close(batch[1:2], alone)
    again = vae(vae_dir, sample="sample").encode(images[2:], [12])["latent"]  # a fresh load, as after a restart
    torch.testing.assert_close(batch[2:], again)
    other_seed = enc.encode(images[1:2], [99])["latent"]
    mean = vae(vae_dir).encode(images[1:2], [11])["latent"]
    assert not torch.allclose(alone, other_seed) and not torch.allclose(alone, mean)


def test_posterior_resamples_like_sample_mode(vae_dir: str, reference: AutoencoderKL,
                                              images: torch.Tensor) -> None:
    """The documented recipe, mean + exp(logvar / 2) * eps, gives sample mode's latent for the same eps."""
    post = vae(vae_dir, sample="posterior").encode(images, [4, 5, 6])
    assert set(post) == {"mean", "logvar"}
    torch.testing.assert_close(post["mean"], vae(vae_dir).encode(images, [4, 5, 6])["latent"])
    with torch.no_grad():
        raw = reference.encode(images).latent_dist
    torch.testing.assert_close(post["logvar"], raw.logvar + 2 * torch.log(torch.tensor(0.13025)))
    sample = vae(vae_dir, sample="sample").encode(images, [4, 5, 6])["latent"]
    resampled = post["mean"] + torch.exp(0.5 * post["logvar"]) * seeded_normal((4, 8, 8), [4, 5, 6])
    torch.testing.assert_close(resampled, sample)


def test_fingerprint_tracks_everything_that_changes_outputs(vae_dir: str, tmp_path: str) -> None:
    base = vae(vae_dir).fingerprint
    assert vae(vae_dir).fingerprint == base
    other_weights = build_tiny_vae(str(tmp_path), seed=1)
    variants = [vae(vae_dir, sample="sample"), vae(vae_dir, sample="posterior"), vae(vae_dir, dtype="bf16"),
                vae(vae_dir, enable_tiling=True), vae(vae_dir, enable_slicing=True), vae(other_weights)]
    prints = {base, *(v.fingerprint for v in variants)}
    assert len(prints) == 1 + len(variants)
    assert json.loads(base)["weights"] != json.loads(variants[-1].fingerprint)["weights"]


def test_bf16_and_memory_savers_give_the_same_latents(vae_dir: str, images: torch.Tensor) -> None:
    ref = vae(vae_dir).encode(images, [1, 2, 3])["latent"]
    bf16 = vae(vae_dir, dtype="bf16").encode(images, [1, 2, 3])["latent"]
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), ref, atol=0.05, rtol=0.05)
    saved = vae(vae_dir, enable_tiling=True, enable_slicing=True).encode(images, [1, 2, 3])["latent"]
    torch.testing.assert_close(saved, ref, atol=1e-4, rtol=1e-4)  # images below the tile size


def test_single_file_checkpoint_with_local_config(vae_dir: str, images: torch.Tensor, tmp_path: str) -> None:
    single = os.path.join(str(tmp_path), "tiny_vae.safetensors")
    save_file(load_file(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors")), single)
    enc = vae(single, config=vae_dir)
    torch.testing.assert_close(enc.encode(images, [1, 2, 3])["latent"],
                               vae(vae_dir).encode(images, [1, 2, 3])["latent"])
    with pytest.raises(ValueError, match="needs config"):
        vae(single)
    with pytest.raises(ValueError, match="single-file"):
        vae(vae_dir, config=vae_dir)


def test_video_autoencoder_class_encodes_one_frame(tmp_path: str, images: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = AutoencoderKLQwenImage(**QWEN_CONFIG).eval()
    model.save_pretrained(str(tmp_path))
    enc = vae(str(tmp_path), diffusers_class="AutoencoderKLQwenImage")
    out = enc.encode(images[:2], [1, 2])["latent"]
    with torch.no_grad():
        mean = model.encode(images[:2].unsqueeze(2)).latent_dist.mean.squeeze(2)
    stats = [torch.tensor(QWEN_CONFIG[k]).view(1, 4, 1, 1) for k in ("latents_mean", "latents_std")]
    assert enc.video and out.shape == (2, 4, 32, 32)
    torch.testing.assert_close(out, (mean - stats[0]) / stats[1])


@pytest.mark.parametrize("options, match", [
    ({"sample": "random"}, "'random'"), ({"dtype": "fp8"}, "'fp8'"),
    ({"diffusers_class": "UNet2DModel"}, "'UNet2DModel'"), ({"diffusers_class": "Nope"}, "'Nope'"),
    ({"devices": "cpu"}, "'cpu'"), ({"devices": ["gpu7"]}, "'gpu7'"), ({"enable_tiling": "yes"}, "'yes'"),
    ({"scaling_factor": 0}, "scaling_factor.*0"), ({"path": "/nonexistent/vae"}, "/nonexistent/vae"),
])
def test_bad_values_are_named(vae_dir: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_encoder("vae", {"kind": "diffusers-vae", "path": vae_dir, **options})


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="checks the refusal of an absent GPU")
def test_absent_cuda_device_is_refused(vae_dir: str) -> None:
    absent = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=absent):
        vae(vae_dir, devices=[absent])


def test_build_encoder_checks_kind_and_warns_on_unknown_options(vae_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="'clip-ish'"):
        build_encoder("x", {"kind": "clip-ish", "path": vae_dir})
    with pytest.raises(ValueError, match="path"):
        build_encoder("x", {"kind": "diffusers-vae"})
    with caplog.at_level(logging.WARNING):
        build_encoder("x", {"kind": "diffusers-vae", "path": vae_dir, "compile": True})
    assert "'compile'" in caplog.text


def test_replicas_give_identical_results_concurrently(vae_dir: str, images: torch.Tensor) -> None:
    enc = vae(vae_dir, devices=["cpu", "cpu"], sample="sample")
    assert enc.replicas == 2 and enc._replicas[0].model is not enc._replicas[1].model
    serial = enc.encode(images, [7, 8, 9], replica=0)["latent"]
    results: dict[int, torch.Tensor] = {}

    def run(r: int) -> None:
        for _ in range(3):
            results[r] = enc.encode(images, [7, 8, 9], replica=r)["latent"]

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in (0, 1):
        torch.testing.assert_close(results[r], serial)
    with pytest.raises(ValueError, match="replica"):
        enc.encode(images, [7, 8, 9], replica=2)


def test_weight_digest_memo_survives_a_restart(vae_dir: str, tmp_path: str) -> None:
    memo = os.path.join(str(tmp_path), "digests.json")
    weights = os.path.join(vae_dir, "diffusion_pytorch_model.safetensors")
    first = WeightDigests(memo)
    digest = first.file(weights)
    assert first.hashed == 1 and first.file(weights) == digest and first.hashed == 1
    second = WeightDigests(memo)  # a restarted daemon
    assert second.file(weights) == digest and second.hashed == 0
    fingerprint = vae(vae_dir, digests=second).fingerprint
    assert second.hashed == 1  # config.json only: the weights came from the memo
    assert vae(vae_dir, digests=WeightDigests(memo)).fingerprint == fingerprint


def test_weight_digest_rehashes_a_rewritten_file(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "w.bin")
    with open(path, "wb") as f:
        f.write(b"a" * 100)
    memo = os.path.join(str(tmp_path), "memo.json")
    old = WeightDigests(memo).file(path)
    with open(path, "wb") as f:
        f.write(b"b" * 100)
    os.utime(path, ns=(1, 1))
    fresh = WeightDigests(memo)
    assert fresh.file(path) != old and fresh.hashed == 1
    with open(memo, "w") as f:
        f.write("{not json")
    assert WeightDigests(memo).file(path) == fresh.file(path)  # a corrupt memo is ignored


def test_readers_agree_and_are_chosen_by_device(vae_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [os.path.join(vae_dir, "diffusion_pytorch_model.safetensors")]
    assert choose_reader("cpu") == "safetensors"
    assert choose_reader("cuda:0") == ("fastsafetensors" if fastsafetensors_available() else "safetensors")
    ref = read_safetensors(files, "cpu")
    if fastsafetensors_available():
        monkeypatch.setenv("FASTSAFETENSORS_ODIRECT", "0")  # tmp dirs may be on filesystems without O_DIRECT
        fast = read_safetensors(files, "cpu", reader="fastsafetensors")
        assert fast.keys() == ref.keys() and all(torch.equal(fast[k], ref[k]) for k in ref)
    with pytest.raises(ValueError, match="'mmap'"):
        read_safetensors(files, "cpu", reader="mmap")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fast_path_loads_what_from_pretrained_loads(vae_dir: str, dtype: torch.dtype) -> None:
    files = [os.path.join(vae_dir, "diffusion_pytorch_model.safetensors")]
    model = load_model(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(vae_dir)),
                       lambda: pytest.fail("fast path fell back"), files, "cpu", dtype)
    ref = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=dtype)
    got, want = model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys() and not model.training
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_replica_loads_through_the_cuda_reader(vae_dir: str, images: torch.Tensor) -> None:
    enc = vae(vae_dir, devices=["cuda:0"])
    assert next(enc._replicas[0].model.parameters()).device.type == "cuda"
    torch.testing.assert_close(enc.encode(images, [1, 2, 3])["latent"].cpu(),
                               vae(vae_dir).encode(images, [1, 2, 3])["latent"], atol=1e-3, rtol=1e-3)
    files = [os.path.join(vae_dir, "diffusion_pytorch_model.safetensors")]
    state = read_safetensors(files, "cuda:0")
    assert all(t.device.type == "cuda" for t in state.values())
