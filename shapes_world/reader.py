"""Attribute reader: which shape, shape colour and background colour an image of the shapes world shows.

Pure numpy, no learned weights; everything it compares with comes from the world file (the palette,
and the generator's own shape renderer), so a world with other shapes and colours gets a reader of
its own without code changes.

How it reads an HxWx3 image in [0, 1]:
1. Background: the median of the outer ring of pixels (scenes keep the shape off the border),
   named by the nearest palette colour.
2. Shape colour: the median of the largest 4-connected region of pixels further from the
   background colour than half the smallest distance between two palette colours, named by the
   nearest palette colour.
3. Shape pixels: the largest 4-connected region of pixels nearer the shape colour than the
   background colour (robust to a texture on either).
4. Shape: every world shape is fitted to that region with the generator's renderer — centre from
   the region's centroid, size from its area, rotation searched in 5-degree steps — and the shape
   whose best fit overlaps the region most (intersection over union) is the answer. Fitting whole
   templates, rather than measuring corners, keeps a decoder's rounded edges from turning a cross
   or a triangle into a square.

`confidence` says how much the image looks like a clean scene at all: the share of pixels that lie
near the background or the shape colour, times the best fit's overlap. A clean render scores
about 0.95; a smeared, blended, blank or off-world image scores low.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shapes_world.scenes import Scene, World

REF_SIZE = 0.3        # circumradius (fraction of the width) of the reference renders
ROTATION_STEP = 5.0   # degrees between fitted rotations


@dataclass(frozen=True)
class Reading:
    shape: str | None
    colour: str | None
    background: str | None
    confidence: float

    @property
    def attributes(self) -> tuple:
        return (self.shape, self.colour, self.background)


class AttributeReader:
    def __init__(self, world: World):
        self.world = world
        self.names = list(world.colours)
        self.palette = np.stack([world.colours[n] for n in self.names])
        d = np.linalg.norm(self.palette[:, None] - self.palette[None], axis=-1)
        self.tolerance = 0.5 * float(d[d > 0].min())
        self.shape_names = list(world.shapes)
        self.unit_shapes = self._unit_shapes()

    def _unit_shapes(self):
        """Per shape: area (pixels) and centroid offset (in circumradii) at circumradius `REF_SIZE`, rotation 0."""
        out = {}
        for name in self.shape_names:
            mask = self.world.shape_mask(Scene(name, "", "", 0.5, 0.5, REF_SIZE, 0.0), supersample=1) >= 0.5
            ys, xs = np.nonzero(mask)
            res = self.world.resolution
            centroid = np.asarray([(xs.mean() + 0.5) / res - 0.5, (ys.mean() + 0.5) / res - 0.5]) / REF_SIZE
            out[name] = (float(mask.sum()), centroid)
        return out

    def fit_shape(self, region: np.ndarray) -> tuple[str, float]:
        """(best shape, its intersection over union with the region) over every shape and rotation."""
        res = self.world.resolution
        ys, xs = np.nonzero(region)
        cx, cy = (xs.mean() + 0.5) / res, (ys.mean() + 0.5) / res
        best, best_iou = None, -1.0
        for name in self.shape_names:
            ref_area, centroid = self.unit_shapes[name]
            size = REF_SIZE * float(np.sqrt(region.sum() / ref_area))
            for rot in np.arange(0.0, 360.0, ROTATION_STEP):
                a = np.radians(rot)
                ox = (np.cos(a) * centroid[0] - np.sin(a) * centroid[1]) * size
                oy = (np.sin(a) * centroid[0] + np.cos(a) * centroid[1]) * size
                mask = self.world.shape_mask(Scene(name, "", "", cx - ox, cy - oy, size, float(rot)), supersample=1) >= 0.5
                union = np.logical_or(mask, region).sum()
                iou = np.logical_and(mask, region).sum() / union if union else 0.0
                if iou > best_iou:
                    best, best_iou = name, float(iou)
        return best, best_iou

    def nearest_colour(self, rgb: np.ndarray) -> tuple[int, float]:
        d = np.linalg.norm(self.palette - rgb, axis=-1)
        i = int(np.argmin(d))
        return i, float(d[i])

    def read(self, image: np.ndarray) -> Reading:
        img = np.asarray(image, np.float32)
        if img.max() > 1.5:  # uint8 range
            img = img / 255.0
        img = img[..., :3]
        ring = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
        bg_i, _ = self.nearest_colour(np.median(ring, axis=0))
        d_bg = np.linalg.norm(img - self.palette[bg_i], axis=-1)
        off_bg = largest_component(d_bg > self.tolerance)
        if off_bg.sum() < 0.01 * off_bg.size:
            return Reading(None, None, self.names[bg_i], 0.0)
        fg_i, _ = self.nearest_colour(np.median(img[off_bg], axis=0))
        if fg_i == bg_i:
            return Reading(None, None, self.names[bg_i], 0.0)
        # a textured shape or background varies around its colour: split by the nearer of the two
        region = largest_component(np.linalg.norm(img - self.palette[fg_i], axis=-1) < d_bg)
        if region.sum() < 0.01 * region.size:
            return Reading(None, self.names[fg_i], self.names[bg_i], 0.0)
        shape, overlap = self.fit_shape(region)
        near_bg = np.linalg.norm(img - self.palette[bg_i], axis=-1) <= self.tolerance
        near_fg = np.linalg.norm(img - self.palette[fg_i], axis=-1) <= self.tolerance
        purity = float((near_bg | near_fg).mean())
        return Reading(shape, self.names[fg_i], self.names[bg_i], round(purity * overlap, 4))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (iterative flood fill, no scipy)."""
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    best, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else np.zeros_like(mask, bool)
