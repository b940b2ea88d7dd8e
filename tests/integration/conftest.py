"""A real ComfyUI server for the whole integration session, with the pack linked in.

The model is the project's own memorizer (built from memorizer/weights in seconds, cached);
the guarded set is built from its training images with the command-line builder, and a guard
index of 200 items (those images among smooth random ones) with build_sharded_guard. The shapes
fixture (shapes_world/weights) is linked in beside it.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from host.comfy_host import CACHE, REPO, ComfyHost, output_paths
from host.workflow import configure_txt2img, ui_to_api
from memorizer import data as memorizer_data
from memorizer.build_checkpoint import ensure_checkpoint
from nudging_core.guard_index import build_sharded_guard
from shapes_world import build_checkpoint as shapes_checkpoint_builder
from shapes_world.scenes import World

GUARDED = "guarded_images.safetensors"
STYLE = "style_reference.safetensors"
SHAPES_GUARDED = "shapes_items.safetensors"
GUARDED_AT_128 = "guarded_images_128px.safetensors"   # the same photos, built at twice the generation size
CHECKPOINT_NAME = "nudging-memorizer-sd15.safetensors"
GUARD_INDEX = "guard_index_200"        # a guard index folder in models/embedding_sets (LoadGuardIndex)
GUARD_INDEX_ITEMS = 200
GUARD_INDEX_FIRST_PHOTO = 100          # the memorizer's photos are items 100-107 (in the second of four shards)


def guard_index_items() -> tuple[list[np.ndarray], list[str]]:
    """The index's items and names: smooth random 64x64 images, with the memorizer's training photos
    in the middle (so a hit comes from a shard other than the first)."""
    g = torch.Generator().manual_seed(12)
    small = torch.rand(GUARD_INDEX_ITEMS, 3, 8, 8, generator=g)
    fillers = torch.nn.functional.interpolate(small, size=(memorizer_data.RESOLUTION,) * 2, mode="bilinear",
                                              align_corners=False)
    items = list((fillers * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    names = [f"filler_{i:03d}.png" for i in range(GUARD_INDEX_ITEMS)]
    for k, (name, _caption, pixels) in enumerate(memorizer_data.training_items()):
        items[GUARD_INDEX_FIRST_PHOTO + k], names[GUARD_INDEX_FIRST_PHOTO + k] = np.array(pixels), f"photos/{name}.png"
    return items, names


@pytest.fixture(scope="session")
def checkpoint() -> str:
    return ensure_checkpoint(os.path.join(CACHE, "models"), name=CHECKPOINT_NAME)


@pytest.fixture(scope="session")
def shapes_checkpoint() -> str:
    """The shapes fixture: memorizes 8 duplicated items, draws any other scene of its world."""
    return shapes_checkpoint_builder.ensure_checkpoint(os.path.join(CACHE, "models"))


@pytest.fixture(scope="session")
def host(tmp_path_factory, checkpoint, shapes_checkpoint):
    home = tmp_path_factory.mktemp("comfy-home")
    server = ComfyHost(str(home))
    server.prepare()
    for path in (checkpoint, shapes_checkpoint):
        os.symlink(path, os.path.join(server.dir("models", "checkpoints"), os.path.basename(path)))
    images_dir = server.dir("input", "training")
    for name, _caption, pixels in memorizer_data.training_items():
        Image.fromarray(pixels).save(os.path.join(images_dir, f"{name}.png"))
    first = memorizer_data.training_items()[0]
    Image.fromarray(first[2]).save(os.path.join(server.dir("input"), "guarded_image.png"))
    sets_dir = server.dir("models", "embedding_sets")
    subprocess.run([sys.executable, "-m", "tools.build_embedding_set", images_dir, "--checkpoint", checkpoint,
                    "--out", os.path.join(sets_dir, GUARDED)], cwd=REPO, check=True)
    images_128 = server.dir("input", "training_128")
    for name, _caption, pixels in memorizer_data.training_items(size=128):
        Image.fromarray(pixels).save(os.path.join(images_128, f"{name}.png"))
    subprocess.run([sys.executable, "-m", "tools.build_embedding_set", images_128, "--checkpoint", checkpoint,
                    "--out", os.path.join(sets_dir, GUARDED_AT_128)], cwd=REPO, check=True)
    # A "style" to pull toward: two training images other than the guarded prompt's own.
    style_dir = server.dir("style")
    for name, _caption, pixels in memorizer_data.training_items()[-2:]:
        Image.fromarray(pixels).save(os.path.join(style_dir, f"{name}.png"))
    subprocess.run([sys.executable, "-m", "tools.build_embedding_set", style_dir, "--checkpoint", checkpoint,
                    "--out", os.path.join(sets_dir, STYLE)], cwd=REPO, check=True)
    # The shapes fixture's duplicated items, guarded (built with its own checkpoint's VAE).
    shapes_dir = server.dir("shapes_items")
    world = World.load()
    for item in world.duplicated:
        Image.fromarray(world.item_image(item)).save(os.path.join(shapes_dir, f"{item.name}.png"))
    subprocess.run([sys.executable, "-m", "tools.build_embedding_set", shapes_dir, "--checkpoint", shapes_checkpoint,
                    "--out", os.path.join(sets_dir, SHAPES_GUARDED)], cwd=REPO, check=True)
    # A guard index, as guard_build lays one out: shards, guard.json and items.txt (one name a line).
    items, names = guard_index_items()
    build_sharded_guard(os.path.join(sets_dir, GUARD_INDEX), items, shard_size=64)
    with open(os.path.join(sets_dir, GUARD_INDEX, "items.txt"), "w", encoding="utf-8") as fh:
        fh.write("".join(name + "\n" for name in names))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def object_info(host) -> dict:
    return host.object_info()


def load_workflow(name: str) -> dict:
    with open(os.path.join(REPO, "workflows", name)) as f:
        return json.load(f)


def configure(prompt: dict, checkpoint: str, caption: str | None = None, seed: int | None = None) -> dict:
    """Point a shipped workflow at the memorizer: its checkpoint, size and sampler settings (and the
    caption's desired re-wording in the "Desired prompt" node)."""
    return configure_txt2img(prompt, os.path.basename(checkpoint), memorizer_data.RESOLUTION,
                             memorizer_data.SAMPLER_SETTINGS, caption, seed,
                             desired=None if caption is None else memorizer_data.desired_caption(caption))


@pytest.fixture
def guard_prompt(object_info, checkpoint):
    def make(caption: str, seed: int, workflow: str = "memorization_guard.json") -> dict:
        return configure(ui_to_api(load_workflow(workflow), object_info), checkpoint, caption, seed)
    return make


@pytest.fixture
def fresh_seed():
    # Identical prompts are answered from cache; every run that must execute gets its own seed.
    return random.Random().randint(10_000, 2**31)


def saved_images(host: ComfyHost, entry: dict, prompt: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in output_paths(host, entry, prompt, "SaveImage")]
