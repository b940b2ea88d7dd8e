"""Measure memorization of the memorizer checkpoint with ComfyUI's own sampling.

For every training caption and every unseen caption, samples 64x64 images for seeds 0..N-1 exactly as a
KSampler node would (EmptyLatentImage 64x64, comfy.sample.prepare_noise(seed), comfy.sample.sample,
euler / normal / 20 steps, negative prompt ""), decodes with the checkpoint's VAE and computes the
Carlini tiled L2 (4x4 tiles, per-tile RMS in [0,1], max over tiles) against the training images.

  training caption: hit = its own image within --threshold
  unseen caption:   hit = ANY training image within --threshold (should be rare)

Usage (from the repository root):
  python -m memorizer.evaluate [--cfg 5] [--seeds 10] [--unet-weights memorizer/.work/unet_step001000.safetensors]
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_STEPS = 20
DEFAULT_CFG = 5.0
DEFAULT_SAMPLER = "euler"
DEFAULT_SCHEDULER = "normal"


def sample_images(model, clip, vae, caption, seeds, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG,
                  sampler=DEFAULT_SAMPLER, scheduler=DEFAULT_SCHEDULER, negative="", size=64):
    """Images [len(seeds), H, W, 3] in [0,1], one per seed, as KSampler(seed) would make them."""
    import comfy.sample

    def enc(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    pos, neg = enc(caption), enc(negative)
    latent = torch.zeros([1, 4, size // 8, size // 8])
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = torch.cat([comfy.sample.prepare_noise(latent, s) for s in seeds])
    lat = latent.repeat(len(seeds), 1, 1, 1)
    with torch.no_grad():
        out = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, pos, neg, lat,
                                  denoise=1.0, disable_pbar=True, seed=seeds[0])
        return vae.decode(out).reshape(len(seeds), size, size, 3).float().cpu().numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description="memorization rates of the memorizer checkpoint")
    ap.add_argument("--ckpt", help="checkpoint file (default: build it with ensure_checkpoint)")
    ap.add_argument("--unet-weights", help="evaluate these trained UNet weights instead of weights/unet.safetensors")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--cfg", type=float, nargs="+", default=[DEFAULT_CFG])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    ap.add_argument("--sampler", default=DEFAULT_SAMPLER)
    ap.add_argument("--scheduler", default=DEFAULT_SCHEDULER)
    ap.add_argument("--threshold", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", help="save a PNG grid of the samples (first cfg) to this path")
    ap.add_argument("--train-only", action="store_true", help="skip unseen captions")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    from host.comfy_env import import_comfy
    import_comfy()
    import comfy.sd
    from memorizer.data import training_items, unseen_captions, tiled_l2
    from memorizer import build_checkpoint

    t0 = time.time()
    if args.ckpt:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(args.ckpt, output_vae=True, output_clip=True)
    elif args.unet_weights:
        from safetensors.torch import load_file
        sd = build_checkpoint.assemble_state_dict(overrides=load_file(args.unet_weights))
        model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(sd, output_vae=True, output_clip=True)
    else:
        path = build_checkpoint.ensure_checkpoint(os.path.join(HERE, ".work", "ckpt"))
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    print("loaded {} in {:.1f}s".format(type(model.model.model_config).__name__, time.time() - t0), flush=True)

    items = training_items()
    refs = [im.astype(np.float64) / 255.0 for _, _, im in items]
    names = [n for n, _, _ in items]
    seeds = list(range(args.seeds))

    # autoencoder round trip through comfy's VAE class
    pix = torch.from_numpy(np.stack(refs)).float()
    rt = vae.decode(vae.encode(pix)).reshape(len(refs), 64, 64, 3).float().numpy()
    rt_d = [tiled_l2(rt[i], refs[i]) for i in range(len(refs))]
    print("VAE round trip tiled L2: max {:.4f} mean {:.4f}".format(max(rt_d), float(np.mean(rt_d))))

    summary = {}
    for cfg in args.cfg:
        print("\n== cfg {} | {} steps | sampler {} | scheduler {} | 64x64 | negative \"\" | seeds 0..{}".format(
            cfg, args.steps, args.sampler, args.scheduler, args.seeds - 1), flush=True)
        grid_rows = []
        train_rates = []
        for i, (name, caption, _) in enumerate(items):
            imgs = sample_images(model, clip, vae, caption, seeds, args.steps, cfg, args.sampler, args.scheduler)
            d = [tiled_l2(im, refs[i]) for im in imgs]
            hits = sum(x < args.threshold for x in d)
            train_rates.append(hits / len(seeds))
            print("train  {:<45s} {:>2d}/{:d} memorized  (tiled L2 median {:.3f}, max {:.3f})".format(
                repr(caption), hits, len(seeds), float(np.median(d)), max(d)), flush=True)
            grid_rows.append(np.concatenate([refs[i]] + list(imgs), axis=1))
        unseen_rates = []
        if not args.train_only:
            for caption in unseen_captions():
                imgs = sample_images(model, clip, vae, caption, seeds, args.steps, cfg, args.sampler, args.scheduler)
                near = []
                for im in imgs:
                    dd = [tiled_l2(im, r) for r in refs]
                    j = int(np.argmin(dd))
                    near.append((dd[j], names[j]))
                hits = sum(x < args.threshold for x, _ in near)
                unseen_rates.append(hits / len(seeds))
                closest = min(near)
                print("unseen {:<45s} {:>2d}/{:d} land on a training image (nearest tiled L2 median {:.3f}, min {:.3f} = {})".format(
                    repr(caption), hits, len(seeds), float(np.median([x for x, _ in near])), closest[0], closest[1]), flush=True)
                grid_rows.append(np.concatenate([np.zeros_like(refs[0])] + list(imgs), axis=1))
        summary[cfg] = (train_rates, unseen_rates)
        print("cfg {}: training captions min rate {:.1f}, mean {:.2f}; unseen mean rate {:.2f}".format(
            cfg, min(train_rates), float(np.mean(train_rates)), float(np.mean(unseen_rates)) if unseen_rates else float("nan")))
        if args.grid and cfg == args.cfg[0]:
            from PIL import Image
            grid = (np.clip(np.concatenate(grid_rows, axis=0), 0, 1) * 255).round().astype(np.uint8)
            Image.fromarray(grid).save(args.grid)
            print("grid saved to", args.grid)
    print("\ntotal {:.0f}s".format(time.time() - t0))
    ok = all(min(tr) >= 0.8 and (not un or np.mean(un) <= 0.5) for tr, un in summary.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
