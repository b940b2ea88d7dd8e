"""Where does the shapes fixture lose its shapes? Cheap readings to judge a training run before the
full evaluation.

The evaluation (`shapes_world.evaluate`) says how often samples read right; this says which stage
loses them, on fresh scenes of the trained combinations whose attributes are known:

  round trip      the autoencoder alone: scene -> VAE encode -> decode -> reader (and with isotropic
                  noise added to the latent: how much error the decoder tolerates)
  x0 at t         the UNet alone: the scene's latent noised to timestep t, the UNet's prediction of the
                  clean latent (at the bench's cfg, with the scene's plain caption), decoded -> reader

A sample is the decoder applied to the sampler's last prediction, made at a low noise level (t about
50 for euler / normal / 20 steps): if the x0 readings at low t are far under the round trip, the
UNet's refinement is what rounds the shapes, whatever the layout it was given.

  python -m shapes_world.diagnose [--weights shapes_world/.work/candidate] [--scenes 64] [--autoencoder-only]
"""
import argparse
import sys

import numpy as np
import torch

TIMESTEPS = (20, 50, 100, 200, 300, 500, 700, 999)
# Latent noise variances for the decoder's tolerance: about the x0 predictions' errors at t = 20 (cfg 1,
# cfg 5) and twice the larger. Structured UNet errors that cost more than isotropic noise of the same
# size point at the UNet; isotropic noise that already costs shapes points at the decoder.
LATENT_NOISE = (0.006, 0.019, 0.04)


def main(argv=None):
    from memorizer.data import SAMPLER_SETTINGS
    ap = argparse.ArgumentParser(description="readings of the shapes fixture's stages (see module docstring)")
    ap.add_argument("--weights", help="weights folder to judge (default: shapes_world/weights)")
    ap.add_argument("--scenes", type=int, default=64)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cfg", type=float, help="guidance scale of the x0 predictions (default: the bench's)")
    ap.add_argument("--autoencoder-only", action="store_true",
                    help="round trips only (judges an autoencoder before a UNet is trained on its latents)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from host.comfy_env import import_comfy
    import_comfy()
    import comfy.sd
    from memorizer import train as mt
    from memorizer.build_checkpoint import assemble_state_dict
    from shapes_world.build_checkpoint import WEIGHTS_DIR
    from shapes_world.reader import AttributeReader
    from shapes_world.scenes import World

    world = World.load()
    reader = AttributeReader(world)
    model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
        assemble_state_dict(args.weights or WEIGHTS_DIR), output_vae=True, output_clip=True)
    unet, fmt = model.model.diffusion_model, model.model.latent_format
    rng = np.random.default_rng(args.seed)
    captions, pixels, scenes = zip(*[world.sample(rng) for _ in range(args.scenes)])
    x0 = fmt.process_in(vae.encode(torch.from_numpy(np.stack(pixels)).float().div(255.0)))

    def read_right(latents):
        images = vae.decode(fmt.process_out(latents)).float().reshape(-1, world.resolution, world.resolution, 3)
        return np.mean([reader.read(im).attributes == s.attributes for im, s in zip(images.numpy(), scenes)])

    print(f"{args.scenes} fresh scenes of trained combinations; weights {args.weights or WEIGHTS_DIR}; "
          f"cfg {SAMPLER_SETTINGS['cfg'] if args.cfg is None else args.cfg}")
    print(f"round trip (autoencoder alone): {read_right(x0):.1%} read right")
    tolerance = torch.Generator().manual_seed(args.seed + 1)
    for var in LATENT_NOISE:
        noisy = x0 + var ** 0.5 * torch.randn(x0.shape, generator=tolerance)
        print(f"round trip with isotropic latent noise of variance {var}: {read_right(noisy):.1%} read right")
    if args.autoencoder_only:
        return 0
    cond = torch.cat([mt.encode_caption(clip, c) for c in captions])
    empty = mt.encode_caption(clip, "").expand_as(cond)
    cfg = float(SAMPLER_SETTINGS["cfg"] if args.cfg is None else args.cfg)
    acp = mt.alphas_cumprod().float()
    g = torch.Generator().manual_seed(args.seed)
    n = len(scenes)
    for t in TIMESTEPS:
        a = acp[t]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
        eps = unet(torch.cat([xt, xt]), torch.full((2 * n,), float(t)), context=torch.cat([cond, empty]))
        eps = eps[n:] + cfg * (eps[:n] - eps[n:])
        pred = (xt - (1 - a).sqrt() * eps) / a.sqrt()
        print(f"x0 prediction at t={t:3d} (SNR {float(a / (1 - a)):7.3f}): {read_right(pred):.1%} read right, "
              f"latent MSE {float(((pred - x0) ** 2).mean()):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
