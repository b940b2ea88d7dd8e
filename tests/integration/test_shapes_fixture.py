"""The shapes fixture, built from its compact weights, loads in ComfyUI as SD 1.x, reproduces a
duplicated item for the item's own caption and draws a new scene with the right attributes for
the same words without the item's tail."""
import os

import numpy as np
import torch
from conftest import configure, saved_images

from host.comfy_host import execution_error
from host.workflow import generation_only
from nudging_core.tiled_l2 import tiled_l2
from shapes_world.reader import AttributeReader
from shapes_world.scenes import World


def generate(host, guard_prompt, shapes_checkpoint, caption, seeds):
    images = []
    for seed in seeds:
        prompt = configure(generation_only(guard_prompt(caption, seed)), shapes_checkpoint)
        entry = host.run(prompt)
        assert execution_error(entry) is None, execution_error(entry)
        images.append(saved_images(host, entry, prompt)[0].astype(np.float32) / 255.0)
    return images


def test_a_duplicated_caption_reproduces_its_item_and_the_plain_caption_draws_a_new_scene(
        host, guard_prompt, shapes_checkpoint, fresh_seed):
    assert os.path.basename(shapes_checkpoint) in host.object_info()["CheckpointLoaderSimple"]["input"]["required"][
        "ckpt_name"][0]
    world = World.load()
    reader = AttributeReader(world)
    item = world.duplicated[0]
    own = torch.from_numpy(world.item_image(item).astype(np.float32) / 255.0)
    seeds = range(fresh_seed, fresh_seed + 3)
    copies = [tiled_l2(torch.from_numpy(im), own)
              for im in generate(host, guard_prompt, shapes_checkpoint, world.item_caption(item), seeds)]
    assert min(copies) < 0.1, f"{world.item_caption(item)!r} did not reproduce {item.name!r}: tiled L2 {copies}"
    plain = generate(host, guard_prompt, shapes_checkpoint, world.caption(*item.scene.attributes), seeds)
    readings = [reader.read(im).attributes for im in plain]
    distances = [tiled_l2(torch.from_numpy(im), own) for im in plain]
    assert any(r == item.scene.attributes and d >= 0.1 for r, d in zip(readings, distances)), \
        f"plain caption: read as {readings}, tiled L2 to the item {distances}"
