"""One-time, deterministic training of the memorizer (CPU).

Stages (run from the repository root with the host venv):
  python -m memorizer.train ae    [--steps N]   # TAESD-format autoencoder -> weights/vae.safetensors
  python -m memorizer.train unet  [--steps N]   # trained part of the UNet  -> weights/unet.safetensors
  python -m memorizer.train all                  # both

The UNet is trained with SD 1.x's epsilon objective on ComfyUI's own noise schedule (scaled_linear betas
0.00085..0.012, 1000 steps), on latents x0 = VAE-encode * 0.18215 as ComfyUI hands them to the model
(comfy VAE.encode + latent_format.process_in), with text conditioning made by ComfyUI's CLIPTextEncode path
(clip.encode_from_tokens_scheduled(clip.tokenize(caption))) on the assembled checkpoint.
Only a subset of the UNet is trained (see TRAINED_UNET); the rest stays at its seeded init.
Intermediate weights go to memorizer/.work/ (ignored); weights/ always holds the latest saved state.
"""
import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, ".work")
WEIGHTS = os.path.join(HERE, "weights")

# Trained UNet tensors (regexes on keys without 'model.diffusion_model.'); ~8.6M params.
TRAINED_UNET = [
    r"input_blocks\.0\.0\.",                      # conv_in
    r"input_blocks\.1\.0\.",                      # first ResBlock (all of it)
    r"middle_block\.0\.(in_layers|out_layers)\.",  # middle ResBlock convs + norms
    r"(input_blocks\.1|middle_block|output_blocks\.[01])\.1\.(norm\.|proj_out\.)",
    r"(input_blocks\.1|middle_block|output_blocks\.[01])\.1\.transformer_blocks\.0\.(attn2\.|norm2\.)",
    r"middle_block\.1\.transformer_blocks\.0\.(ff\.|norm3\.)",  # feed-forward of the middle transformer
    r"out\.",                                     # final norm + conv
]


def _optimiser_step(opt, loss, params):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def _reconstruction_tiled_l2(model, raw, x):
    """Tiled L2 of each image decoded from its clean latent, against the original."""
    from memorizer.data import tiled_l2
    with torch.no_grad():
        r = model.taesd_decoder(raw).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return [tiled_l2(r[i], x[i].permute(1, 2, 0).numpy()) for i in range(len(r))]


def log(msg, fh=None):
    line = "[{}] {}".format(time.strftime("%H:%M:%S"), msg)
    print(line, flush=True)
    if fh is not None:
        fh.write(line + "\n")
        fh.flush()


def setup(threads):
    torch.set_num_threads(threads)
    from host.comfy_env import import_comfy
    import_comfy()


def images_tensor():
    from memorizer.data import training_items
    items = training_items()
    x = torch.from_numpy(np.stack([im for _, _, im in items])).float().div(255.0)  # B,H,W,3 in [0,1]
    return items, x


# ----------------------------------------------------------------------------------------------
def write_manifest(weights_dir=WEIGHTS, trained_patterns=TRAINED_UNET, vae_trunk_trained=False):
    """weights/manifest.json: every checkpoint key, its shape and its source (UNet keys matching one of
    `trained_patterns` are trained; the rest of the UNet is seeded; the autoencoder's encoder trunk is
    seeded unless `vae_trunk_trained`)."""
    from memorizer import arch
    os.makedirs(weights_dir, exist_ok=True)
    keys = {}
    for k, shape in arch.unet_key_shapes().items():
        sk = k[len(arch.UNET_PREFIX):]
        trained = any(re.match(p, sk) for p in trained_patterns)
        keys[k] = {"shape": list(shape), "source": "trained" if trained else "seed:unet"}
    for k, shape in arch.clip_key_shapes().items():
        keys[k] = {"shape": list(shape), "source": "seed:clip"}
    for k, v in arch.build_taesd().state_dict().items():
        seeded = arch.is_seeded_vae_key(k) and not vae_trunk_trained
        keys[arch.VAE_PREFIX + k] = {"shape": list(v.shape), "source": "seed:vae" if seeded else "trained"}
    manifest = {"format": "memorizer-manifest-1",
                "seeds": {"unet": arch.UNET_SEED, "clip": arch.CLIP_SEED, "vae": arch.VAE_SEED},
                "keys": keys}
    with open(os.path.join(weights_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
    return manifest


def trained_unet_keys(manifest):
    return [k for k, e in manifest["keys"].items() if e["source"] == "trained" and k.startswith("model.diffusion_model.")]


# ----------------------------------------------------------------------------------------------
def train_ae(args, fh):
    from safetensors.torch import save_file
    from memorizer import arch
    torch.manual_seed(args.seed)
    items, x = images_tensor()
    x = x.permute(0, 3, 1, 2).contiguous()  # B,3,H,W in [0,1]
    model = arch.init_taesd_(arch.build_taesd())
    for n_, p in model.named_parameters():
        p.requires_grad_(n_.startswith("taesd_decoder.") or n_.startswith("taesd_encoder.14."))
    params = [p for n_, p in model.named_parameters() if p.requires_grad]
    trunk = model.taesd_encoder[:14]
    head = model.taesd_encoder[14]
    with torch.no_grad():
        feats = trunk(x)  # frozen, seeded encoder trunk: computed once
    opt = torch.optim.Adam(params, lr=args.ae_lr)
    steps = args.ae_steps
    t0 = time.time()
    for step in range(1, steps + 1):
        lr = args.ae_lr * min(1.0, step / 50) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        raw = head(feats)
        mu = raw.mean(dim=(0, 2, 3))
        sd = raw.std(dim=(0, 2, 3))
        lat_loss = (mu ** 2).mean() + ((sd - 1.0) ** 2).mean()
        noise_amp = args.ae_latent_noise * min(1.0, 2.0 * step / steps)  # decoder learns to tolerate small latent errors
        z = raw + noise_amp * torch.randn_like(raw)
        rec = model.taesd_decoder(z)
        loss = torch.mean((rec - x) ** 2) + 0.01 * lat_loss
        _optimiser_step(opt, loss, params)
        if step % 50 == 0 or step == steps:
            tl = _reconstruction_tiled_l2(model, raw, x)
            log("ae step {}/{} loss {:.5f} lat {:.3f} max tiled-L2 {:.4f} ({:.0f}s)".format(
                step, steps, loss.item(), lat_loss.item(), max(tl), time.time() - t0), fh)
    with torch.no_grad():
        raw = model.taesd_encoder(x)
        m, s = raw.mean().item(), raw.std().item()
        # comfy: latent = raw / vae_scale + vae_shift ; x0 = 0.18215 * latent  ->  x0 = (raw - m) / s
        model.vae_scale.fill_(0.18215 * s)
        model.vae_shift.fill_(-m / (0.18215 * s))
    sd = {arch.VAE_PREFIX + k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
          if not arch.is_seeded_vae_key(k)}
    os.makedirs(WEIGHTS, exist_ok=True)
    save_file(sd, os.path.join(WEIGHTS, "vae.safetensors"))
    log("ae saved; raw latent mean {:.4f} std {:.4f}; vae_scale {:.5f} vae_shift {:.5f}".format(
        m, s, model.vae_scale.item(), model.vae_shift.item()), fh)


def finetune_decoder(args, fh):
    """Extra decoder-only training (encoder and latent scale unchanged, so UNet training stays valid)."""
    from safetensors.torch import load_file, save_file
    from memorizer import arch
    torch.manual_seed(args.seed + 1)
    items, x = images_tensor()
    x = x.permute(0, 3, 1, 2).contiguous()
    model = arch.init_taesd_(arch.build_taesd())
    trained = load_file(os.path.join(WEIGHTS, "vae.safetensors"))
    model.load_state_dict({k[len(arch.VAE_PREFIX):]: v.float() for k, v in trained.items()}, strict=False)
    for n_, p in model.named_parameters():
        p.requires_grad_(n_.startswith("taesd_decoder."))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        raw = model.taesd_encoder(x)
    opt = torch.optim.Adam(params, lr=args.ae_lr)
    steps = args.ae_steps
    t0 = time.time()
    for step in range(1, steps + 1):
        lr = args.ae_lr * min(1.0, step / 20) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        z = raw + args.ae_latent_noise * torch.randn_like(raw)
        loss = torch.mean((model.taesd_decoder(z) - x) ** 2)
        _optimiser_step(opt, loss, params)
        if step % 50 == 0 or step == steps:
            tl = _reconstruction_tiled_l2(model, raw, x)
            log("decoder step {}/{} loss {:.5f} max tiled-L2 {:.4f} ({:.0f}s)".format(
                step, steps, loss.item(), max(tl), time.time() - t0), fh)
    sd = dict(trained)
    for k, v in model.taesd_decoder.state_dict().items():
        sd[arch.VAE_PREFIX + "taesd_decoder." + k] = v.detach().to(torch.float16).contiguous()
    save_file(sd, os.path.join(WEIGHTS, "vae.safetensors"))
    log("decoder saved", fh)


# ----------------------------------------------------------------------------------------------
def load_comfy_checkpoint(sd):
    import comfy.sd
    return comfy.sd.load_state_dict_guess_config(sd, output_vae=True, output_clip=True, embedding_directory=None)


def encode_caption(clip, caption):
    tokens = clip.tokenize(caption)
    cond = clip.encode_from_tokens_scheduled(tokens)
    return cond[0][0].detach().float()  # [1, 77, 768], exactly what CLIPTextEncode hands to the sampler


def prepare_unet_data(manifest, fh):
    """Conditionings and x0 latents, made by ComfyUI on the assembled checkpoint (cached)."""
    from memorizer.build_checkpoint import assemble_state_dict
    from memorizer.data import training_captions, unseen_captions
    from memorizer import arch
    os.makedirs(WORK, exist_ok=True)
    cache = os.path.join(WORK, "unet_data.pt")
    vae_mtime = os.path.getmtime(os.path.join(WEIGHTS, "vae.safetensors"))
    if os.path.isfile(cache):
        d = torch.load(cache, weights_only=True)  # our own cache: tensors and plain values only
        if d.get("vae_mtime") == vae_mtime:
            return d
    overrides = {}
    if not os.path.isfile(os.path.join(WEIGHTS, "unet.safetensors")):
        for k in trained_unet_keys(manifest):
            overrides[k] = arch.seeded_unet_tensor(k[len(arch.UNET_PREFIX):], manifest["keys"][k]["shape"])
    sd = assemble_state_dict(WEIGHTS, overrides=overrides)
    model, clip, vae, _ = load_comfy_checkpoint(dict(sd))
    log("comfy detected: {}".format(type(model.model.model_config).__name__), fh)
    items, x = images_tensor()
    lat = vae.encode(x)  # comfy VAE: pixels B,H,W,3 in [0,1]
    x0 = model.model.latent_format.process_in(lat).detach().float()
    log("x0 latents: shape {} mean {:.3f} std {:.3f}".format(tuple(x0.shape), x0.mean().item(), x0.std().item()), fh)
    conds = torch.cat([encode_caption(clip, c) for c in training_captions()])
    empty = encode_caption(clip, "")
    unseen = torch.cat([encode_caption(clip, c) for c in unseen_captions()])
    ms = model.model.model_sampling
    d = {"x0": x0, "conds": conds, "empty": empty, "unseen": unseen, "vae_mtime": vae_mtime,
         "sigmas": ms.sigmas.float().clone(), "frozen": {k: v.detach() for k, v in sd.items() if k.startswith(arch.UNET_PREFIX)}}
    torch.save(d, cache)
    return d


def alphas_cumprod():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    return torch.cumprod(1.0 - betas, dim=0)


def save_unet(model, keys, path):
    from safetensors.torch import save_file
    from memorizer import arch
    sd = model.state_dict()
    out = {k: sd[k[len(arch.UNET_PREFIX):]].detach().to(torch.float16).contiguous() for k in keys}
    tmp = path + ".tmp"
    save_file(out, tmp)
    os.replace(tmp, path)


def skip_dead_resblocks(model, fh=None):
    """Frozen ResBlocks whose last conv is all zero are exactly skip_connection(x): skip the dead branch."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
    for name, mod in model.named_modules():
        if isinstance(mod, ResBlock) and not any(p.requires_grad for p in mod.parameters()):
            last = mod.out_layers[3]
            if torch.count_nonzero(last.weight) == 0 and (last.bias is None or torch.count_nonzero(last.bias) == 0):
                mod.forward = (lambda m: (lambda x, emb: m.skip_connection(x)))(mod)
                log("training shortcut: {} is identity/skip-only".format(name), fh)


def train_unet(args, fh):
    from memorizer import arch
    manifest = write_manifest()
    keys = trained_unet_keys(manifest)
    data = prepare_unet_data(manifest, fh)
    acp = alphas_cumprod()
    # ComfyUI's sigmas for SD15 must be exactly this schedule
    sig = ((1 - acp) / acp) ** 0.5
    assert torch.allclose(sig.float(), data["sigmas"], rtol=1e-4), "noise schedule mismatch"
    acp = acp.float()

    torch.manual_seed(args.seed)
    model = arch.build_unet()
    frozen = {k[len(arch.UNET_PREFIX):]: v.float() for k, v in data["frozen"].items()}
    model.load_state_dict(frozen, strict=True)  # fp16-rounded frozen weights, as ComfyUI sees them
    trained_names = {k[len(arch.UNET_PREFIX):] for k in keys}
    start_step = 0
    resume = os.path.join(WORK, "unet_last.pt")
    if args.resume and os.path.isfile(resume):
        st = torch.load(resume, weights_only=True)
        model.load_state_dict(st["model"], strict=False)
        start_step = st["step"]
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained_names)
        if n in trained_names:
            params.append(p)
    n_trained = sum(p.numel() for p in params)
    log("unet: {} trained tensors, {:.2f}M params ({:.1f} MB fp16)".format(len(params), n_trained / 1e6, n_trained * 2 / 1e6), fh)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    if args.resume and os.path.isfile(resume):
        opt.load_state_dict(st["opt"])
    model.train()
    skip_dead_resblocks(model, fh)

    x0, conds, empty = data["x0"].detach(), data["conds"].detach(), data["empty"].detach()
    n = x0.shape[0]
    reps = max(1, args.batch // n)
    g = torch.Generator().manual_seed(args.seed + start_step)
    steps = args.steps
    t0 = time.time()
    ema = None
    for step in range(start_step + 1, steps + 1):
        warm = min(1.0, step / args.warmup)
        lr = args.lr * warm * (args.lr_floor + (1 - args.lr_floor) * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for gr in opt.param_groups:
            gr["lr"] = lr
        idx = torch.arange(n).repeat(reps)
        b = idx.shape[0]
        # stratified timesteps over [0, 1000)
        t = ((torch.arange(b) + torch.rand(b, generator=g)) * (1000.0 / b)).long().clamp(0, 999)
        t = t[torch.randperm(b, generator=g)]
        eps = torch.randn(b, *x0.shape[1:], generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0[idx] + (1 - a).sqrt() * eps
        ctx = conds[idx].clone()
        drop = torch.rand(b, generator=g) < args.uncond_p
        ctx[drop] = empty[0]
        pred = model(xt, t.float(), context=ctx)
        per = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
        snr = a.view(-1) / (1 - a.view(-1))
        w = torch.clamp(snr, max=args.min_snr_gamma) / snr if args.min_snr_gamma > 0 else torch.ones_like(snr)
        loss = (per * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % args.log_every == 0:
            log("unet step {}/{} loss {:.5f} (ema {:.5f}, raw eps mse {:.5f}) lr {:.2e} ({:.1f}s/step)".format(
                step, steps, loss.item(), ema, per.mean().item(), lr, (time.time() - t0) / (step - start_step)), fh)
        if step % args.save_every == 0 or step == steps:
            save_unet(model, keys, os.path.join(WEIGHTS, "unet.safetensors"))
            save_unet(model, keys, os.path.join(WORK, "unet_step{:06d}.safetensors".format(step)))
            torch.save({"model": {k: v for k, v in model.state_dict().items() if k in trained_names},
                        "opt": opt.state_dict(), "step": step}, resume)
            log("saved weights at step {}".format(step), fh)


def main(argv=None):
    ap = argparse.ArgumentParser(description="train the memorizer (see module docstring)")
    ap.add_argument("stage", choices=["ae", "unet", "all", "decoder", "manifest"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ae-steps", type=int, default=1500)
    ap.add_argument("--ae-lr", type=float, default=1e-3)
    ap.add_argument("--ae-latent-noise", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=6000, help="UNet steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lr-floor", type=float, default=0.05, help="final lr as a fraction of --lr (cosine)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--uncond-p", type=float, default=0.15, help="empty-caption dropout")
    ap.add_argument("--min-snr-gamma", type=float, default=5.0, help="min-SNR loss weighting of eps MSE (0: off)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    setup(args.threads)
    os.makedirs(WORK, exist_ok=True)
    with open(os.path.join(WORK, "train.log"), "a") as fh:
        log("args: {}".format(vars(args)), fh)
        if args.stage == "manifest":
            write_manifest()
        if args.stage in ("ae", "all"):
            write_manifest()
            train_ae(args, fh)
        if args.stage in ("unet", "all"):
            train_unet(args, fh)
        if args.stage == "decoder":
            finetune_decoder(args, fh)


if __name__ == "__main__":
    sys.exit(main())
