"""A real ComfyUI server for the whole integration session, with the pack linked in.

The model is the project's own memorizer (built from memorizer/weights in seconds, cached);
the guarded set is built from its training images with the command-line builder. The shapes
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
from PIL import Image

from host.comfy_host import CACHE, REPO, ComfyHost, output_paths
from host.workflow import configure_txt2img, ui_to_api
from memorizer import data as memorizer_data
from memorizer.build_checkpoint import ensure_checkpoint
from shapes_world import build_checkpoint as shapes_checkpoint_builder
from shapes_world.scenes import World

GUARDED = "guarded_images.safetensors"
STYLE = "style_reference.safetensors"
SHAPES_GUARDED = "shapes_items.safetensors"
GUARDED_AT_128 = "guarded_images_128px.safetensors"   # the same photos, built at twice the generation size
CHECKPOINT_NAME = "nudging-memorizer-sd15.safetensors"


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
