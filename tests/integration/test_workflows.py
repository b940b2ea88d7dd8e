"""Every shipped workflow, converted from its UI-format file, runs through the real server."""
import os

import numpy as np
import pytest
from conftest import GUARDED, saved_images
from memorizer import data as memorizer_data
from safetensors import safe_open

from host.comfy_host import execution_error
from host.comfy_host import node_ui as node_output
from host.workflow import ui_to_api
from nudging_core.embedding_set import load_set

WORKFLOWS = sorted(f for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "..", "workflows"))
                   if f.endswith(".json"))


def test_every_shipped_workflow_is_covered():
    assert set(WORKFLOWS) == {"memorization_guard.json", "build_embedding_set.json", "nudge_toward_style.json",
                              "single_pass_guard.json"}


def test_build_embedding_set_workflow_saves_a_set_and_never_overwrites(host, object_info, checkpoint):
    from conftest import configure, load_workflow
    prompt = configure(ui_to_api(load_workflow("build_embedding_set.json"), object_info), checkpoint)
    sets_dir = os.path.join(host.home, "models", "embedding_sets")
    before = set(os.listdir(sets_dir))
    names = []
    for attempt in range(2):
        for node in prompt.values():
            if node["class_type"] == "SaveEmbeddingSet":
                node["inputs"]["set_name"] = "from_workflow"
            if node["class_type"] == "BuildEmbeddingSet":
                node["inputs"]["item_names"] = f"first image {attempt}"   # differ, so the run is not cached
        entry = host.run(prompt)
        assert execution_error(entry) is None, execution_error(entry)
        names.append(node_output(entry, prompt, "SaveEmbeddingSet")["text"][0])
    added = set(os.listdir(sets_dir)) - before
    assert added == {"from_workflow.safetensors", "from_workflow_001.safetensors"}, (names, added)
    saved = load_set(os.path.join(sets_dir, "from_workflow.safetensors"))
    res = memorizer_data.RESOLUTION
    assert len(saved) == 1 and saved.pixels.shape == (1, res, res, 3)
    assert saved.latent_shape == (4, res // 8, res // 8)
    with safe_open(os.path.join(sets_dir, "from_workflow.safetensors"), "pt") as f:
        assert '"first image 0"' in f.metadata()["info"]


def _run_guard(host, guard_prompt, caption, seed, workflow="memorization_guard.json"):
    prompt = guard_prompt(caption, seed, workflow)
    entry = host.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    return prompt, entry


def test_memorization_guard_regenerates_a_memorized_output(host, guard_prompt, fresh_seed):
    name, caption, _ = memorizer_data.training_items()[0]
    # The memorizer reproduces its training image for most seeds; take the first seed that does.
    for seed in range(fresh_seed, fresh_seed + 5):
        prompt, entry = _run_guard(host, guard_prompt, caption, seed)
        verdicts = node_output(entry, prompt, "MemorizationFilter")
        if "FLAGGED" in verdicts["text"][0]:
            break
    else:
        pytest.fail(f"the memorizer never reproduced '{caption}' in 5 seeds: {verdicts['text'][0]}")
    assert f"'{name}'" in verdicts["text"][0]
    status = node_output(entry, prompt, "ConditionalRegenerate")
    assert status["text"][0].startswith("image 0: ")
    assert "regenerated" in status["text"][0]              # 'regenerated' or 'still flagged', never silent
    assert "attempt" in node_output(entry, prompt, "NudgeRegenerate")["text"][0]   # the lazy branch ran
    images = saved_images(host, entry, prompt)
    assert len(images) == 1 and images[0].shape == (memorizer_data.RESOLUTION, memorizer_data.RESOLUTION, 3)


def test_memorization_guard_leaves_clean_outputs_alone_without_running_the_branch(host, guard_prompt, fresh_seed):
    caption = memorizer_data.unseen_captions()[0]
    for seed in range(fresh_seed, fresh_seed + 5):
        prompt, entry = _run_guard(host, guard_prompt, caption, seed)
        if "passed" in node_output(entry, prompt, "MemorizationFilter")["text"][0]:
            break
    else:
        pytest.skip("every seed of the unseen caption landed on a training image")
    assert node_output(entry, prompt, "ConditionalRegenerate")["text"][0] == "image 0: passed"
    assert node_output(entry, prompt, "NudgeRegenerate") is None   # lazy: the nudge branch never ran


def test_nudge_toward_style_workflow_runs(host, guard_prompt, fresh_seed):
    _name, caption, _ = memorizer_data.training_items()[0]
    prompt, entry = _run_guard(host, guard_prompt, caption, fresh_seed, "nudge_toward_style.json")
    assert node_output(entry, prompt, "ConditionalRegenerate") is not None
    nudge = node_output(entry, prompt, "LatentNudge")
    if nudge is not None:
        assert "to desired" in nudge["text"][0]
    assert len(saved_images(host, entry, prompt)) == 1


def test_guarded_set_built_by_the_cli_matches_the_training_images(host):
    saved = load_set(os.path.join(host.home, "models", "embedding_sets", GUARDED))
    items = memorizer_data.training_items()
    assert saved.names == sorted(name for name, _, _ in items)
    by_name = {name: pixels for name, _, pixels in items}
    assert np.array_equal(saved.pixels[0].numpy(), by_name[saved.names[0]])


def test_single_pass_guard_workflow_steers_a_memorized_prompt_off_its_copy(host, guard_prompt, fresh_seed):
    # Every seed of a training caption reproduces its photo without the guard (test_memorizer);
    # with it, the same single pass ends away from the copy, and the filter says so.
    _name, caption, _ = memorizer_data.training_items()[0]
    prompt, entry = _run_guard(host, guard_prompt, caption, fresh_seed, "single_pass_guard.json")
    report = node_output(entry, prompt, "MemorizationFilter")["text"][0]
    assert report.startswith("threshold 0.1") and report.splitlines()[-1] == "0 of 1 flagged", report
    assert len(saved_images(host, entry, prompt)) == 1
