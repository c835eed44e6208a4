"""The hf-text kind against in-process runs of the same tiny CLIP and T5, tokenizers built in code."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading

import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from cached.encoders import build_encoder
from cached_testing.fixtures import build_tiny_clip, build_tiny_t5, tiny_clip_tokenizer, tiny_t5_tokenizer

TEXTS = ["a photo of a cat", "a red house in the painting", "zebra 42"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_tiny_t5(str(tmp_path_factory.mktemp("t5")))


def text(path: str, **options: object) -> object:
    return build_encoder("te", {"kind": "hf-text", "path": path, **options})


def in_process(model: torch.nn.Module, tokenizer: object, texts: list[str], max_length: int,
               use_mask: bool = False, **kwargs: object) -> tuple[object, torch.Tensor]:
    """What a trainer computes itself: tokenize, then call the model (without the mask by default,
    as the SD, SDXL, SD3 and Flux pipelines do)."""
    tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    mask = tokens.attention_mask if use_mask else None
    with torch.no_grad():
        return model.eval()(tokens.input_ids, attention_mask=mask, **kwargs), tokens.attention_mask


def test_clip_equals_an_in_process_run(clip_dir: str) -> None:
    out = text(clip_dir).encode(TEXTS, [0, 1, 2])
    ref, mask = in_process(CLIPTextModel.from_pretrained(clip_dir), tiny_clip_tokenizer(), TEXTS, 16)
    assert set(out) == {"hidden_states", "pooled", "attention_mask"}
    assert out["hidden_states"].shape == (3, 16, 32) and out["pooled"].shape == (3, 32)
    torch.testing.assert_close(out["hidden_states"], ref.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out["pooled"], ref.pooler_output, rtol=0, atol=0)
    assert torch.equal(out["attention_mask"], mask)


def test_different_texts_give_different_embeddings(clip_dir: str) -> None:
    out = text(clip_dir).encode(["a photo of a cat", "a photo of a dog"], [0, 1])
    assert not torch.allclose(out["hidden_states"][0], out["hidden_states"][1])
    assert not torch.allclose(out["pooled"][0], out["pooled"][1])


def test_penultimate_layer_as_sdxl_uses_it(clip_dir: str) -> None:
    out = text(clip_dir, hidden_layer=-2).encode(TEXTS, [0, 1, 2])
    ref, _ = in_process(CLIPTextModel.from_pretrained(clip_dir), tiny_clip_tokenizer(), TEXTS, 16,
                        output_hidden_states=True)
    torch.testing.assert_close(out["hidden_states"], ref.hidden_states[-2], rtol=0, atol=0)


def test_projection_model_pools_text_embeds(tmp_path: str) -> None:
    path = build_tiny_clip(str(tmp_path), projection=True)
    out = text(path, max_length=8).encode(TEXTS, [0, 1, 2])
    ref, _ = in_process(CLIPTextModelWithProjection.from_pretrained(path), tiny_clip_tokenizer(), TEXTS, 8)
    assert out["pooled"].shape == (3, 24) and out["hidden_states"].shape == (3, 8, 32)
    torch.testing.assert_close(out["pooled"], ref.text_embeds, rtol=0, atol=0)


def test_t5_equals_an_in_process_run_and_has_no_pooled(t5_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cached.encoders.loading"):
        out = text(t5_dir, max_length=12).encode(TEXTS, [0, 1, 2])
    assert "with safetensors" in caplog.text  # the fast path, tied embeddings included
    ref, mask = in_process(T5EncoderModel.from_pretrained(t5_dir), tiny_t5_tokenizer(), TEXTS, 12)
    assert set(out) == {"hidden_states", "attention_mask"}
    torch.testing.assert_close(out["hidden_states"], ref.last_hidden_state)
    assert torch.equal(out["attention_mask"], mask) and int(mask[0].sum()) < 12


def test_t5_attention_mask_option_masks_padding(t5_dir: str) -> None:
    out = text(t5_dir, max_length=12, use_attention_mask=True).encode(TEXTS, [0, 1, 2])
    model = T5EncoderModel.from_pretrained(t5_dir)
    masked, _ = in_process(model, tiny_t5_tokenizer(), TEXTS, 12, use_mask=True)
    unmasked, _ = in_process(model, tiny_t5_tokenizer(), TEXTS, 12)
    torch.testing.assert_close(out["hidden_states"], masked.last_hidden_state)
    assert not torch.allclose(masked.last_hidden_state, unmasked.last_hidden_state)


def test_t5_half_precision_loads_as_the_library_does(t5_dir: str) -> None:
    """T5 keeps some modules in fp32 below fp32: the encoder defers to from_pretrained for that."""
    enc = text(t5_dir, max_length=12, dtype="fp16")
    ref = T5EncoderModel.from_pretrained(t5_dir, dtype=torch.float16)
    got = {k: v.dtype for k, v in enc._replicas[0].model.state_dict().items()}
    assert got == {k: v.dtype for k, v in ref.state_dict().items()}
    assert enc.encode(TEXTS, [0, 1, 2])["hidden_states"].shape == (3, 12, 32)


def test_fingerprint_covers_layer_length_dtype_and_tokenizer(clip_dir: str, tmp_path: str) -> None:
    base = text(clip_dir)
    assert text(clip_dir).fingerprint == base.fingerprint
    variants = [text(clip_dir, hidden_layer=-2), text(clip_dir, max_length=8), text(clip_dir, dtype="bf16"),
                text(clip_dir, use_attention_mask=True)]
    assert len({base.fingerprint, *(v.fingerprint for v in variants)}) == 5
    other = shutil.copytree(clip_dir, os.path.join(str(tmp_path), "clip"))
    tiny_clip_tokenizer(max_length=8).save_pretrained(other)
    assert json.loads(text(other, max_length=16).fingerprint)["tokenizer"] != json.loads(base.fingerprint)["tokenizer"]


def test_replicas_tokenize_and_encode_concurrently(clip_dir: str) -> None:
    enc = text(clip_dir, devices=["cpu", "cpu"])
    serial = enc.encode(TEXTS, [0, 1, 2])["hidden_states"]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def run(r: int) -> None:
        for _ in range(20):
            results[r].append(enc.encode(TEXTS, [0, 1, 2], replica=r)["hidden_states"])

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(h, serial) for r in (0, 1) for h in results[r]) and len(results[1]) == 20


def test_tokenizer_files_must_be_there(clip_dir: str, tmp_path: str) -> None:
    bare = os.path.join(str(tmp_path), "bare")
    os.makedirs(bare)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(clip_dir, name), bare)
    with pytest.raises(ValueError, match="no tokenizer files"):
        text(bare)


def test_absurdly_small_tokenizer_is_refused(clip_dir: str, tmp_path: str) -> None:
    small = shutil.copytree(clip_dir, os.path.join(str(tmp_path), "small"))
    os.unlink(os.path.join(small, "tokenizer.json"))
    CLIPTokenizer(vocab={"a": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}, merges=[]).save_pretrained(small)
    with pytest.raises(ValueError, match="3 tokens"):
        text(small)


def test_tokenizer_of_another_model_is_refused(clip_dir: str, t5_dir: str) -> None:
    with pytest.raises(ValueError, match="do not belong together"):
        text(t5_dir, tokenizer=clip_dir, max_length=12)


@pytest.mark.parametrize("options, match", [
    ({"padding": "longest"}, "'longest'"), ({"max_length": 0}, "max_length.*0"),
    ({"max_length": 100}, "max_length.*100"), ({"hidden_layer": 9}, "hidden_layer.*9"),
    ({"hidden_layer": "last"}, "'last'"), ({"dtype": "int8"}, "'int8'"),
    ({"transformers_class": "NotAModel"}, "'NotAModel'"), ({"use_attention_mask": 1}, "use_attention_mask"),
])
def test_bad_values_are_named(clip_dir: str, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        text(clip_dir, **options)
