"""Attribute reader: which shape, shape colour and background colour an image of the shapes world shows.

Pure numpy, no learned weights; everything it compares with is derived from the world file, so a
world with other shapes and colours gets a reader of its own without code changes.

How it reads an HxWx3 image in [0, 1]:
1. Background: the median of the outer ring of pixels (scenes keep the shape off the border),
   named by the nearest palette colour.
2. Shape colour: the median of the largest 4-connected region of pixels further from the
   background colour than half the smallest distance between two palette colours, named by the
   nearest palette colour.
3. Shape pixels: the largest 4-connected region of pixels nearer the shape colour than the
   background colour (robust to a texture on either).
4. Shape: two rotation- and scale-invariant descriptors of the region, compared with the same
   descriptors of every world shape rendered by the generator at several sizes and rotations
   (nearest prototype, in units of each descriptor's spread across the world's shapes):
   - fill: area / (pi * r_max^2), r_max the largest centroid-to-pixel distance (1 for a circle,
     0.64 for a square, 0.41 for a triangle);
   - solidity: area / area of the convex hull (1 for convex shapes, ~0.7 for a plus sign).

`confidence` says how much the image looks like a clean scene at all: the share of pixels that lie
near the background or the shape colour, times how close the descriptors are to their prototype
(1 at the prototype, 0 half-way to the next one). A smeared, blended or off-world image scores low.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shapes_world.scenes import Scene, World


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
        self.prototypes, self.scale = self._prototypes()

    def _prototypes(self):
        """Mean descriptors of each shape over the generator's own sizes and rotations."""
        lo, hi = self.world.size_range
        feats = {}
        for name in self.shape_names:
            f = []
            for size in np.linspace(lo, hi, 3):
                for rot in np.linspace(0.0, 90.0, 7):
                    mask = self.world.shape_mask(Scene(name, "", "", 0.5, 0.5, float(size), float(rot))) >= 0.5
                    f.append(shape_descriptors(mask))
            feats[name] = np.mean(f, axis=0)
        protos = np.stack([feats[n] for n in self.shape_names])
        # scale each descriptor by its spread across the shapes, so neither dominates
        spread = protos.std(axis=0) if len(protos) > 1 else np.ones(protos.shape[1])
        return protos, np.where(spread > 1e-6, spread, 1.0)

    def nearest_colour(self, rgb: np.ndarray) -> tuple[int, float]:
        d = np.linalg.norm(self.palette - rgb, axis=-1)
        i = int(np.argmin(d))
        return i, float(d[i])

    def read(self, image: np.ndarray) -> Reading:
        img = np.asarray(image, np.float32)
        if img.dtype != np.float32 or img.max() > 1.5:
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
        feats = shape_descriptors(region)
        dist = np.linalg.norm((self.prototypes - feats) / self.scale, axis=-1)
        order = np.argsort(dist)
        shape = self.shape_names[order[0]]
        # 1 at the prototype, 0 half-way to the second-nearest prototype
        if len(order) > 1:
            gap = np.linalg.norm((self.prototypes[order[1]] - self.prototypes[order[0]]) / self.scale)
            shape_fit = max(0.0, 1.0 - dist[order[0]] / (0.5 * gap))
        else:
            shape_fit = 1.0
        near_bg = np.linalg.norm(img - self.palette[bg_i], axis=-1) <= self.tolerance
        near_fg = np.linalg.norm(img - self.palette[fg_i], axis=-1) <= self.tolerance
        purity = float((near_bg | near_fg).mean())
        return Reading(shape, self.names[fg_i], self.names[bg_i], round(purity * shape_fit, 4))

    def matches(self, image: np.ndarray, attributes: tuple[str, str, str]) -> bool:
        return self.read(image).attributes == tuple(attributes)


def shape_descriptors(mask: np.ndarray) -> np.ndarray:
    """(fill, solidity) of a boolean mask; see the module docstring."""
    ys, xs = np.nonzero(mask)
    area = float(len(xs))
    if area < 3:
        return np.zeros(2)
    cx, cy = xs.mean(), ys.mean()
    # pixel centres are points; pad r_max by half a pixel's diagonal so a disc reads as ~1
    r_max = float(np.sqrt(((xs - cx) ** 2 + (ys - cy) ** 2).max())) + 0.5
    fill = area / (np.pi * r_max ** 2)
    # convex hull of the pixel squares' corners; only a row's end pixels can be on it
    ends = {}
    for x, y in zip(xs.tolist(), ys.tolist()):
        lo, hi = ends.get(y, (x, x))
        ends[y] = (min(lo, x), max(hi, x))
    ex = np.asarray([v for lo, hi in ends.values() for v in (lo, hi)])
    ey = np.asarray([y for y in ends for _ in (0, 1)])
    corners = np.concatenate([np.stack([ex + dx, ey + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    hull = convex_hull(np.unique(corners, axis=0).astype(np.float64))
    hull_area = polygon_area(hull)
    solidity = area / hull_area if hull_area > 0 else 0.0
    return np.asarray([fill, solidity])


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain; points (N, 2) -> hull vertices in order."""
    pts = points[np.lexsort((points[:, 1], points[:, 0]))]

    def half(seq):
        out = []
        for x, y in seq.tolist():
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (y - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (x - out[-2][0])) <= 0:
                out.pop()
            out.append((x, y))
        return out

    lower, upper = half(pts), half(pts[::-1])
    return np.asarray(lower[:-1] + upper[:-1])


def polygon_area(vertices: np.ndarray) -> float:
    x, y = vertices[:, 0], vertices[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


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
