"""Entry keys: a digest of a canonical encoding of everything that determines an entry's bytes.

source content + transform (or exact text) + encoder fingerprint + entry format version. A rewritten
image, another VAE, another dtype or another crop is another key, so nothing stale is ever served.
"""

from __future__ import annotations

import hashlib
import json

from cached_client.specs import ImageSpec, Spec

from ..images import RESIZE_FILTER

__all__ = ["FORMAT_VERSION", "entry_key", "transform_of"]

FORMAT_VERSION = 1


def transform_of(spec: Spec) -> dict[str, object]:
    if isinstance(spec, ImageSpec):
        crop = list(spec.crop) if isinstance(spec.crop, tuple) else spec.crop
        return {"size": list(spec.size), "filter": RESIZE_FILTER, "crop": crop, "flip": spec.flip}
    return {"text": spec.text}


def entry_key(source_digest: bytes, spec: Spec, fingerprint: str) -> bytes:
    """32-byte blake2b of the canonical JSON of the key's parts."""
    canonical = json.dumps(
        {"v": FORMAT_VERSION, "source": source_digest.hex(), "transform": transform_of(spec),
         "encoder": fingerprint},
        sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode(), digest_size=32).digest()
