"""One-time, seeded CPU training of the shapes fixture (same checkpoint layout as the memorizer).

  python -m shapes_world.train ae      [--ae-steps N]  # encoder head + decoder -> weights/vae.safetensors
  python -m shapes_world.train ae-whole [--ae-steps N] # the encoder trunk too, under relative latent noise
  python -m shapes_world.train decoder [--ae-steps N]  # decoder only, duplicated items weighted up
  python -m shapes_world.train unet    [--steps N] [--resume]   # trained UNet -> .work/candidate/unet*.safetensors
  python -m shapes_world.train promote                          # candidate -> weights/ (after evaluating it)

Both start from the memorizer's trained weights (its autoencoder and UNet subset): the layout, the
frozen seeded parts and the noise schedule are the same, so only what differs has to be learnt.
UNet data: a bank of fresh scenes of the trained combinations (rendered once from the world's seed,
encoded by ComfyUI's VAE exactly as a user's image would be), each with its plain caption, plus the
duplicated items under their own captions making up `duplicate_share` of every batch. Captions are
encoded by ComfyUI's CLIPTextEncode path on the assembled checkpoint. The objective, weighting and
caption dropout are the memorizer's (memorizer/train.py).
The UNet trains more than the memorizer's subset (SHAPES_TRAINED_UNET): the memorizer, one image per
caption, has no trained 3x3 convolution on the UNet's output side and random self-attention, and drew this
world's shapes as blobs; training those too lifted plain captions from 48.7 % to 57.5 % on-attribute.
Its weights are split into files of at most 19 MB.
Intermediate weights: shapes_world/.work/ (ignored); a UNet run writes a complete candidate weights
folder (.work/candidate/) that `promote` copies into weights/ once `evaluate --weights` has judged it.
"""
import argparse
import math
import os
import shutil
import sys
import time

import numpy as np
import torch

from memorizer import train as mt

HERE = os.path.dirname(os.path.abspath(__file__))
WORK = os.path.join(HERE, ".work")
WEIGHTS = os.path.join(HERE, "weights")
CANDIDATE = os.path.join(WORK, "candidate")
MAX_FILE_BYTES = 19_000_000

# The memorizer's trained subset, plus the rest of the transformers (self-attention, feed-forward),
# the middle block's second ResBlock and the output ResBlocks (key regexes without the UNet prefix).
SHAPES_TRAINED_UNET = mt.TRAINED_UNET + [
    r"(input_blocks\.1|middle_block|output_blocks\.[01])\.1\.transformer_blocks\.0\.(attn1\.|norm1\.|ff\.|norm3\.)",
    r"middle_block\.2\.",
    r"output_blocks\.[01]\.0\.",
]


def world():
    from shapes_world.scenes import World
    return World.load()


def scene_batch(w, rng, n):
    """n fresh scenes of trained combinations as a B,3,H,W float tensor in [0, 1]."""
    imgs = np.stack([w.sample(rng)[1] for _ in range(n)])
    return torch.from_numpy(imgs).float().div(255.0).permute(0, 3, 1, 2).contiguous()


def item_tensor(w):
    imgs = np.stack([w.item_image(item) for item in w.duplicated])
    return torch.from_numpy(imgs).float().div(255.0).permute(0, 3, 1, 2).contiguous()


def _taesd_from_memorizer():
    from safetensors.torch import load_file
    from memorizer import arch
    model = arch.init_taesd_(arch.build_taesd())
    start = os.path.join(WEIGHTS, "vae.safetensors")
    if not os.path.isfile(start):
        start = os.path.join(mt.WEIGHTS, "vae.safetensors")
    trained = load_file(start)
    model.load_state_dict({k[len(arch.VAE_PREFIX):]: v.float() for k, v in trained.items()}, strict=False)
    return model


def vae_trunk_trained(folder=WEIGHTS):
    """Whether the folder's autoencoder carries its own encoder trunk (`train ae-whole`) instead of the
    memorizer's seeded one."""
    from safetensors import safe_open
    path = os.path.join(folder, "vae.safetensors")
    if not os.path.isfile(path):
        return False
    with safe_open(path, "pt") as f:
        return "first_stage_model.taesd_encoder.0.weight" in f.keys()


def write_shapes_manifest(folder, trunk_trained=None):
    """The manifest of a shapes weights folder; the encoder trunk is trained when weights/ carries one."""
    if trunk_trained is None:
        trunk_trained = vae_trunk_trained(WEIGHTS)
    return mt.write_manifest(folder, SHAPES_TRAINED_UNET, vae_trunk_trained=trunk_trained)


def _save_taesd(model, fh, with_trunk=False):
    from safetensors.torch import save_file
    from memorizer import arch
    with_trunk = with_trunk or vae_trunk_trained()
    sd = {arch.VAE_PREFIX + k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
          if with_trunk or not arch.is_seeded_vae_key(k)}
    os.makedirs(WEIGHTS, exist_ok=True)
    save_file(sd, os.path.join(WEIGHTS, "vae.safetensors"))
    write_shapes_manifest(WEIGHTS, trunk_trained=with_trunk)
    mt.log("vae saved", fh)


def edge_l1(rec, x):
    """L1 between the images' horizontal and vertical differences: L2 alone rounds a shape's corners
    (they are few pixels), and a rounded cross or triangle no longer reads as one."""
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return (dx(rec) - dx(x)).abs().mean() + (dy(rec) - dy(x)).abs().mean()


AE_MODES = {  # mode: (seed offset, what trains)
    "head": (0, lambda name: name.startswith("taesd_decoder.") or name.startswith("taesd_encoder.14.")),
    "decoder": (1, lambda name: name.startswith("taesd_decoder.")),
    "whole": (2, lambda name: name not in ("vae_scale", "vae_shift")),
}


def train_autoencoder(args, fh, mode):
    """Reconstruction L2 with latent noise; a batch is `--ae-batch` fresh scenes plus every duplicated
    item `--item-weight` times (a copy only counts when the decoder draws the item's texture).

    head: the encoder's last conv and the decoder, noise `--ae-latent-noise` in raw latent units.
    decoder: the decoder alone (the latents, and so a UNet trained on them, stay valid).
    whole: the encoder trunk too, with isotropic noise of up to `--ae-latent-noise` times the latent's own
      spread (per sample, uniform in [0, max]). A decoder that reads shapes through noise the size of the
      UNet's low-noise errors (diagnose: a latent RMS of 0.08-0.14) must find them in coarse latent
      structure, which the encoder then has to put there; the seeded random trunk spreads shapes into fine
      detail that the UNet cannot tell from noise."""
    w = world()
    offset, trains = AE_MODES[mode]
    torch.manual_seed(args.seed + offset)
    rng = np.random.default_rng(args.seed + 10 + offset)
    model = _taesd_from_memorizer()
    for n_, p in model.named_parameters():
        p.requires_grad_(trains(n_))
    params = [p for p in model.parameters() if p.requires_grad]
    items = item_tensor(w)
    opt = torch.optim.Adam(params, lr=args.ae_lr)
    steps, t0 = args.ae_steps, time.time()
    for step in range(1, steps + 1):
        lr = args.ae_lr * min(1.0, step / 30) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.cat([scene_batch(w, rng, args.ae_batch)] + [items] * args.item_weight)
        with torch.set_grad_enabled(mode != "decoder"):
            raw = model.taesd_encoder(x)
        if mode == "whole":
            spread = raw.std().detach()  # one scale for all channels, as ComfyUI normalises the latent
            z = raw + args.ae_latent_noise * torch.rand(len(x), 1, 1, 1) * spread * torch.randn_like(raw)
        else:
            z = raw + args.ae_latent_noise * torch.randn_like(raw)
        rec = model.taesd_decoder(z)
        loss = torch.mean((rec - x) ** 2) + args.ae_edge_weight * edge_l1(rec, x)
        mt._optimiser_step(opt, loss, params)
        if step % 25 == 0 or step == steps:
            with torch.no_grad():
                raw_items = model.taesd_encoder(items)
                scenes = scene_batch(w, np.random.default_rng(999), 16)
                raw_scenes = model.taesd_encoder(scenes)
            ti = mt._reconstruction_tiled_l2(model, raw_items, items)
            ts = mt._reconstruction_tiled_l2(model, raw_scenes, scenes)
            mt.log("ae ({}) step {}/{} loss {:.5f} items tiled-L2 max {:.4f} mean {:.4f}, scenes max {:.4f} "
                   "({:.0f}s)".format(mode, step, steps, loss.item(), max(ti), float(np.mean(ti)), max(ts),
                                      time.time() - t0), fh)
    if mode != "decoder":
        with torch.no_grad():
            raw = model.taesd_encoder(torch.cat([scene_batch(w, np.random.default_rng(5), 256), items]))
            m, s = raw.mean().item(), raw.std().item()
            # comfy: x0 = 0.18215 * (raw / vae_scale + vae_shift) -> unit std, zero mean
            model.vae_scale.fill_(0.18215 * s)
            model.vae_shift.fill_(-m / (0.18215 * s))
    _save_taesd(model, fh, with_trunk=mode == "whole")


# ----------------------------------------------------------------------------------------------
def encoder_fingerprint():
    """Hash of what makes the latents (the encoder's trained tensors, scale, shift): a decoder-only pass
    keeps the cache."""
    import hashlib
    from safetensors.torch import load_file
    h = hashlib.sha256()
    for k, v in sorted(load_file(os.path.join(WEIGHTS, "vae.safetensors")).items()):
        if "taesd_decoder" not in k:
            h.update(k.encode())
            h.update(v.float().numpy().tobytes())
    return h.hexdigest()


def world_fingerprint(w):
    """Hash of the world's spec: a bank rendered from another world is stale."""
    import hashlib
    import json
    return hashlib.sha256(json.dumps(w.spec, sort_keys=True).encode()).hexdigest()


def prepare_unet_data(args, fh):
    """Conditionings of every caption and the x0 latents of the scene bank and the items (cached)."""
    from memorizer import arch
    from memorizer.build_checkpoint import assemble_state_dict
    w = world()
    cache = os.path.join(WORK, "unet_data.pt")
    bank_key = encoder_fingerprint() + ":" + world_fingerprint(w)
    if os.path.isfile(cache):
        d = torch.load(cache, weights_only=True)  # our own cache: tensors and plain values only
        if d.get("bank_key") == bank_key and d.get("bank") == args.bank:
            return d
    if not os.path.isfile(os.path.join(WEIGHTS, "unet.safetensors")):
        shutil.copyfile(os.path.join(mt.WEIGHTS, "unet.safetensors"), os.path.join(WEIGHTS, "unet.safetensors"))
    sd = assemble_state_dict(WEIGHTS)
    model, clip, vae, _ = mt.load_comfy_checkpoint(dict(sd))
    mt.log("comfy detected: {}".format(type(model.model.model_config).__name__), fh)
    rng = np.random.default_rng(args.seed + 20)
    combos = w.trained_combinations()
    captions = [w.caption(*c) for c in combos] + [w.item_caption(item) for item in w.duplicated]
    bank_combo, latents = [], []
    t0 = time.time()
    for start in range(0, args.bank, 256):
        n = min(256, args.bank - start)
        idx = rng.integers(len(combos), size=n)
        pix = np.stack([w.render(w.random_scene(rng, combos[i])) for i in idx])
        lat = vae.encode(torch.from_numpy(pix).float().div(255.0))
        latents.append(model.model.latent_format.process_in(lat).detach().float())
        bank_combo.append(torch.from_numpy(idx))
    items = np.stack([w.item_image(item) for item in w.duplicated])
    item_x0 = model.model.latent_format.process_in(vae.encode(torch.from_numpy(items).float().div(255.0))).detach().float()
    x0 = torch.cat(latents)
    mt.log("bank: {} scenes encoded in {:.0f}s; x0 mean {:.3f} std {:.3f}".format(
        len(x0), time.time() - t0, x0.mean().item(), x0.std().item()), fh)
    conds = torch.cat([mt.encode_caption(clip, c) for c in captions])
    d = {"x0": x0, "combo": torch.cat(bank_combo), "item_x0": item_x0, "conds": conds,
         "empty": mt.encode_caption(clip, ""), "n_combos": len(combos), "bank": args.bank, "bank_key": bank_key,
         "sigmas": model.model.model_sampling.sigmas.float().clone(),
         "frozen": {k: v.detach() for k, v in sd.items() if k.startswith(arch.UNET_PREFIX)}}
    torch.save(d, cache)
    return d


def save_unet_sharded(model, keys, folder):
    """The trained UNet tensors as fp16 files of at most MAX_FILE_BYTES each: unet.safetensors,
    unet-2.safetensors, ... (the checkpoint builder reads every .safetensors file in the folder)."""
    from safetensors.torch import save_file
    from memorizer import arch
    sd = model.state_dict()
    shards, size = [{}], 0
    for k in sorted(keys):
        t = sd[k[len(arch.UNET_PREFIX):]].detach().to(torch.float16).contiguous()
        if shards[-1] and size + t.numel() * 2 > MAX_FILE_BYTES:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += t.numel() * 2
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.startswith("unet") and name.endswith(".safetensors"):
            os.remove(os.path.join(folder, name))
    for i, shard in enumerate(shards):
        path = os.path.join(folder, "unet.safetensors" if i == 0 else "unet-{}.safetensors".format(i + 1))
        save_file(shard, path + ".tmp")
        os.replace(path + ".tmp", path)


def write_candidate(model, keys, step, fh):
    """A complete weights folder (manifest, autoencoder, UNet shards) that evaluate --weights can judge."""
    save_unet_sharded(model, keys, CANDIDATE)
    write_shapes_manifest(CANDIDATE)
    shutil.copyfile(os.path.join(WEIGHTS, "vae.safetensors"), os.path.join(CANDIDATE, "vae.safetensors"))
    mt.log("candidate weights at step {} in {}".format(step, CANDIDATE), fh)


def promote(fh):
    """Copy the judged candidate into weights/ (removing the UNet files it replaces)."""
    for name in os.listdir(WEIGHTS):
        if name.startswith("unet") and name.endswith(".safetensors"):
            os.remove(os.path.join(WEIGHTS, name))
    for name in os.listdir(CANDIDATE):
        if name.startswith("unet") and name.endswith(".safetensors") or name == "manifest.json":
            shutil.copyfile(os.path.join(CANDIDATE, name), os.path.join(WEIGHTS, name))
    mt.log("promoted {} to {}".format(CANDIDATE, WEIGHTS), fh)


def train_unet(args, fh):
    from memorizer import arch
    keys = mt.trained_unet_keys(write_shapes_manifest(WORK))
    data = prepare_unet_data(args, fh)
    acp = mt.alphas_cumprod()
    assert torch.allclose((((1 - acp) / acp) ** 0.5).float(), data["sigmas"], rtol=1e-4), "noise schedule mismatch"
    acp = acp.float()
    torch.manual_seed(args.seed)
    model = arch.build_unet()
    model.load_state_dict({k[len(arch.UNET_PREFIX):]: v.float() for k, v in data["frozen"].items()}, strict=True)
    trained_names = {k[len(arch.UNET_PREFIX):] for k in keys}
    start_step, resume = 0, os.path.join(WORK, "unet_last.pt")
    st = torch.load(resume, weights_only=True) if args.resume and os.path.isfile(resume) else None
    if st:
        model.load_state_dict(st["model"], strict=False)
        start_step = st["step"]
    else:  # start from the committed weights (the cache may hold older ones); the rest stays seeded
        from safetensors.torch import load_file
        for name in sorted(os.listdir(WEIGHTS)):
            if name.startswith("unet") and name.endswith(".safetensors"):
                current = load_file(os.path.join(WEIGHTS, name))
                model.load_state_dict({k[len(arch.UNET_PREFIX):]: v.float() for k, v in current.items()}, strict=False)
    params = [p for n, p in model.named_parameters() if n in trained_names]
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained_names)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    if st:
        opt.load_state_dict(st["opt"])
    # An exponential moving average of the trained weights is what the candidate is written from: an
    # undertrained diffusion model's last iterate samples noticeably worse than its average.
    ema_params = [p.detach().clone() for p in params]
    if st and "ema" in st:
        for e, saved in zip(ema_params, st["ema"]):
            e.copy_(saved)
    ema_updates = st.get("ema_updates", 0) if st else 0
    model.train()
    mt.skip_dead_resblocks(model, fh)
    w = world()
    x0, combo, item_x0 = data["x0"].detach(), data["combo"], data["item_x0"].detach()
    conds, empty, n_combos = data["conds"], data["empty"], data["n_combos"]
    n_items = item_x0.shape[0]
    b = args.batch
    n_dup = int(round(w.duplicate_share * b))
    g = torch.Generator().manual_seed(args.seed + start_step)
    t0, ema = time.time(), None
    mt.log("unet: {} params trained, batch {} ({} duplicated), bank {}, from step {}".format(
        sum(p.numel() for p in params), b, n_dup, len(x0), start_step), fh)
    for step in range(start_step + 1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * (
            args.lr_floor + (1 - args.lr_floor) * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for gr in opt.param_groups:
            gr["lr"] = lr
        scenes = torch.randint(len(x0), (b - n_dup,), generator=g)
        items = torch.randint(n_items, (n_dup,), generator=g)
        clean = torch.cat([x0[scenes], item_x0[items]])
        cond_idx = torch.cat([combo[scenes], n_combos + items])
        t = ((torch.arange(b) + torch.rand(b, generator=g)) * (1000.0 / b)).long().clamp(0, 999)
        t = t[torch.randperm(b, generator=g)]
        eps = torch.randn(clean.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * clean + (1 - a).sqrt() * eps
        ctx = conds[cond_idx].clone()
        ctx[torch.rand(b, generator=g) < args.uncond_p] = empty[0]
        per = ((model(xt, t.float(), context=ctx) - eps) ** 2).mean(dim=(1, 2, 3))
        snr = a.view(-1) / (1 - a.view(-1))
        # min-SNR weighting down-weights the low-noise steps (x0 error at t = 20 weighs 5/52 of the
        # high-noise ones); 0 turns it off (plain epsilon MSE), for finetuning the last, low-noise steps.
        weight = torch.clamp(snr, max=args.min_snr_gamma) / snr if args.min_snr_gamma > 0 else torch.ones_like(snr)
        loss = (per * weight).mean()
        mt._optimiser_step(opt, loss, params)
        ema_updates += 1
        decay = min(args.ema_decay, (1 + ema_updates) / (10 + ema_updates))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % args.log_every == 0:
            mt.log("unet step {}/{} loss {:.5f} (ema {:.5f}) lr {:.2e} ({:.2f}s/step)".format(
                step, args.steps, loss.item(), ema, lr, (time.time() - t0) / (step - start_step)), fh)
        if step % args.save_every == 0 or step == args.steps:
            last = [p.detach().clone() for p in params]
            with torch.no_grad():
                torch._foreach_copy_(params, ema_params)
            write_candidate(model, keys, step, fh)
            with torch.no_grad():
                torch._foreach_copy_(params, last)
            torch.save({"model": {k: v for k, v in model.state_dict().items() if k in trained_names},
                        "opt": opt.state_dict(), "step": step, "ema": ema_params, "ema_updates": ema_updates},
                       resume)
            mt.log("saved weights at step {}".format(step), fh)


def main(argv=None):
    ap = argparse.ArgumentParser(description="train the shapes fixture (see module docstring)")
    ap.add_argument("stage", choices=["ae", "ae-whole", "decoder", "unet", "manifest", "promote"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ae-steps", type=int, default=400)
    ap.add_argument("--ae-batch", type=int, default=16, help="fresh scenes per autoencoder batch")
    ap.add_argument("--item-weight", type=int, default=1, help="copies of every duplicated item per AE batch")
    ap.add_argument("--ae-lr", type=float, default=1e-3)
    ap.add_argument("--ae-latent-noise", type=float, default=0.1)
    ap.add_argument("--ae-edge-weight", type=float, default=0.0, help="weight of the edge L1 term (0: L2 only)")
    ap.add_argument("--bank", type=int, default=16384, help="scenes rendered and encoded once for the UNet")
    ap.add_argument("--steps", type=int, default=6000, help="UNet steps (length of the cosine schedule)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--lr-floor", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--uncond-p", type=float, default=0.15)
    ap.add_argument("--min-snr-gamma", type=float, default=5.0, help="0: plain epsilon MSE")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--ema-decay", type=float, default=0.999, help="decay of the weight average the candidate is")
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args(argv)
    mt.setup(args.threads)
    os.makedirs(WORK, exist_ok=True)
    with open(os.path.join(WORK, "train.log"), "a") as fh:
        mt.log("args: {}".format(vars(args)), fh)
        if args.stage in ("manifest", "ae"):
            write_shapes_manifest(WEIGHTS)
        if args.stage == "ae":
            train_autoencoder(args, fh, "head")
        elif args.stage == "ae-whole":
            train_autoencoder(args, fh, "whole")
        elif args.stage == "decoder":
            train_autoencoder(args, fh, "decoder")
        elif args.stage == "unet":
            train_unet(args, fh)
        elif args.stage == "promote":
            promote(fh)


if __name__ == "__main__":
    sys.exit(main())
