"""Architecture of the memorizer checkpoint, built from ComfyUI's own classes, plus seeded init.

Smallest layout ComfyUI still detects as SD15: UNet model_channels 320, channel_mult [1],
num_res_blocks 1, transformer depth 1, context_dim 768, no linear-in-transformer, no adm.
Text encoder: full 12-layer CLIP-L (comfy's CLIP text model) with random, frozen weights.
VAE: TAESD layout (taesd_encoder / taesd_decoder / vae_scale / vae_shift).

Every parameter that is not trained is generated from numpy.random.RandomState seeded per key
(seed + crc32(key)), so it is reproducible across numpy versions and independent of key order.
"""
import zlib

import numpy as np
import torch

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."

CLIP_SEED = 1234
UNET_SEED = 5678
VAE_SEED = 9012

UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
    transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
    num_heads=8, num_head_channels=-1, adm_in_channels=None, use_spatial_transformer=True,
    use_temporal_attention=False, use_temporal_resblock=False, legacy=False,
)


def build_unet(dtype=torch.float32, device=None):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return UNetModel(**UNET_CONFIG, dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)


def build_clip_text(device="meta"):
    """comfy's CLIP-L text model as used for SD1 (keys transformer.text_model.*)."""
    import comfy.sd1_clip
    return comfy.sd1_clip.SDClipModel(device=device, dtype=torch.float32)


def build_taesd():
    import comfy.taesd.taesd
    return comfy.taesd.taesd.TAESD(latent_channels=4)


def _rng(seed, key):
    return np.random.RandomState((seed + zlib.crc32(key.encode("utf-8"))) % (2 ** 32))


def _normal(seed, key, shape, std):
    return torch.from_numpy((_rng(seed, key).standard_normal(size=shape) * std).astype(np.float32))


def _fan_in(shape):
    fan = 1
    for s in shape[1:]:
        fan *= s
    return fan


def seeded_unet_tensor(key, shape):
    """Deterministic LDM-style init for a UNet key (without prefix)."""
    shape = tuple(shape)
    is_norm = (".norm" in key or key.startswith("out.0") or ".in_layers.0." in key
               or ".out_layers.0." in key or key.endswith("norm.weight") or key.endswith("norm.bias"))
    if key.endswith(".bias") or len(shape) == 1:
        if is_norm and key.endswith(".weight"):
            return torch.ones(shape)
        return torch.zeros(shape)
    # zero-initialised modules in LDM/ComfyUI: last conv of each ResBlock, proj_out of transformers, final conv
    if ".out_layers.3." in key or ".proj_out." in key or key.startswith("out.2."):
        return torch.zeros(shape)
    return _normal(UNET_SEED, key, shape, 1.0 / np.sqrt(_fan_in(shape)))


def seeded_clip_tensor(key, shape):
    """Random CLIP-L: LayerNorm 1/0, biases 0, linear and embedding weights N(0, 0.02)."""
    shape = tuple(shape)
    if "layer_norm" in key or "layernorm" in key:
        return torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
    if key.endswith(".bias"):
        return torch.zeros(shape)
    if key.endswith("position_ids"):
        return torch.arange(shape[-1]).reshape(shape).to(torch.int64)
    return _normal(CLIP_SEED, key, shape, 0.02)


def clip_key_shapes():
    """{checkpoint key: shape} of the SD1 text encoder, as ComfyUI saves it."""
    model = build_clip_text(device="meta")
    out = {}
    for k, v in model.state_dict().items():
        if k in ("text_projection", "logit_scale") or k.endswith("text_projection.weight") or k.endswith("logit_scale"):
            continue  # SD1 checkpoints carry neither (ComfyUI drops them when saving)
        assert k.startswith("transformer."), k
        out["cond_stage_model." + k] = tuple(v.shape)
    return out


def unet_key_shapes():
    with torch.device("meta"):
        model = build_unet()
    return {UNET_PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}


def init_unet_(model):
    """Fill a UNetModel with the seeded init (in place)."""
    with torch.no_grad():
        for k, p in model.state_dict().items():
            p.copy_(seeded_unet_tensor(k, p.shape))
    return model


def init_taesd_(model):
    """Seeded init for the autoencoder (training start point only; trained weights are stored)."""
    with torch.no_grad():
        for k, p in model.state_dict().items():
            if k in ("vae_scale",):
                p.fill_(1.0)
            elif k in ("vae_shift",):
                p.fill_(0.0)
            elif k.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(_normal(VAE_SEED, k, p.shape, np.sqrt(2.0 / _fan_in(p.shape))))
    return model
