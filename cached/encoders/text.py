"""`hf-text`: a transformers text encoder (CLIP, T5, others with `last_hidden_state`) and its tokenizer.

Options:
- `path`: a local directory with config.json and *.safetensors; the tokenizer is read from the same
  directory unless `tokenizer` names another (diffusers repos keep `text_encoder/` and `tokenizer/`
  apart). The model class is the config's `architectures[0]` unless `transformers_class` names one;
  encoder-decoder models (T5Model, ...) run their encoder only.
- `dtype`, `devices` (one replica each).
- `max_length`: tokens per text, default the tokenizer's `model_max_length` (77 for CLIP) or the
  config's `max_position_embeddings`; longer texts are truncated.
- `padding`: "max_length" only: every entry of an encoder has the same shape, whatever batch it was
  computed in ("longest" would make an entry depend on its batch-mates).
- `hidden_layer`: -1 (default) stores the model's output, `last_hidden_state` (after CLIP's final layer
  norm); any other value indexes `hidden_states` as transformers returns them (0 = embeddings), so -2
  is the penultimate layer's output, as SDXL uses it.
- `use_attention_mask`: pass the mask to the model. False by default, as the SD, SDXL, SD3 and Flux
  pipelines call CLIP and T5 without it.

Stored tensors: `hidden_states` (L, D), `pooled` (D) where the model has one (`text_embeds` of
CLIPTextModelWithProjection, else `pooler_output`), `attention_mask` (L,) int64.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

import torch

from .base import Encoder, Replica, parse_devices, parse_dtype, parse_flag
from .loading import load_model, weight_files
from .weights import WeightDigests

__all__ = ["HFText", "load_tokenizer", "TOKENIZER_FILES"]

log = logging.getLogger(__name__)

# Files a transformers tokenizer is built from; any of the first five makes a directory a tokenizer's.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model", "vocab.txt",
                   "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
MIN_VOCAB = 16


def load_tokenizer(directory: str, vocab_size: int | None = None) -> Any:
    """The tokenizer saved in `directory`; ValueError when there is none or it cannot be this model's.

    transformers can "load" a tokenizer from a directory without tokenizer files and return one with
    two tokens, which would silently turn every text into the same ids: refuse that.
    """
    from transformers import AutoTokenizer

    if not any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES[:5]):
        raise ValueError(f"{directory!r} has no tokenizer files (one of {list(TOKENIZER_FILES[:5])})")
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if len(tok) < MIN_VOCAB:
        raise ValueError(f"tokenizer in {directory!r} has {len(tok)} tokens: its files are missing or broken")
    if vocab_size is not None and len(tok) > vocab_size:
        raise ValueError(f"tokenizer in {directory!r} has {len(tok)} tokens but the model embeds only "
                         f"{vocab_size}: they do not belong together")
    return tok


class HFText(Encoder):
    kind = "hf-text"
    input = "text"

    def __init__(self, name: str, path: str, devices: list[str] | None = None, dtype: str = "fp32",
                 max_length: int | None = None, padding: str = "max_length", hidden_layer: int = -1,
                 tokenizer: str | None = None, transformers_class: str | None = None,
                 use_attention_mask: bool = False, digests: WeightDigests | None = None) -> None:
        from transformers import AutoConfig

        if padding != "max_length":
            raise ValueError(f"encoder {name!r}: padding must be 'max_length', got {padding!r}")
        self.name, self.use_mask = name, parse_flag("use_attention_mask", use_attention_mask)
        self.devices = parse_devices(devices)
        self.dtype = parse_dtype(dtype)
        files = _model_files(name, path)
        self.config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.cls = _model_class(self.config, transformers_class)
        self.tok_dir = tokenizer or path
        self.tokenizer = load_tokenizer(self.tok_dir, getattr(self.config, "vocab_size", None))
        self._tok_lock = threading.Lock()  # fast tokenizers refuse concurrent calls ("Already borrowed")
        self.max_length = _max_length(self.tokenizer, self.config, max_length)
        self.hidden_layer = _hidden_layer(self.config, hidden_layer)
        self._replicas = [Replica(dev, self._load(path, files, dev)) for dev in self.devices]
        self.fingerprint = self._fingerprint(digests or WeightDigests(), path, files, dtype)
        log.info("encoder %s: %s from %s on %s (%s), max_length %d, hidden_layer %d", name,
                 self.cls.__name__, path, self.devices, dtype, self.max_length, self.hidden_layer)

    def _load(self, path: str, files: list[str], device: str) -> Any:
        cls, config = self.cls, self.config
        model: Any = load_model(lambda: cls._from_config(config),
                           lambda: cls.from_pretrained(path, local_files_only=True, **_dtype_kwarg(self.dtype)),
                           files, device, self.dtype)
        return model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model

    def _fingerprint(self, digests: WeightDigests, path: str, files: list[str], dtype: str) -> str:
        tok_files = [os.path.join(self.tok_dir, f) for f in TOKENIZER_FILES
                     if os.path.isfile(os.path.join(self.tok_dir, f))]
        return json.dumps({
            "kind": self.kind, "class": self.cls.__name__, "weights": digests.files(files),
            "config": digests.file(os.path.join(path, "config.json")), "tokenizer": digests.files(tok_files),
            "dtype": dtype, "max_length": self.max_length, "padding": "max_length",
            "hidden_layer": self.hidden_layer, "attention_mask": self.use_mask,
        }, sort_keys=True)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, max_length), as `encode` feeds them to the model."""
        if not all(isinstance(t, str) for t in texts):
            raise TypeError(f"encoder {self.name!r} takes a list of strings")
        with self._tok_lock:
            enc = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length,
                                 truncation=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _encode(self, rep: Replica, batch: Any, seeds: list[int]) -> dict[str, torch.Tensor]:
        tokens = self.tokenize(batch)
        ids, mask = tokens["input_ids"].to(rep.device), tokens["attention_mask"].to(rep.device)
        out = rep.model(input_ids=ids, attention_mask=mask if self.use_mask else None,
                        output_hidden_states=self.hidden_layer != -1, return_dict=True)
        hidden = out.last_hidden_state if self.hidden_layer == -1 else out.hidden_states[self.hidden_layer]
        result = {"hidden_states": hidden, "attention_mask": mask}
        pooled = getattr(out, "text_embeds", None)
        if pooled is None:
            pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            result["pooled"] = pooled
        return result



def _model_files(name: str, path: str) -> list[str]:
    if not isinstance(path, str) or not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"encoder {name!r}: path {path!r} is not a directory with a config.json")
    files = weight_files(path, "model")
    if not files:
        raise ValueError(f"encoder {name!r}: {path!r} has no *.safetensors weights")
    return files


def _model_class(config: Any, override: str | None) -> Any:
    import transformers

    names = [override] if override else list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    if cls is None and not override:
        return transformers.AutoModel._model_mapping[type(config)]
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"transformers_class must name a transformers model class, got {names[0]!r}")
    return cls


def _max_length(tokenizer: Any, config: Any, max_length: int | None) -> int:
    limit = getattr(config, "max_position_embeddings", None)
    if max_length is None:
        model_max = getattr(tokenizer, "model_max_length", None)
        max_length = model_max if isinstance(model_max, int) and model_max <= 1_000_000 else limit
        if max_length is None:
            raise ValueError("max_length: neither the tokenizer nor the config gives one; set it")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length must be <= the model's {limit} positions, got {max_length!r}")
    return max_length


def _hidden_layer(config: Any, layer: int) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(layer, int) or isinstance(layer, bool) or (n is not None and not -n - 1 <= layer <= n):
        raise ValueError(f"hidden_layer must be an integer in [-{(n or 0) + 1}, {n}], got {layer!r}")
    return layer


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": dtype}
