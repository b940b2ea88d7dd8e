"""A checkpoint with the full SD 1.4 UNet architecture (859.5M parameters) and random weights.

Cost does not depend on weight values, so wall-time ratios measured on it are those of a real
SD 1.4 run on the same machine. The text encoder and autoencoder are the memorizer's.
"""
from __future__ import annotations

import os

import torch

from host.comfy_env import import_comfy

NAME = "random-sd14-architecture.safetensors"
SD14_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1, adm_in_channels=None,
    use_spatial_transformer=True, use_temporal_attention=False, use_temporal_resblock=False, legacy=False,
)


def ensure_full_size_checkpoint(out_dir: str) -> str:
    path = os.path.join(out_dir, NAME)
    if os.path.isfile(path):
        return path
    import_comfy()
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file

    from memorizer.build_checkpoint import assemble_state_dict

    with torch.device("meta"):
        unet = UNetModel(**SD14_UNET, operations=comfy.ops.disable_weight_init)
    generator = torch.Generator().manual_seed(14)
    state = {k: v for k, v in assemble_state_dict().items() if not k.startswith("model.diffusion_model.")}
    for key, meta in unet.state_dict().items():
        shape = tuple(meta.shape)
        if len(shape) == 1:
            value = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        else:
            fan_in = max(1, meta[0].numel())
            value = torch.randn(shape, generator=generator) / fan_in ** 0.5
        state["model.diffusion_model." + key] = value.to(torch.float16)
    os.makedirs(out_dir, exist_ok=True)
    tmp = path + ".tmp"
    save_file(state, tmp)
    os.replace(tmp, path)
    return path
