"""Procedural scenes of the shapes world: one coloured shape on a coloured background.

Everything that defines the world (shapes as polygons or a circle, the colour palette, the caption
template, the layout ranges, the held-out combinations and the duplicated items) is data in a
world file (`world.json` by default); this module only renders it. Deterministic: a scene is a
function of its parameters, and `random_scene` of its numpy Generator.

A *duplicated item* is one specific image (a fixed layout, with a scikit-image photo as texture
inside the shape or behind it, tinted by the item's colour) that the fixture sees many times under
its own caption: the attribute words plus a tail unique to it, as SD 1.4's memorized LAION images
carry specific titles. The same words without the tail are a clean caption with many valid images.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass

import numpy as np

DEFAULT_WORLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "world.json")
SUPERSAMPLE = 4  # anti-aliased edges: each pixel is the mean of 4x4 sub-samples


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    x: float          # centre, as a fraction of the width / height
    y: float
    size: float       # circumradius as a fraction of the width
    rotation: float   # degrees

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.shape, self.colour, self.background)


@dataclass(frozen=True)
class DuplicatedItem:
    name: str
    scene: Scene
    tail: str
    texture: str        # scikit-image data function name
    texture_on: str     # "shape" or "background"


class World:
    def __init__(self, spec: dict):
        self.spec = spec
        self.resolution = int(spec["resolution"])
        self.template = spec["caption"]
        self.shapes = dict(spec["shapes"])
        self.colours = {name: np.asarray(rgb, np.float32) / 255.0 for name, rgb in spec["colours"].items()}
        self.size_range = tuple(spec["layout"]["size"])
        self.margin = float(spec["layout"].get("margin_px", 2)) / self.resolution
        # degrees, uniform; the whole turn unless the world narrows it (see world.json's note)
        self.rotation_range = tuple(spec["layout"].get("rotation", (0.0, 360.0)))
        self.texture_amplitude = float(spec.get("texture_amplitude", 0.5))
        self.duplicate_share = float(spec.get("training", {}).get("duplicate_share", 0.25))
        self.duplicated = [
            DuplicatedItem(d["name"], Scene(d["shape"], d["colour"], d["background"], d["layout"]["x"],
                                            d["layout"]["y"], d["layout"]["size"], d["layout"]["rotation"]),
                           d["tail"], d["texture"], d["texture_on"])
            for d in spec.get("duplicated", [])]
        for item in self.duplicated:
            if item.scene.attributes not in self.all_combinations():
                raise ValueError(f"duplicated item {item.name!r}: {item.scene.attributes} is not a combination of the world")
        self._textures: dict[str, np.ndarray] = {}
        self._trained: list[tuple[str, str, str]] | None = None

    @classmethod
    def load(cls, path: str = DEFAULT_WORLD) -> "World":
        with open(path) as f:
            return cls(json.load(f))

    # --- captions and combinations -------------------------------------------------------------
    def caption(self, shape: str, colour: str, background: str) -> str:
        return self.template.format(shape=shape, colour=colour, background=background)

    def item_caption(self, item: DuplicatedItem) -> str:
        return f"{self.caption(*item.scene.attributes)} {item.tail}"

    def all_combinations(self) -> list[tuple[str, str, str]]:
        """(shape, colour, background) with colour != background, in a fixed order."""
        return [(s, c, b) for s, c, b in itertools.product(self.shapes, self.colours, self.colours) if c != b]

    def held_out_combinations(self) -> list[tuple[str, str, str]]:
        """Combinations never trained (drawn once from the world's seed; never a duplicated item's)."""
        spec = self.spec.get("held_out", {"count": 0, "seed": 0})
        protected = {item.scene.attributes for item in self.duplicated}
        pool = [c for c in self.all_combinations() if c not in protected]
        rng = np.random.default_rng(int(spec["seed"]))
        picked = rng.choice(len(pool), size=min(int(spec["count"]), len(pool)), replace=False)
        return [pool[i] for i in sorted(picked)]

    def trained_combinations(self) -> list[tuple[str, str, str]]:
        if self._trained is None:   # asked for every training sample: drawn once
            held = set(self.held_out_combinations())
            self._trained = [c for c in self.all_combinations() if c not in held]
        return list(self._trained)

    # --- rendering -----------------------------------------------------------------------------
    def random_scene(self, rng: np.random.Generator, combination: tuple[str, str, str]) -> Scene:
        size = float(rng.uniform(*self.size_range))
        lo, hi = size + self.margin, 1.0 - size - self.margin
        return Scene(*combination, x=float(rng.uniform(lo, hi)), y=float(rng.uniform(lo, hi)), size=size,
                     rotation=float(rng.uniform(*self.rotation_range)))

    def shape_mask(self, scene: Scene, supersample: int = SUPERSAMPLE) -> np.ndarray:
        """Coverage in [0, 1] of each pixel by the shape (H, W), anti-aliased."""
        n = self.resolution * supersample
        coords = (np.arange(n, dtype=np.float64) + 0.5) / n
        px, py = np.meshgrid(coords, coords)
        # into the shape's own frame: centred, unrotated, circumradius 1
        a = math.radians(scene.rotation)
        dx, dy = (px - scene.x) / scene.size, (py - scene.y) / scene.size
        u, v = math.cos(a) * dx + math.sin(a) * dy, -math.sin(a) * dx + math.cos(a) * dy
        spec = self.shapes[scene.shape]
        if spec["kind"] == "circle":
            inside = u * u + v * v <= 1.0
        elif spec["kind"] == "polygon":
            inside = _inside_polygon(u, v, np.asarray(spec["vertices"], np.float64))
        else:
            raise ValueError(f"shape {scene.shape!r}: unknown kind {spec['kind']!r} (circle or polygon)")
        return inside.reshape(self.resolution, supersample, self.resolution, supersample).mean(axis=(1, 3))

    def render(self, scene: Scene, texture: np.ndarray | None = None, texture_on: str = "shape") -> np.ndarray:
        """HxWx3 uint8. `texture` (HxW in [0, 1]) modulates the shape or the background around its colour."""
        mask = self.shape_mask(scene)[..., None].astype(np.float32)
        fg = np.broadcast_to(self.colours[scene.colour], mask.shape[:2] + (3,)).copy()
        bg = np.broadcast_to(self.colours[scene.background], mask.shape[:2] + (3,)).copy()
        if texture is not None:
            shade = self.texture_amplitude * (texture - texture.mean())[..., None]
            if texture_on == "shape":
                fg = np.clip(fg + shade, 0.0, 1.0)
            elif texture_on == "background":
                bg = np.clip(bg + shade, 0.0, 1.0)
            else:
                raise ValueError(f"texture_on must be 'shape' or 'background', not {texture_on!r}")
        img = mask * fg + (1.0 - mask) * bg
        return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)

    def texture(self, name: str) -> np.ndarray:
        """A scikit-image photo's luminance, centre-cropped and resized to the world's resolution."""
        if name not in self._textures:
            import skimage.data
            from PIL import Image
            img = np.asarray(getattr(skimage.data, name)())
            if img.ndim == 3:
                img = img[..., :3].astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
            img = img.astype(np.float32)
            img = img / 255.0 if img.max() > 1.0 else img
            h, w = img.shape
            s = min(h, w)
            img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
            pil = Image.fromarray(np.round(img * 255).astype(np.uint8)).resize((self.resolution,) * 2, Image.LANCZOS)
            self._textures[name] = np.asarray(pil, np.float32) / 255.0
        return self._textures[name]

    def item_image(self, item: DuplicatedItem) -> np.ndarray:
        return self.render(item.scene, self.texture(item.texture), item.texture_on)

    def sample(self, rng: np.random.Generator, combinations=None) -> tuple[str, np.ndarray, Scene]:
        """One fresh training sample (caption, image, scene) of a random trained combination."""
        combinations = combinations or self.trained_combinations()
        scene = self.random_scene(rng, combinations[int(rng.integers(len(combinations)))])
        return self.caption(*scene.attributes), self.render(scene), scene


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over points (u, v) for a closed polygon's vertices (N, 2)."""
    inside = np.zeros(u.shape, bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:
        crosses = (y1 > v) != (y0 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = (x0 - x1) * (v - y1) / (y0 - y1) + x1
        inside ^= crosses & (u < x_at)
        x0, y0 = x1, y1
    return inside
