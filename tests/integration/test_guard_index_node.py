"""LoadGuardIndex and MemorizationFilter's guard_index input through the real server (issue #12): the
session's guard index (200 items, the memorizer's photos among them; conftest) guards the two-pass
workflow in place of the guarded set. A memorized caption is flagged by the index and regenerated
(with the desired prompt, and by the latent nudge, whose matched items are the index's comparison
copies re-encoded by the graph's VAE); a clean caption passes without running the branch; a
missing, foreign, damaged or escaping index name is refused naming the node, the input and the fix."""
import json
import os
import shutil
import urllib.error
import urllib.request
import uuid

import pytest
from conftest import GUARD_INDEX, GUARD_INDEX_ITEMS, GUARDED, saved_images
from memorizer import data as memorizer_data

from host.comfy_host import execution_error, node_ui
from host.workflow import find_nodes

NAME, CAPTION, PHOTO = memorizer_data.training_items()[0]
INDEX_NODE = "90"


def sets_dir(host) -> str:
    return os.path.join(host.home, "models", "embedding_sets")


def with_index(prompt: dict, guard_name: str = GUARD_INDEX, keep_set: bool = False) -> dict:
    """The shipped two-pass workflow with a LoadGuardIndex on MemorizationFilter's guard_index; its
    LoadEmbeddingSet removed (the index alone guards) unless keep_set."""
    prompt[INDEX_NODE] = {"class_type": "LoadGuardIndex", "inputs": {"guard_name": guard_name}}
    (filt,) = find_nodes(prompt, "MemorizationFilter")
    prompt[filt]["inputs"]["guard_index"] = [INDEX_NODE, 0]
    if not keep_set:
        (loader,) = find_nodes(prompt, "LoadEmbeddingSet")
        del prompt[loader]
        del prompt[filt]["inputs"]["guarded_set"]
    return prompt


def without_desired_prompt(prompt: dict) -> dict:
    (regen,) = find_nodes(prompt, "NudgeRegenerate")
    prompt[regen]["inputs"].pop("desired_positive", None)
    return prompt


def strict_json(raw: str):
    """As the canvas's JSON.parse reads it: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} in a ui payload")
    return json.loads(raw, parse_constant=refuse)


def run(host, prompt) -> dict:
    entry = host.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    return entry


def refusal(host, prompt) -> dict:
    """POST the prompt; it must be refused at queue time (HTTP 400). Returns the answer."""
    request = urllib.request.Request(host.url + "/prompt", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    return json.loads(refused.value.read())


def loader_error(answer: dict) -> str:
    errors = answer["node_errors"][INDEX_NODE]["errors"]
    assert [e["type"] for e in errors] == ["custom_validation_failed"], errors
    details = errors[0]["details"]
    assert "LoadGuardIndex: input 'guard_name': " in details, details     # newer hosts put "guard_name - " first
    return details


def first_flagged(host, make, seeds):
    """The first seed whose generation the filter flags (the memorizer copies its photo for most)."""
    for seed in seeds:
        prompt = make(seed)
        entry = run(host, prompt)
        report = node_ui(entry, prompt, "MemorizationFilter")["text"][0]
        if "FLAGGED" in report:
            return prompt, entry, report
    pytest.fail(f"the memorizer never reproduced '{CAPTION}' in {len(seeds)} seeds: {report}")


def combo_options(object_info, class_type: str, name: str) -> list:
    """A combo's choices: [[...], {...}] (0.3.75) or ["COMBO", {"options": [...]}] (newer hosts)."""
    spec = object_info[class_type]["input"]["required"][name]
    return spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])


def test_the_guard_index_is_listed_and_its_shards_are_not_sets(object_info):
    options = combo_options(object_info, "LoadGuardIndex", "guard_name")
    assert GUARD_INDEX in options, options
    sets = combo_options(object_info, "LoadEmbeddingSet", "set_name")
    assert GUARDED in sets and not any(name.startswith(GUARD_INDEX + "/") for name in sets), sets
    assert "guard_index" in object_info["MemorizationFilter"]["input"]["optional"]
    assert "guarded_set" in object_info["MemorizationFilter"]["input"]["optional"]


@pytest.mark.parametrize("desired", [True, False], ids=["desired-prompt", "latent-nudge"])
def test_an_index_match_is_flagged_and_regenerated(host, guard_prompt, fresh_seed, desired):
    def make(seed):
        prompt = with_index(guard_prompt(CAPTION, seed))
        return prompt if desired else without_desired_prompt(prompt)

    prompt, entry, report = first_flagged(host, make, range(fresh_seed, fresh_seed + 5))
    assert f"guard index '{GUARD_INDEX}' ({GUARD_INDEX_ITEMS} items)" in report.splitlines()[0], report
    assert f"to 'photos/{NAME}.png'" in report, report           # item 100, named from items.txt
    verdicts = strict_json(node_ui(entry, prompt, "MemorizationFilter")["nudging_verdicts"][0])
    assert verdicts["images"][0]["flagged"] and verdicts["guard_index"]["items"] == GUARD_INDEX_ITEMS
    # The lazy branch ran on the index's match (in the latent nudge: its copy re-encoded by the VAE).
    assert "attempt" in node_ui(entry, prompt, "NudgeRegenerate")["text"][0]
    status = node_ui(entry, prompt, "ConditionalRegenerate")
    assert status["text"][0].startswith("image 0: ") and "passed" not in status["text"][0], status["text"][0]
    details = strict_json(status["nudging_status"][0])
    assert details["replaced"] == [0] and details["statuses"][0] in ("regenerated", "still flagged")
    images = saved_images(host, entry, prompt)
    assert len(images) == 1 and images[0].shape == PHOTO.shape


def test_set_and_index_together(host, guard_prompt, fresh_seed):
    prompt, entry, report = first_flagged(
        host, lambda seed: with_index(guard_prompt(CAPTION, seed), keep_set=True), range(fresh_seed, fresh_seed + 5))
    # The photo is in both (the set's item wins a tie; float rounding may put either one nearer).
    assert f"to '{NAME}'" in report or f"to 'photos/{NAME}.png'" in report, report
    assert f"guard index '{GUARD_INDEX}'" in report, report
    assert "passed" not in node_ui(entry, prompt, "ConditionalRegenerate")["text"][0]


def test_a_clean_caption_passes_without_running_the_branch(host, guard_prompt, fresh_seed):
    caption = memorizer_data.unseen_captions()[0]
    for seed in range(fresh_seed, fresh_seed + 5):
        prompt = with_index(guard_prompt(caption, seed))
        entry = run(host, prompt)
        report = node_ui(entry, prompt, "MemorizationFilter")["text"][0]
        if "passed" in report:
            break
    assert report.splitlines()[1] == "image 0: passed  no guarded item within 0.1", report
    verdicts = strict_json(node_ui(entry, prompt, "MemorizationFilter")["nudging_verdicts"][0])
    assert verdicts["images"][0]["at_least"] is True
    assert node_ui(entry, prompt, "ConditionalRegenerate")["text"][0] == "image 0: passed"
    strict_json(node_ui(entry, prompt, "ConditionalRegenerate")["nudging_status"][0])
    assert node_ui(entry, prompt, "NudgeRegenerate") is None          # the lazy branch never ran


def test_a_missing_index_is_refused_at_queue_time_with_the_fix(host, guard_prompt, fresh_seed):
    details = loader_error(refusal(host, with_index(guard_prompt(CAPTION, fresh_seed), f"missing_{fresh_seed}")))
    assert f"no guard index 'missing_{fresh_seed}'" in details and "python -m guard_build" in details, details
    assert host.get("/system_stats")["system"]


def test_a_folder_that_is_not_a_guard_index_is_refused(host, guard_prompt, fresh_seed):
    name = f"not_an_index_{fresh_seed}"
    os.makedirs(os.path.join(sets_dir(host), name))
    try:
        details = loader_error(refusal(host, with_index(guard_prompt(CAPTION, fresh_seed), name)))
        assert "is not a guard index" in details and "run it again, it resumes" in details, details
        details = loader_error(refusal(host, with_index(guard_prompt(CAPTION, fresh_seed), GUARDED)))
        assert "is a file, not a guard index folder" in details, details
    finally:
        shutil.rmtree(os.path.join(sets_dir(host), name))


def test_names_that_leave_the_folder_are_refused(host, guard_prompt, fresh_seed, tmp_path):
    """A link inside the folder to a real index outside it is refused like '..' and absolute paths."""
    outside = tmp_path / "outside_index"
    shutil.copytree(os.path.join(sets_dir(host), GUARD_INDEX), outside)
    link = os.path.join(sets_dir(host), f"linked_out_{fresh_seed}")
    os.symlink(outside, link)
    try:
        for name, why in ((os.path.basename(link), "points outside"), (f"../{GUARD_INDEX}", "no '..'"),
                          (str(outside), "no absolute path")):
            details = loader_error(refusal(host, with_index(guard_prompt(CAPTION, fresh_seed), name)))
            assert why in details, (name, details)
    finally:
        os.remove(link)


def test_a_damaged_shard_is_named_with_the_fix(host, guard_prompt, fresh_seed):
    name = f"damaged_{fresh_seed}"
    folder = os.path.join(sets_dir(host), name)
    shutil.copytree(os.path.join(sets_dir(host), GUARD_INDEX), folder)
    shard = os.path.join(folder, "shard_00001.safetensors")
    try:
        with open(shard, "r+b") as fh:
            fh.truncate(os.path.getsize(shard) - 1000)
        entry = host.run(with_index(guard_prompt(CAPTION, fresh_seed), name))
        error = execution_error(entry)
        assert error is not None and error["node_type"] == "LoadGuardIndex", error
        message = error["exception_message"]
        assert message.startswith("LoadGuardIndex: input 'guard_name': guard shard 'shard_00001.safetensors'"), message
        assert "rebuild the guard" in message and "Traceback" not in message, message
        assert host.get("/system_stats")["system"]
    finally:
        shutil.rmtree(folder)
