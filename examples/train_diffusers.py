"""A real diffusers training loop that reads latents and text embeddings through cached.

The DataLoader workers hold no VAE and no text encoder: they ask the daemon for each batch's
latents ("vae") and caption embeddings ("clip") and get zero-copy views of shared memory. The loop
is the standard text-to-image denoising objective: add scheduler noise to the latents, predict it
with a UNet conditioned on the caption embeddings, MSE, step.

    python examples/train_diffusers.py --address unix:///run/cached/cached.sock --images DIR \\
        --size 512x512 --steps 100

Captions come from `<image>.txt` beside each image (the file stem when there is none). With
`--tiny-unet` the UNet is a small one built from a config (what `make test` runs); otherwise pass
`--unet DIR` with a diffusers UNet2DConditionModel whose cross_attention_dim matches the text encoder.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cached_client import CacheClient, ImageSpec, TextSpec
from cached_client.specs import IMAGE_EXTENSIONS
from cached_client.torch import BucketBatchSampler, CachedDataset


def dataset_specs(image_dir: str, size: tuple[int, int]) -> tuple[list[ImageSpec], list[TextSpec]]:
    images, captions = [], []
    for name in sorted(os.listdir(image_dir)):
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        path = os.path.join(image_dir, name)
        caption_path = os.path.splitext(path)[0] + ".txt"
        caption = open(caption_path).read().strip() if os.path.exists(caption_path) else os.path.splitext(name)[0]
        images.append(ImageSpec(path, size))
        captions.append(TextSpec(caption))
    if not images:
        raise SystemExit(f"no images in {image_dir}")
    return images, captions


def build_unet(args: argparse.Namespace, latent_channels: int, text_dim: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    if args.unet:
        return UNet2DConditionModel.from_pretrained(args.unet)
    return UNet2DConditionModel(
        sample_size=args.size[1] // 8, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=text_dim, attention_head_dim=8)


def train(args: argparse.Namespace) -> float:
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    client = CacheClient(args.address)
    images, captions = dataset_specs(args.images, args.size)
    columns = {args.vae_encoder: images, args.text_encoder: captions}
    dataset = CachedDataset(client, columns)
    sampler = BucketBatchSampler(images, batch_size=args.batch_size, seed=args.seed, prefetch=(client, columns))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers,
                        persistent_workers=args.workers > 0)
    probe = dataset[0]
    unet = build_unet(args, probe["latent"].shape[0], probe["hidden_states"].shape[-1]).train()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    step, loss_value, start = 0, math.nan, time.perf_counter()
    for epoch in range(10**9):
        sampler.set_epoch(epoch)
        for batch in loader:
            latents, text = batch["latent"].float(), batch["hidden_states"].float()
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
            pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
            loss = F.mse_loss(pred, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step, loss_value = step + 1, float(loss)
            if step % args.log_every == 0 or step == args.steps:
                print(f"step {step:>5}  loss {loss_value:.4f}  {step / (time.perf_counter() - start):.2f} steps/s",
                      flush=True)
            if step >= args.steps:
                return loss_value
    return loss_value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="daemon address (default: resolved as cachectl does)")
    p.add_argument("--images", required=True, help="directory of images (+ optional .txt captions)")
    p.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(64, 64),
                   help="WIDTHxHEIGHT")
    p.add_argument("--vae-encoder", default="vae")
    p.add_argument("--text-encoder", default="clip")
    p.add_argument("--unet", help="a diffusers UNet2DConditionModel directory")
    p.add_argument("--tiny-unet", action="store_true", help="a small UNet built from a config")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    args = p.parse_args()
    if not args.unet and not args.tiny_unet:
        p.error("pass --unet DIR or --tiny-unet")
    loss = train(args)
    print(f"final loss {loss:.4f}")
    if not math.isfinite(loss):
        raise SystemExit("loss is not finite")


if __name__ == "__main__":
    main()
