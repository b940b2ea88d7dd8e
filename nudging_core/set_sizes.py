"""A set built at one size, used at another: its latents at the generation's size.

The latent-space nodes (LatentNudge, NudgeRegenerate, the single-pass guard) compare the graph's
latent with the set's latents, which only works at one latent size. A set that carries pixel
copies is re-encoded on demand: its copies resized to the generation's pixel size (stretched to
its aspect, area-averaged or bilinear) and encoded by the graph's VAE, once per set, size and VAE.
"""
from __future__ import annotations

from typing import Callable

import torch

from .embedding_set import EmbeddingSet
from .errors import NudgeInputError

_CHUNK_ITEMS = 8   # images resized and encoded at once: bounds the extra memory of a re-encode


def resized_pixels(pixels: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, H, W, 3] copies as float [N, h, w, 3] in [0, 1] at hw (area when shrinking, bilinear
    when enlarging: neither rings, and a copy stays a copy)."""
    x = pixels[..., :3].float().div(255.0).permute(0, 3, 1, 2)
    if tuple(x.shape[2:]) != tuple(hw):
        shrinking = hw[0] <= x.shape[2] and hw[1] <= x.shape[3]
        x = torch.nn.functional.interpolate(x, size=hw, mode="area" if shrinking else "bilinear",
                                            align_corners=None if shrinking else False)
    return x.permute(0, 2, 3, 1).clamp(0, 1)


def latents_for(embedding_set: EmbeddingSet, latent: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor],
                encoder_key: str, scale: int, role: str) -> torch.Tensor:
    """The set's latents shaped like `latent` [B, C, h, w]: its own when they already are; else its
    pixel copies at (h * scale, w * scale) encoded by `encode` (ComfyUI IMAGE -> LATENT samples),
    cached on the set per size and encoder."""
    if latent.ndim != 4:
        raise NudgeInputError(f"the latent must be [batch, channels, height, width], got {tuple(latent.shape)}")
    if len(embedding_set) == 0:
        raise NudgeInputError(f"the {role} set is empty; build it from at least one image")
    want = tuple(latent.shape[1:])
    if embedding_set.latent_shape == want:
        return embedding_set.latents
    if embedding_set.pixels is None:
        have = embedding_set.latent_shape
        raise NudgeInputError(
            f"the {role} set's latents are {have[0]}x{have[1]}x{have[2]} but the graph's latent is "
            f"{want[0]}x{want[1]}x{want[2]}, and the set holds no pixel copies to re-encode at this size; "
            "rebuild it with store_pixels on (then it works at every size) or generate at the set's size")
    key = ("latents", want, encoder_key)
    cache = embedding_set._derived
    if key not in cache:
        hw = (want[1] * scale, want[2] * scale)
        parts = []
        for i in range(0, len(embedding_set), _CHUNK_ITEMS):
            parts.append(encode(resized_pixels(embedding_set.pixels[i:i + _CHUNK_ITEMS], hw)).float().cpu())
        latents = torch.cat(parts)
        if tuple(latents.shape[1:]) != want:
            raise NudgeInputError(
                f"the VAE encodes {hw[1]}x{hw[0]} images to latents of {tuple(latents.shape[1:])}, not the graph's "
                f"{want}; connect the VAE of the graph that made the latent")
        cache[key] = latents
    return cache[key]
