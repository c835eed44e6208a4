"""A minimal trainer process for tests: it imports only torch and the thin client, reads latents
through DataLoader workers, and prints what each worker saw as JSON lines.

    python dataloader_trainer.py ADDRESS METHOD WORKERS SPEC_JSON...
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys

import torch
from torch.utils.data import DataLoader, Dataset

from cached_client import CacheClient, ImageSpec


class LatentDataset(Dataset):
    def __init__(self, client: CacheClient, specs: list[ImageSpec]) -> None:
        self.client = client
        self.specs = specs

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> dict:
        [e] = self.client.get([self.specs[i]], encoder="vae")
        latent = e["latent"]
        params = sum(isinstance(o, torch.nn.Parameter) for o in gc.get_objects())
        return {"key": e.key, "pid": os.getpid(), "params": params,
                "sha": hashlib.sha256(latent.numpy().tobytes()).hexdigest(),
                "heavy": sorted(m for m in ("diffusers", "transformers") if m in sys.modules)}


def main() -> None:
    address, method, workers, *raw = sys.argv[1:]
    client = CacheClient(address)  # made in the parent, used in every worker
    specs = [ImageSpec(p, (s, s)) for p, s in (json.loads(r) for r in raw)]
    loader = DataLoader(LatentDataset(client, specs), batch_size=None, num_workers=int(workers),
                        multiprocessing_context=method)
    for item in loader:
        print(json.dumps(item), flush=True)


if __name__ == "__main__":
    main()
