"""Build an embedding set from a folder of images, with the VAE of a checkpoint.

    python -m tools.build_embedding_set IMAGES_DIR --checkpoint sd-v1-4.ckpt --out guarded.safetensors

Runs ComfyUI's own VAE code (from --comfyui, default the host in .cache/ComfyUI), so the
latents match what the graph's VAEEncode makes. Images must all have the generation size.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image

from host.comfy_env import import_comfy
from nudging_core import embedding_set as sets

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = int(width * done / max(1, total))
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def read_images(folder: str) -> tuple[list[str], torch.Tensor]:
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise SystemExit(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    arrays = [np.asarray(Image.open(os.path.join(folder, f)).convert("RGB"), dtype=np.float32) / 255.0 for f in files]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise SystemExit(f"images differ in size ({sorted(sizes)}); resize them all to the generation size first")
    return [os.path.splitext(f)[0] for f in files], torch.from_numpy(np.stack(arrays))


def build(folder: str, checkpoint: str, store_pixels: bool = True, batch: int = 4) -> sets.EmbeddingSet:
    import_comfy()
    import comfy.sd

    names, images = read_images(folder)
    _, _, vae, _ = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=False)[:4]
    latents = []
    for start in range(0, images.shape[0], batch):
        latents.append(vae.encode(images[start:start + batch]).float().cpu())
        progress(min(start + batch, images.shape[0]), images.shape[0], "encoding")
    return sets.EmbeddingSet(latents=torch.cat(latents), names=names, encoder=sets.encoder_identity(vae),
                             pixels=sets.pixels_to_uint8(images) if store_pixels else None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", help="folder of images (all of the generation size)")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint whose VAE the graph uses")
    parser.add_argument("--out", required=True, help="output .safetensors file (never overwritten)")
    parser.add_argument("--no-pixels", action="store_true", help="do not store pixel copies (no tiled-L2 test)")
    parser.add_argument("--comfyui", help="ComfyUI folder (default: the host in .cache/ComfyUI)")
    args = parser.parse_args(argv)
    if args.comfyui:
        os.environ["COMFYUI_DIR"] = args.comfyui
    out = os.path.abspath(args.out if args.out.endswith(sets.EXTENSION) else args.out + sets.EXTENSION)
    if os.path.exists(out):
        raise SystemExit(f"{out} exists; choose another --out (sets are never overwritten)")
    built = build(args.images, args.checkpoint, store_pixels=not args.no_pixels)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    sets.save_set(built, out)
    print(f"saved {len(built)} items, latents {list(built.latent_shape)}, to {out}")


if __name__ == "__main__":
    main()
