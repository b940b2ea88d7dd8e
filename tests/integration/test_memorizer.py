"""The project's memorizer, built from its compact weights, loads in ComfyUI as SD 1.x and
reproduces a training image when prompted with that image's caption."""
import numpy as np
import torch
from conftest import saved_images
from memorizer import data as memorizer_data

from host.comfy_host import execution_error
from host.workflow import generation_only
from nudging_core.tiled_l2 import tiled_l2


def test_a_training_caption_reproduces_its_image(host, guard_prompt, fresh_seed):
    name, caption, pixels = memorizer_data.training_items()[1]
    own = torch.from_numpy(pixels.astype(np.float32) / 255.0)
    distances = []
    for seed in range(fresh_seed, fresh_seed + 3):
        prompt = generation_only(guard_prompt(caption, seed))
        entry = host.run(prompt)
        assert execution_error(entry) is None, execution_error(entry)
        image = torch.from_numpy(saved_images(host, entry, prompt)[0].astype(np.float32) / 255.0)
        distances.append(tiled_l2(image, own))
    assert min(distances) < 0.1, f"'{caption}' did not reproduce '{name}': tiled L2 {distances}"

