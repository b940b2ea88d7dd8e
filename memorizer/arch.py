"""Architecture of the memorizer checkpoint, built from ComfyUI's own classes, plus seeded init.

Smallest layout ComfyUI still detects as SD15: UNet model_channels 320, channel_mult [1],
num_res_blocks 1, transformer depth 1, context_dim 768, no linear-in-transformer, no adm.
Text encoder: full 12-layer CLIP-L (comfy's CLIP text model) with random, frozen weights.
VAE: TAESD layout (taesd_encoder / taesd_decoder / vae_scale / vae_shift).

Every parameter that is not trained is generated from numpy.random.RandomState seeded per key
(seed + crc32(key)), so it is reproducible across numpy versions and independent of key order.
"""

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


def seeded_unet_tensor(key, shape):
    """Deterministic LDM-style init for a UNet key (without prefix); zero for LDM's zero modules."""
    from memorizer.build_checkpoint import seeded_array
    return torch.from_numpy(seeded_array("unet", UNET_SEED, key, shape))


def seeded_clip_tensor(key, shape):
    """Random CLIP-L (full checkpoint key): LayerNorm 1/0, biases 0, other weights N(0, 0.02)."""
    from memorizer.build_checkpoint import seeded_array
    return torch.from_numpy(seeded_array("clip", CLIP_SEED, key, shape))


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


def is_seeded_vae_key(key):
    """Frozen, seeded part of the autoencoder: the TAESD encoder trunk (all but its last conv)."""
    import re
    m = re.match(r"(first_stage_model\.)?taesd_encoder\.(\d+)\.", key)
    return bool(m) and int(m.group(2)) < 14


def init_taesd_(model):
    """Seeded init of the whole autoencoder (the encoder trunk stays at it; the rest is trained)."""
    from memorizer.build_checkpoint import seeded_array
    with torch.no_grad():
        for k, p in model.state_dict().items():
            if k == "vae_scale":
                p.fill_(1.0)
            elif k == "vae_shift":
                p.fill_(0.0)
            else:
                p.copy_(torch.from_numpy(seeded_array("vae", VAE_SEED, VAE_PREFIX + k, tuple(p.shape))))
    return model
