"""Importers against caches written here in each trainer's own format (from the formats' descriptions:
ai-toolkit's _latent_cache safetensors, kohya's npz beside the image, SimpleTuner's sha256-named .pt)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cached.importers import ImportItem, Reason, Skip, iter_import, summarize
from cached_client.specs import ImageSpec
from cached_testing.fixtures import write_images


def latent(seed: int, shape: tuple[int, ...] = (4, 8, 8), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def split(results: list, parts: int = 1) -> tuple[dict[str, ImportItem], dict[str, Skip]]:
    """Results by the last `parts` components of their cache file's path (items: "/flip" when flipped)."""
    def name(path: str) -> str:
        return "/".join(path.split(os.sep)[-parts:])

    items = {name(r.cache_file) + ("/flip" if r.flip else ""): r for r in results if isinstance(r, ImportItem)}
    skips = {name(r.cache_file): r for r in results if isinstance(r, Skip)}
    return items, skips


@pytest.fixture
def images(tmp_path) -> str:
    d = str(tmp_path / "set")
    write_images(d, 3, sizes=[(96, 64), (64, 64), (192, 128)])  # img_00000.png .. img_00002.png
    return d


# ai-toolkit: toolkit/dataloader_mixins.py writes these

def aitk_write(image: str, lat: torch.Tensor, scale_to: tuple[int, int], crop: tuple[int, int, int, int],
               flip_x: bool = False, flip_y: bool = False, filename: str | None = None) -> str:
    info: OrderedDict[str, object] = OrderedDict([
        ("filename", filename or os.path.basename(image)), ("scale_to_width", scale_to[0]),
        ("scale_to_height", scale_to[1]), ("crop_x", crop[0]), ("crop_y", crop[1]), ("crop_width", crop[2]),
        ("crop_height", crop[3]), ("latent_space_version", "sdxl"), ("latent_version", 1)])
    if flip_x:
        info["flip_x"] = True
    if flip_y:
        info["flip_y"] = True
    digest = hashlib.md5(json.dumps(info, sort_keys=True).encode()).digest()
    name = base64.urlsafe_b64encode(digest).decode().replace("=", "")
    stem = os.path.splitext(str(info["filename"]))[0]
    path = os.path.join(os.path.dirname(image), "_latent_cache", f"{stem}_{name}.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}
    save_file({"latent": lat.contiguous()}, path, metadata=meta)
    return os.path.basename(path)


def test_ai_toolkit(images: str) -> None:
    img = [os.path.join(images, f"img_{i:05d}.png") for i in range(3)]
    centre = aitk_write(img[0], latent(0), (96, 64), (16, 0, 64, 64))
    flipped = aitk_write(img[0], latent(1, dtype=torch.bfloat16), (96, 64), (16, 0, 64, 64), flip_x=True)
    corner = aitk_write(img[2], latent(2), (96, 64), (0, 0, 64, 64))  # a random crop's window, 2x downscale
    wide = aitk_write(img[2], latent(3, (4, 8, 12)), (96, 64), (0, 0, 96, 64))
    vflip = aitk_write(img[1], latent(4), (64, 64), (0, 0, 64, 64), flip_y=True)
    ghost = aitk_write(img[1], latent(5), (64, 64), (0, 0, 64, 64), filename="ghost.png")
    bad_shape = aitk_write(img[1], latent(6, (4, 8, 9)), (64, 64), (0, 0, 64, 64))
    with open(os.path.join(images, "_latent_cache", "junk_AAAAAAAAAAAAAAAAAAAAAA.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")

    results = list(iter_import("ai-toolkit", os.path.dirname(images)))
    items, skips = split(results)
    real = os.path.realpath(img[0])
    assert items[centre].spec() == ImageSpec(real, (64, 64), "center", False)
    assert torch.equal(items[centre].latent, latent(0))
    assert items[flipped + "/flip"].spec() == ImageSpec(real, (64, 64), "center", True)
    assert items[flipped + "/flip"].latent.dtype == torch.bfloat16  # the source dtype is kept
    assert items[corner].crop == (0, 0, 128, 128) and items[corner].size == (64, 64)
    assert items[wide].crop == "center" and items[wide].size == (96, 64)
    assert skips[vflip].reason == Reason.UNSUPPORTED
    assert skips[ghost].reason == Reason.NO_IMAGE
    assert skips[bad_shape].reason == Reason.SIZE_MISMATCH
    assert skips["junk_AAAAAAAAAAAAAAAAAAAAAA.safetensors"].reason == Reason.UNREADABLE
    assert summarize(results) == {"imported": 4, "skipped": {
        Reason.UNSUPPORTED: 1, Reason.NO_IMAGE: 1, Reason.SIZE_MISMATCH: 1, Reason.UNREADABLE: 1}}

    only = split(list(iter_import("ai-toolkit", images, size=(96, 64))))
    assert list(only[0]) == [wide]
    assert only[1][centre].reason == Reason.SIZE_MISMATCH and "asked for 96x64" in only[1][centre].detail


# kohya sd-scripts: library/strategy_*.py write these

def kohya_write(image: str, wh: tuple[int, int], arch: str, arrays: dict[str, np.ndarray], name: str | None = None) -> str:
    stem = os.path.splitext(image)[0]
    path = name or f"{stem}_{wh[0]:04d}x{wh[1]:04d}_{arch}.npz"
    np.savez(path, **arrays)
    return os.path.basename(path)


def kohya_arrays(seed: int, original: tuple[int, int], shape: tuple[int, ...] = (4, 8, 8), flipped: bool = False,
                 suffix: str = "") -> dict[str, np.ndarray]:
    out = {"latents" + suffix: latent(seed, shape).numpy(), "original_size" + suffix: np.array(original),
           "crop_ltrb" + suffix: np.array([0, 0, shape[2] * 8, shape[1] * 8])}
    if flipped:
        out["latents_flipped" + suffix] = latent(seed + 100, shape).numpy()
    return out


def test_kohya(images: str) -> None:
    img = [os.path.join(images, f"img_{i:05d}.png") for i in range(3)]
    sdxl = kohya_write(img[0], (64, 64), "sdxl", kohya_arrays(0, (96, 64), flipped=True))
    sd3 = kohya_write(img[1], (64, 64), "sd3", kohya_arrays(1, (64, 64)))
    flux = kohya_write(img[1], (64, 64), "flux", kohya_arrays(2, (64, 64), (16, 8, 8)))
    multi = kohya_write(img[2], (96, 64), "sd", {**kohya_arrays(3, (192, 128), (4, 8, 12), suffix="_8x12"),
                                                 **kohya_arrays(4, (192, 128), (4, 8, 8), suffix="_8x8")})
    changed = kohya_write(img[2], (64, 64), "sdxl", kohya_arrays(5, (100, 100)))
    ghost = kohya_write(os.path.join(images, "ghost.png"), (64, 64), "sdxl", kohya_arrays(6, (64, 64)))
    hunyuan = kohya_write(img[1], (64, 64), "hi", kohya_arrays(7, (64, 64)))
    wrong = kohya_write(img[0], (128, 64), "sdxl", kohya_arrays(8, (96, 64)))
    te = kohya_write(img[0], (0, 0), "", {"hidden_state": np.zeros(3)}, name=os.path.join(images, "img_00000_sdxl_te.npz"))
    with open(os.path.join(images, "img_00001_0064x0064_sdxl.npz"), "wb") as f:
        f.write(b"PK\x03\x04 truncated")

    results = list(iter_import("kohya", images, scaling_factor=1.5305, shift_factor=0.0609))
    items, skips = split(results)
    real0 = os.path.realpath(img[0])
    assert items[sdxl].spec() == ImageSpec(real0, (64, 64), "center", False)
    assert items[sdxl + "/flip"].spec() == ImageSpec(real0, (64, 64), "center", True)
    assert torch.allclose(items[sdxl].latent, (latent(0) - 0.0609) * 1.5305)  # stored unscaled
    assert torch.allclose(items[sdxl + "/flip"].latent, (latent(100) - 0.0609) * 1.5305)
    assert torch.allclose(items[sd3].latent, (latent(1) - 0.0609) * 1.5305)
    assert torch.equal(items[flux].latent, latent(2, (16, 8, 8)))  # stored scaled
    assert items[sd3].latent.dtype == torch.float32
    multis = [r for r in results if isinstance(r, ImportItem) and os.path.basename(r.cache_file) == multi]
    assert sorted(r.size for r in multis) == [(64, 64), (96, 64)]
    assert skips[changed].reason == Reason.IMAGE_CHANGED
    assert skips[ghost].reason == Reason.NO_IMAGE
    assert skips[hunyuan].reason == Reason.UNSUPPORTED
    assert skips[wrong].reason == Reason.SIZE_MISMATCH
    assert skips[te].reason == Reason.NOT_A_CACHE
    assert skips["img_00001_0064x0064_sdxl.npz"].reason == Reason.UNREADABLE
    assert summarize(results)["imported"] == 6

    flux_only = list(iter_import("kohya", images, arch="flux"))  # no scaling_factor needed
    assert [os.path.basename(r.cache_file) for r in flux_only if isinstance(r, ImportItem)] == [flux]
    assert summarize(flux_only)["skipped"][Reason.OTHER_ARCH] >= 5
    with pytest.raises(ValueError, match="stored unscaled: pass the encoder's scaling_factor"):
        list(iter_import("kohya", images))


# SimpleTuner: helpers/caching/vae.py and its data backend write these

def st_write(cache_dir: str, rel_image: str, obj: object, gz: bool = False, hashed: bool = True) -> str:
    sub, name = os.path.split(rel_image)
    stem = os.path.splitext(name)[0]
    base = hashlib.sha256(stem.encode()).hexdigest() if hashed else stem
    path = os.path.join(cache_dir, sub, base + ".pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = gzip.compress(buf.getvalue()) if gz else buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return f"{sub}/{base}.pt"


class NotATensor:
    pass


def test_simpletuner(tmp_path) -> None:
    root = str(tmp_path / "images")
    write_images(os.path.join(root, "people"), 2, sizes=[(64, 64)])
    write_images(os.path.join(root, "cats"), 2, sizes=[(96, 64)])
    cache = str(tmp_path / "cache")
    plain = st_write(cache, "people/img_00000.png", latent(0, (1, 4, 8, 8)))
    zipped = st_write(cache, "people/img_00001.png", latent(1, (4, 8, 8), torch.bfloat16), gz=True)
    as_dict = st_write(cache, "cats/img_00000.png", {"latents": latent(2, (4, 8, 12))})
    unhashed = st_write(cache, "cats/img_00001.png", latent(3, (4, 8, 12)), hashed=False)
    orphan = st_write(cache, "cats/missing.png", latent(4))
    evil = st_write(cache, "people/evil.png", NotATensor())
    os.makedirs(os.path.join(root, "people"), exist_ok=True)
    open(os.path.join(root, "people", "evil.png"), "wb").close()
    with open(os.path.join(cache, "people", hashlib.sha256(b"img_00000").hexdigest() + "x.pt"), "wb") as f:
        f.write(b"\x1f\x8b garbage")

    results = list(iter_import("simpletuner", cache, image_root=root, crop="center"))
    items, skips = split(results, parts=2)
    people0 = os.path.realpath(os.path.join(root, "people", "img_00000.png"))
    assert items[plain].spec() == ImageSpec(people0, (64, 64), "center", False)
    assert torch.equal(items[plain].latent, latent(0, (1, 4, 8, 8))[0])
    assert items[zipped].latent.dtype == torch.bfloat16
    assert torch.equal(items[zipped].latent, latent(1, (4, 8, 8), torch.bfloat16))
    assert items[as_dict].size == (96, 64) and items[unhashed].size == (96, 64)
    assert skips[orphan].reason == Reason.NO_IMAGE
    assert skips[evil].reason == Reason.UNREADABLE  # weights_only: no arbitrary pickles
    assert summarize(results) == {"imported": 4, "skipped": {Reason.NO_IMAGE: 2, Reason.UNREADABLE: 1}}

    sized = summarize(iter_import("simpletuner", cache, image_root=root, size=(64, 64)))
    assert sized["imported"] == 2 and sized["skipped"][Reason.SIZE_MISMATCH] == 2
    with pytest.raises(ValueError, match="needs image_root"):
        iter_import("simpletuner", cache)


def test_bad_arguments_name_the_bad_value(tmp_path) -> None:
    with pytest.raises(ValueError, match="format must be one of .* got 'everydream'"):
        iter_import("everydream", str(tmp_path))
    with pytest.raises(ValueError, match="is not a directory"):
        iter_import("kohya", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"size must be \(width, height\)"):
        iter_import("kohya", str(tmp_path), size=(64,))  # type: ignore[arg-type]
