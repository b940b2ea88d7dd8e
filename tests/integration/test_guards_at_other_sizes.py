"""A set built at one size guards a generation of another, through the real server: the guarded photos
built at 128x128 guard the memorizer's 64x64 generations in both shipped guard workflows (the filter
compares at the comparison size; the latent-space nodes get the set re-encoded by the graph's VAE)."""
import pytest
from conftest import GUARDED_AT_128, saved_images
from memorizer import data as memorizer_data

from host.comfy_host import execution_error
from host.comfy_host import node_ui as node_output
from host.workflow import set_inputs

NAME, CAPTION, PHOTO = memorizer_data.training_items()[0]


def run(host, prompt):
    entry = host.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    return entry


def without_desired_prompt(prompt: dict) -> dict:
    """The two-pass workflow with its Desired prompt disconnected: NudgeRegenerate falls back to the
    latent nudge, which needs the matched items as latents at the generation's size."""
    for node in prompt.values():
        if node["class_type"] == "NudgeRegenerate":
            node["inputs"].pop("desired_positive", None)
    return prompt


@pytest.mark.parametrize("desired", [True, False], ids=["desired-prompt", "latent-nudge"])
def test_a_128px_set_guards_64px_generations_in_the_two_pass_workflow(host, guard_prompt, fresh_seed, desired):
    for seed in range(fresh_seed, fresh_seed + 5):
        prompt = set_inputs(guard_prompt(CAPTION, seed), "LoadEmbeddingSet", set_name=GUARDED_AT_128)
        if not desired:
            prompt = without_desired_prompt(prompt)
        entry = run(host, prompt)
        report = node_output(entry, prompt, "MemorizationFilter")["text"][0]
        if "FLAGGED" in report:
            break
    else:
        pytest.fail(f"the 64x64 copy of '{NAME}' was never flagged against its 128x128 copy in 5 seeds: {report}")
    assert f"'{NAME}'" in report
    assert "attempt" in node_output(entry, prompt, "NudgeRegenerate")["text"][0]       # the branch ran
    assert "regenerated" in node_output(entry, prompt, "ConditionalRegenerate")["text"][0]
    assert saved_images(host, entry, prompt)[0].shape == PHOTO.shape


def test_a_128px_set_guards_64px_generations_in_the_single_pass_workflow(host, guard_prompt, fresh_seed):
    prompt = set_inputs(guard_prompt(CAPTION, fresh_seed, "single_pass_guard.json"), "LoadEmbeddingSet",
                        set_name=GUARDED_AT_128)
    entry = run(host, prompt)
    # Without the guard every seed of a training caption reproduces its photo (test_memorizer); the
    # guard catches it only if the 128x128 set reached it as 8x8 latents.
    report = node_output(entry, prompt, "MemorizationFilter")["text"][0]
    assert report.splitlines()[-1] == "0 of 1 flagged", report
    assert saved_images(host, entry, prompt)[0].shape == PHOTO.shape
