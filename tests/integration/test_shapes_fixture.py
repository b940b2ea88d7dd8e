"""The shapes fixture, built from its compact weights, loads in ComfyUI as SD 1.x, reproduces a
duplicated item for the item's own caption and draws a new scene with the right attributes for
the same words without the item's tail. Both shipped guard workflows, given the words without the
tail as their desired prompt, turn the duplicated caption into a new scene: not a copy by the
detector, not a near-copy by the bench's independent test, in the caption's colours."""
import os

import numpy as np
import torch
import pytest
from conftest import GUARDED, SHAPES_GUARDED, configure, load_workflow, saved_images

from bench.near_copy import near_copy
from host.comfy_host import execution_error
from host.comfy_host import node_ui as node_output
from host.workflow import configure_txt2img, generation_only, ui_to_api
from memorizer.data import SAMPLER_SETTINGS
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


@pytest.mark.parametrize("workflow", ["memorization_guard.json", "single_pass_guard.json"])
def test_guard_workflows_turn_a_duplicated_caption_into_a_new_scene(host, object_info, shapes_checkpoint, workflow,
                                                                     fresh_seed):
    world = World.load()
    reader = AttributeReader(world)
    item = world.duplicated[1]
    own = world.item_image(item).astype(np.float32) / 255.0
    base = ui_to_api(load_workflow(workflow), object_info)
    outcomes = []
    for seed in range(fresh_seed, fresh_seed + 3):
        prompt = configure_txt2img(base, os.path.basename(shapes_checkpoint), world.resolution,
                                   SAMPLER_SETTINGS,
                                   caption=world.item_caption(item), seed=seed,
                                   set_names={GUARDED: SHAPES_GUARDED}, desired=world.caption(*item.scene.attributes))
        entry = host.run(prompt)
        assert execution_error(entry) is None, execution_error(entry)
        image = saved_images(host, entry, prompt)[0].astype(np.float32) / 255.0
        report = node_output(entry, prompt, "MemorizationFilter")["text"][0]
        outcomes.append((tiled_l2(torch.from_numpy(image), torch.from_numpy(own)), near_copy(image, own),
                         reader.read(image).attributes, report))
    for distance, judged, _read, report in outcomes:
        assert distance >= 0.1 and not judged["near_copy"], outcomes
        if workflow == "single_pass_guard.json":
            assert report.splitlines()[-1] == "0 of 1 flagged", report
    # Colours come from the desired prompt: the new scene is still the caption's.
    _shape, colour, background = item.scene.attributes
    assert sum(r[1:] == (colour, background) for _d, _j, r, _rep in outcomes) >= 2, outcomes
