"""Carlini et al. (2023) tiled L2: the memorization test the filter applies.

Both images are floats in [0, 1] (or uint8) of the same size. Each is cut into a grid x grid set
of non-overlapping tiles (4 x 4); per tile pair the distance is the RMS difference over the tile's
pixels and channels, and the image distance is the MAXIMUM over tiles. Taking the max (not the
mean) is what makes it strict: a copy must match everywhere. Sizes not divisible by the grid get
tiles that differ by at most one pixel.

The filter compares at a COMPARISON SIZE: both images are area-averaged to at most
COMPARISON_SIZE x COMPARISON_SIZE (`comparison_size`), so a set built at one size guards
generations of any size and aspect, and a set of hundreds of 512 x 512 images is compared in
milliseconds. Area averaging never raises a tile's RMS difference when the tiles line up with the
averaged blocks (Jensen), so a copy the full-resolution test finds is still found; what it can add
is an image that differs from a guarded one only in fine detail. `bench/comparison_size.py`
measures how often the verdict differs from the full-resolution one on planted copies.
"""
from __future__ import annotations

import torch

from .errors import NudgeInputError

DEFAULT_GRID = 4
COMPARISON_SIZE = 64
_CHUNK_ELEMENTS = 1 << 22   # float elements converted at once: bounds the filter's extra memory (16 MB)


def comparison_size(image_hw, reference_hw, size: int = COMPARISON_SIZE) -> tuple[int, int]:
    """The (height, width) two images are compared at: at most `size`, never upsampled."""
    return (min(size, image_hw[0], reference_hw[0]), min(size, image_hw[1], reference_hw[1]))


def to_comparison(images: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[N, H, W, C] uint8 or float images as float [N, h, w, 3] in [0, 1], area-averaged to hw.
    Converted a chunk at a time through one reused float buffer into one preallocated result: a
    large uint8 batch never exists as a float copy, and no allocation pattern fragments the heap
    (freeing hundreds of interleaved chunk copies grew a process by gigabytes here)."""
    images = images[..., :3]
    n, (height, width), (h, w) = images.shape[0], images.shape[1:3], hw
    out = torch.empty(n, h, w, 3, device=images.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, height * width * 3))
    buffer = torch.empty(min(step, n), height, width, 3, device=images.device) if images.dtype == torch.uint8 else None
    for i in range(0, n, step):
        if buffer is not None:
            chunk = buffer[:min(step, n - i)]
            chunk.copy_(images[i:i + step]).div_(255.0)
        else:
            chunk = images[i:i + step].float()
        if (height, width) == (h, w):
            out[i:i + step] = chunk
        elif height % h == 0 and width % w == 0:   # whole blocks: a mean over them, without a layout copy
            torch.mean(chunk.view(chunk.shape[0], h, height // h, w, width // w, 3), dim=(2, 4), out=out[i:i + step])
        else:
            out[i:i + step] = torch.nn.functional.interpolate(chunk.permute(0, 3, 1, 2), size=hw,
                                                              mode="area").permute(0, 2, 3, 1)
    return out


def _edges(length: int, parts: int) -> list[int]:
    return [(i * length) // parts for i in range(parts + 1)]


def image_tiles(images: torch.Tensor, grid: int = DEFAULT_GRID) -> list[torch.Tensor]:
    """The grid x grid tiles of float [N, H, W, C] images, each flattened to [N, pixels * C]."""
    height, width = images.shape[1], images.shape[2]
    if height < grid or width < grid:
        raise NudgeInputError(f"images of {height}x{width} are smaller than the {grid}x{grid} tile grid")
    rows, cols = _edges(height, grid), _edges(width, grid)
    return [images[:, rows[r]:rows[r + 1], cols[c]:cols[c + 1], :].reshape(images.shape[0], -1)
            for r in range(grid) for c in range(grid)]


def comparison_tiles(pixels: torch.Tensor, hw: tuple[int, int], grid: int = DEFAULT_GRID,
                     device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """A guarded set's copies at the comparison size, cut into tiles, as floats on `device`: what a
    set keeps per size (4 bytes x h x w x 3 per item; 49 KB at 64 x 64) so that a check reads only
    those, never the full-size copies."""
    return [tile.contiguous() for tile in image_tiles(to_comparison(pixels, hw).to(device), grid)]


def tiled_l2_from_tiles(tiles_a: list[torch.Tensor], tiles_b: list[torch.Tensor]) -> torch.Tensor:
    """[N, M] max over tiles of the per-tile RMS difference, from image_tiles of both sides."""
    distance = None
    for ta, tb in zip(tiles_a, tiles_b):
        # Direct differences (not the |a|^2 + |b|^2 - 2ab expansion): near-copies are
        # exactly where that expansion cancels badly.
        rms = _pairwise_rms(ta, tb.to(ta.device))
        distance = rms if distance is None else torch.maximum(distance, rms)
    return distance


def tiled_l2_matrix(images: torch.Tensor, references: torch.Tensor, grid: int = DEFAULT_GRID) -> torch.Tensor:
    """Distances between every image and every reference, shape [N, M].

    images: [N, H, W, C] and references: [M, H, W, C] (ComfyUI's IMAGE layout), float in [0, 1]
    or uint8. References are compared a chunk at a time on the images' device.
    """
    if images.ndim != 4 or references.ndim != 4:
        raise NudgeInputError("images and references must be [batch, height, width, channels] tensors")
    if images.shape[1:] != references.shape[1:]:
        raise NudgeInputError(
            f"image size {tuple(images.shape[1:3])} x {images.shape[3]} channels does not match the "
            f"guarded set's {tuple(references.shape[1:3])} x {references.shape[3]} channels"
        )
    hw = (images.shape[1], images.shape[2])
    tiles_a = image_tiles(to_comparison(images, hw), grid)
    step = max(1, _CHUNK_ELEMENTS // max(1, references[0].numel())) if references.shape[0] else 1
    parts = [tiled_l2_from_tiles(tiles_a, image_tiles(to_comparison(references[i:i + step].to(images.device), hw), grid))
             for i in range(0, references.shape[0], step)]
    if not parts:
        return torch.zeros(images.shape[0], 0, device=images.device)
    return torch.cat(parts, dim=1)


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
