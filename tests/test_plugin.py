"""The python plugin kind: a factory from a module file written here, loaded by path or from sys.path."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap

import pytest
import torch

from cached.encoders import build_encoder
from cached.encoders.latents import seeded_normal

PLUGIN = textwrap.dedent('''
    """A tiny latent encoder: a stride-8 convolution, like a VAE's 8x downsampling."""
    import torch


    class Patchify(torch.nn.Module):
        def __init__(self, channels, scale):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, channels, kernel_size=8, stride=8)
            self.scale = scale

        def forward(self, x):
            return self.conv(x) * self.scale


    class Noisy(Patchify):
        def forward(self, x, seeds):
            noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(s))
                                 for s in seeds])
            return {"latent": self.conv(x + 0.1 * noise), "energy": x.pow(2).mean(dim=(1, 2, 3))}


    class NotBatchFirst(Patchify):
        def forward(self, x):
            return self.conv(x).sum()


    def make(channels=4, scale=1.0, seed=0):
        torch.manual_seed(seed)
        return Patchify(channels, scale)


    def make_noisy():
        torch.manual_seed(0)
        return Noisy(4, 1.0)


    def make_scalar():
        return NotBatchFirst(4, 1.0)


    def not_a_module():
        return "nope"
''')


@pytest.fixture()
def plugin_file(tmp_path: str) -> str:
    path = os.path.join(str(tmp_path), "tinyplug.py")
    with open(path, "w") as f:
        f.write(PLUGIN)
    yield path
    sys.modules.pop("tinyplug", None)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(3)
    return torch.rand(2, 3, 32, 32) * 2 - 1


def plugin(path: str, factory: str = "tinyplug:make", **options: object) -> object:
    return build_encoder("plug", {"kind": "python", "factory": factory, "path": path, **options})


def in_process(path: str, factory: str = "make", **kwargs: object) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("tinyplug_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, factory)(**kwargs).eval()


def test_plugin_file_output_is_the_modules_forward(plugin_file: str, images: torch.Tensor) -> None:
    enc = plugin(plugin_file, options={"channels": 6, "scale": 0.5})
    out = enc.encode(images, [1, 2])
    with torch.no_grad():
        expected = in_process(plugin_file, channels=6, scale=0.5)(images)
    assert list(out) == ["latent"] and out["latent"].shape == (2, 6, 4, 4)
    torch.testing.assert_close(out["latent"], expected)
    assert enc.input == "image" and json.loads(enc.describe()["fingerprint"])["factory"] == "tinyplug:make"


def test_plugin_from_a_sys_path_directory(plugin_file: str, images: torch.Tensor) -> None:
    enc = plugin(os.path.dirname(plugin_file))
    torch.testing.assert_close(enc.encode(images, [1, 2])["latent"], plugin(plugin_file).encode(images, [1, 2])["latent"])


def test_fingerprint_covers_state_options_factory_and_source(plugin_file: str) -> None:
    base = plugin(plugin_file)
    assert plugin(plugin_file).fingerprint == base.fingerprint
    same_state_other_options = plugin(plugin_file, options={"scale": 2.0})
    other_weights = plugin(plugin_file, options={"seed": 1})
    prints = {base.fingerprint, same_state_other_options.fingerprint, other_weights.fingerprint,
              plugin(plugin_file, dtype="bf16").fingerprint, plugin(plugin_file, "tinyplug:make_noisy").fingerprint}
    assert len(prints) == 5
    assert json.loads(base.fingerprint)["state"] != json.loads(other_weights.fingerprint)["state"]
    with open(plugin_file, "a") as f:
        f.write("\n# a code change\n")
    sys.modules.pop("tinyplug", None)
    assert json.loads(plugin(plugin_file).fingerprint)["source"] != json.loads(base.fingerprint)["source"]


def test_seeded_plugin_gets_seeds_and_may_return_several_tensors(plugin_file: str, images: torch.Tensor) -> None:
    enc = plugin(plugin_file, "tinyplug:make_noisy")
    out = enc.encode(images, [5, 6])
    assert set(out) == {"latent", "energy"} and out["energy"].shape == (2,)
    alone = enc.encode(images[1:], [6])
    torch.testing.assert_close(out["latent"][1:], alone["latent"])
    with torch.no_grad():
        expected = in_process(plugin_file, "make_noisy").conv(images + 0.1 * seeded_normal((3, 32, 32), [5, 6]))
    torch.testing.assert_close(out["latent"], expected)


def test_replicas_are_copies_of_one_module(plugin_file: str, images: torch.Tensor) -> None:
    enc = plugin(plugin_file, devices=["cpu", "cpu"])
    assert enc.replicas == 2 and enc._replicas[0].model is not enc._replicas[1].model
    torch.testing.assert_close(enc.encode(images, [1, 2], replica=1)["latent"], enc.encode(images, [1, 2])["latent"])


def test_outputs_that_are_not_batch_first_fail_the_batch(plugin_file: str, images: torch.Tensor) -> None:
    with pytest.raises(TypeError, match="batch-first"):
        plugin(plugin_file, "tinyplug:make_scalar").encode(images, [1, 2])


@pytest.mark.parametrize("factory, match", [
    ("tinyplug", "'tinyplug'"), ("tinyplug:missing", "'missing'"), ("a:b:c", "'a:b:c'"),
    ("tinyplug:not_a_module", "str"),
])
def test_bad_factories_are_named(plugin_file: str, factory: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plugin(plugin_file, factory)


def test_bad_path_and_options_are_named(plugin_file: str) -> None:
    with pytest.raises(ValueError, match="/no/such/plugin.py"):
        plugin("/no/such/plugin.py")
    with pytest.raises(ValueError, match="options"):
        plugin(plugin_file, options=[1, 2])
    with pytest.raises(ValueError, match="factory"):
        build_encoder("plug", {"kind": "python", "path": plugin_file})
