"""Small real things for demos, tests and benchmarks on machines with no model weights: a tiny
AutoencoderKL with random weights saved like a real one, tiny CLIP and T5 text encoders with
tokenizers built in code from a small vocabulary, and synthetic photos."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["settle", "build_tiny_vae", "build_tiny_clip", "build_tiny_t5", "tiny_clip_tokenizer", "tiny_t5_tokenizer",
           "write_images", "TINY_VAE_CONFIG", "TINY_WORDS"]

# Four down blocks give the real 8x downsampling; 4 latent channels as in SD 1.5 / SDXL.
TINY_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1, "norm_num_groups": 32, "sample_size": 256, "scaling_factor": 0.13025,
}


def build_tiny_vae(path: str, seed: int = 0, **overrides: object) -> str:
    """Saves a randomly initialised AutoencoderKL (config.json + safetensors) to `path`."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**{**TINY_VAE_CONFIG, **overrides})
    vae.save_pretrained(path, safe_serialization=True)  # type: ignore[attr-defined]  # ModelMixin, untyped
    return path


# Words the tiny tokenizers know whole; any other text still tokenizes (CLIP: bytes, T5: letters).
TINY_WORDS = ("a", "photo", "of", "cat", "dog", "the", "in", "on", "red", "blue", "painting", "house")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which CLIP's BPE works on."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    cs = list(bs)
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 printable bytes keep their own code point
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def tiny_clip_tokenizer(max_length: int = 16) -> Any:
    """A CLIPTokenizer from an in-code vocabulary: every byte, and BPE merges for TINY_WORDS."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair, merged = (parts[0], parts[1]), parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            parts = [merged, *parts[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)  # type: ignore[arg-type]


def tiny_t5_tokenizer() -> Any:
    """A T5Tokenizer (unigram) from an in-code vocabulary of letters and TINY_WORDS."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    pieces += [("\u2581" + w, -1.0) for w in TINY_WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def build_tiny_clip(path: str, seed: int = 0, projection: bool = False, max_length: int = 16) -> str:
    """Saves a random tiny CLIPTextModel (or ...WithProjection) and its tokenizer to `path`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = tiny_clip_tokenizer(max_length)
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=max_length, projection_dim=24,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_t5(path: str, seed: int = 0) -> str:
    """Saves a random tiny T5EncoderModel and its tokenizer to `path`."""
    import torch
    from transformers import T5Config, T5EncoderModel

    tok = tiny_t5_tokenizer()
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    T5EncoderModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_images(directory: str, n: int, sizes: list[tuple[int, int]] | None = None, seed: int = 0,
                 fmt: str = "png") -> list[str]:
    """`n` smooth synthetic images (gradients plus shapes and noise), cycling through `sizes`."""
    from PIL import Image, ImageDraw

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = sizes or [(256, 256)]
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin((xx + yy) / (7 + i % 13))], axis=-1)
        img = Image.fromarray((255 * (0.7 * base + 0.3 * rng.random((h, w, 3)))).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
            x1, y1 = min(w - 1, x0 + int(rng.integers(1, w // 2 + 2))), min(h - 1, y0 + int(rng.integers(1, h // 2 + 2)))
            draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = os.path.join(directory, f"img_{i:05d}.{fmt}")
        img.save(path)
        paths.append(path)
    return paths


def settle(*paths: str) -> None:
    """Waits until every file under `paths` changed longer ago than cached_client.stamp.RACY_NS, so
    its stamp is trusted and the memos and handle caches keyed by stamps apply to it."""
    import time

    from cached_client.stamp import RACY_NS

    newest = 0
    for path in paths:
        for root, _, names in os.walk(path) if os.path.isdir(path) else [("", [], [path])]:
            for name in names:
                st = os.stat(os.path.join(root, name))
                newest = max(newest, st.st_ctime_ns, st.st_mtime_ns)
    wait_ns = newest + RACY_NS - time.time_ns()
    if wait_ns > 0:
        time.sleep(wait_ns / 1e9 + 0.01)
