"""Assemble the memorizer checkpoint (SD1.x / LDM layout, fp16 .safetensors).

Sources:
  * memorizer/weights/manifest.json  - every checkpoint key with its shape and where it comes from
  * memorizer/weights/*.safetensors   - the trained tensors (autoencoder + trained part of the UNet)
  * everything else is regenerated from seeded numpy RandomState (see memorizer/arch.py seeding;
    the generators are repeated here so that building needs only numpy, torch and safetensors).

The result is cached: OUT_DIR/<name> plus OUT_DIR/<name>.stamp.json; a rebuild is skipped when the
stamp's input hash matches and the file's sha256 matches the stamp.

CLI (from the repository root):  python -m memorizer.build_checkpoint --out DIR
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
import zlib

import numpy as np

CHECKPOINT_NAME = "nudging-memorizer-sd15.safetensors"
BUILDER_VERSION = "1"
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
MANIFEST = os.path.join(WEIGHTS_DIR, "manifest.json")


# --- seeded generators (must match memorizer/arch.py) ---------------------------------------
def _rng(seed, key):
    return np.random.RandomState((seed + zlib.crc32(key.encode("utf-8"))) % (2 ** 32))


def _fan_in(shape):
    fan = 1
    for s in shape[1:]:
        fan *= s
    return fan


def seeded_array(kind, seed, key, shape):
    """kind 'unet' (key without 'model.diffusion_model.') or 'clip' (full checkpoint key)."""
    shape = tuple(shape)
    if kind == "clip":
        if "layer_norm" in key or "layernorm" in key:
            return np.ones(shape, np.float32) if key.endswith("weight") else np.zeros(shape, np.float32)
        if key.endswith(".bias"):
            return np.zeros(shape, np.float32)
        return (_rng(seed, key).standard_normal(size=shape) * 0.02).astype(np.float32)
    if kind == "unet":
        if len(shape) == 1:
            # 1-D weights of this UNet are all GroupNorm/LayerNorm scales; biases start at 0
            return np.ones(shape, np.float32) if key.endswith(".weight") else np.zeros(shape, np.float32)
        if ".out_layers.3." in key or ".proj_out." in key or key.startswith("out.2."):
            return np.zeros(shape, np.float32)  # zero-initialised modules of LDM's UNet
        return (_rng(seed, key).standard_normal(size=shape) * (1.0 / np.sqrt(_fan_in(shape)))).astype(np.float32)
    if kind == "vae":
        # frozen TAESD encoder trunk: He-normal convs (residual branches' last conv scaled by 0.2), zero biases
        if key.endswith(".bias") or len(shape) <= 1:
            return np.zeros(shape, np.float32)
        gain = 0.2 if key.endswith(".conv.4.weight") else 1.0
        return (_rng(seed, key).standard_normal(size=shape) * (gain * np.sqrt(2.0 / _fan_in(shape)))).astype(np.float32)
    raise ValueError(kind)


# --- assembly --------------------------------------------------------------------------------
def _load_manifest(weights_dir=WEIGHTS_DIR):
    with open(os.path.join(weights_dir, "manifest.json")) as f:
        return json.load(f)


def _inputs_hash(weights_dir=WEIGHTS_DIR):
    h = hashlib.sha256()
    h.update(("builder-" + BUILDER_VERSION).encode())
    h.update(open(os.path.join(weights_dir, "manifest.json"), "rb").read())
    for name in sorted(os.listdir(weights_dir)):
        if name.endswith(".safetensors"):
            h.update(name.encode())
            with open(os.path.join(weights_dir, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def assemble_state_dict(weights_dir=WEIGHTS_DIR, overrides=None):
    """Full fp16 state dict {key: torch.Tensor}. `overrides` (key -> tensor) replaces trained tensors
    (used by train.py to evaluate intermediate weights)."""
    import torch
    from safetensors.torch import load_file
    manifest = _load_manifest(weights_dir)
    trained = {}
    for name in sorted(os.listdir(weights_dir)):
        if name.endswith(".safetensors"):
            trained.update(load_file(os.path.join(weights_dir, name)))
    if overrides:
        trained.update(overrides)
    seeds = manifest["seeds"]
    sd = {}
    for key, entry in manifest["keys"].items():
        shape, source = tuple(entry["shape"]), entry["source"]
        if key in trained:
            t = trained[key]
            if tuple(t.shape) != shape:
                raise ValueError("shape mismatch for {}: {} vs {}".format(key, tuple(t.shape), shape))
            sd[key] = t.to(torch.float16).contiguous()
        elif source == "trained":
            raise KeyError("trained tensor missing from {}: {}".format(weights_dir, key))
        elif source == "seed:unet":
            sk = key[len("model.diffusion_model."):]
            sd[key] = torch.from_numpy(seeded_array("unet", seeds["unet"], sk, shape)).to(torch.float16)
        elif source == "seed:vae":
            sd[key] = torch.from_numpy(seeded_array("vae", seeds["vae"], key, shape)).to(torch.float16)
        elif source == "seed:clip":
            sd[key] = torch.from_numpy(seeded_array("clip", seeds["clip"], key, shape)).to(torch.float16)
        else:
            raise ValueError(source)
    return sd


NOTE = "tiny SD1.x-format test model that memorizes 8 scikit-image photos at 64x64"


def checkpoint_metadata(note=NOTE):
    return {"modelspec.architecture": "stable-diffusion-v1", "memorizer.builder": BUILDER_VERSION,
            "memorizer.note": note}


def ensure_checkpoint(out_dir, name=CHECKPOINT_NAME, weights_dir=WEIGHTS_DIR, force=False, note=NOTE):
    """Build OUT_DIR/<name> unless an up-to-date copy is there; returns its path.
    Other fixtures of the same layout (the shapes world) pass their own weights folder, name and note."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    stamp_path = path + ".stamp.json"
    inputs = _inputs_hash(weights_dir)
    if not force and os.path.isfile(path) and os.path.isfile(stamp_path):
        try:
            with open(stamp_path) as f:
                stamp = json.load(f)
            if (stamp.get("inputs_sha256") == inputs and stamp.get("size") == os.path.getsize(path)
                    and stamp.get("sha256") == _file_sha256(path)):
                return path
        except (OSError, ValueError):
            pass
    sd = assemble_state_dict(weights_dir)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=checkpoint_metadata(note))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    with open(stamp_path, "w") as f:
        json.dump({"inputs_sha256": inputs, "sha256": _file_sha256(path), "size": os.path.getsize(path)}, f)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (e.g. ComfyUI/models/checkpoints)")
    ap.add_argument("--name", default=CHECKPOINT_NAME)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    print(ensure_checkpoint(args.out, args.name, force=args.force))


if __name__ == "__main__":
    sys.exit(main())
