"""Carlini et al. (2023) tiled L2: the memorization test the filter applies.

Both images are floats in [0, 1] and the same size. Each is cut into a grid x grid set of
non-overlapping tiles (4 x 4, i.e. 128 x 128 tiles at 512 x 512); per tile pair the distance is
the RMS difference over the tile's pixels and channels, and the image distance is the MAXIMUM
over tiles. Taking the max (not the mean) is what makes it strict: a copy must match
everywhere. Sizes not divisible by the grid get tiles that differ by at most one pixel.
"""
from __future__ import annotations

import torch

from .errors import NudgeInputError

DEFAULT_GRID = 4


def _edges(length: int, parts: int) -> list[int]:
    return [(i * length) // parts for i in range(parts + 1)]


def tiled_l2_matrix(images: torch.Tensor, references: torch.Tensor, grid: int = DEFAULT_GRID) -> torch.Tensor:
    """Distances between every image and every reference, shape [N, M].

    images: [N, H, W, C] and references: [M, H, W, C] (ComfyUI's IMAGE layout).
    """
    if images.ndim != 4 or references.ndim != 4:
        raise NudgeInputError("images and references must be [batch, height, width, channels] tensors")
    if images.shape[1:] != references.shape[1:]:
        raise NudgeInputError(
            f"image size {tuple(images.shape[1:3])} x {images.shape[3]} channels does not match the "
            f"guarded set's {tuple(references.shape[1:3])} x {references.shape[3]} channels"
        )
    height, width = images.shape[1], images.shape[2]
    if height < grid or width < grid:
        raise NudgeInputError(f"images of {height}x{width} are smaller than the {grid}x{grid} tile grid")
    a = images.float()
    b = references.float().to(a.device)
    distance = torch.zeros(a.shape[0], b.shape[0], device=a.device)
    rows, cols = _edges(height, grid), _edges(width, grid)
    for r in range(grid):
        for c in range(grid):
            ta = a[:, rows[r]:rows[r + 1], cols[c]:cols[c + 1], :].reshape(a.shape[0], -1)
            tb = b[:, rows[r]:rows[r + 1], cols[c]:cols[c + 1], :].reshape(b.shape[0], -1)
            # Direct differences (not the |a|^2 + |b|^2 - 2ab expansion): near-copies are
            # exactly where that expansion cancels badly.
            distance = torch.maximum(distance, _pairwise_rms(ta, tb))
    return distance


def _pairwise_rms(a: torch.Tensor, b: torch.Tensor, budget: int = 1 << 25) -> torch.Tensor:
    """RMS difference of every row of a against every row of b, in reference chunks that keep
    the broadcast difference under `budget` elements (large guarded sets stay in memory)."""
    chunk = max(1, budget // max(1, a.shape[0] * a.shape[1]))
    parts = [(a[:, None, :] - b[None, i:i + chunk, :]).square().mean(dim=2).sqrt()
             for i in range(0, b.shape[0], chunk)]
    return torch.cat(parts, dim=1)


def tiled_l2(image: torch.Tensor, reference: torch.Tensor, grid: int = DEFAULT_GRID) -> float:
    """Distance between one [H, W, C] image and one reference."""
    return float(tiled_l2_matrix(image[None], reference[None], grid)[0, 0])


def nearest(images: torch.Tensor, references: torch.Tensor, grid: int = DEFAULT_GRID):
    """(distance, index) of each image's nearest reference."""
    matrix = tiled_l2_matrix(images, references, grid)
    distance, index = matrix.min(dim=1)
    return distance, index
