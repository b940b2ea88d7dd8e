"""Bad input: a clear error naming the node and the fix, the server still answering, nothing overwritten."""
import hashlib
import json
import os
import struct
import time
import urllib.error
import urllib.request
import uuid

import pytest
import torch
from conftest import GUARDED

from host.comfy_host import HostError, execution_error
from nudging_core import embedding_set as sets


def sets_dir(host):
    return os.path.join(host.home, "models", "embedding_sets")


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run_expecting_error(host, prompt) -> str:
    """The error text the user sees: a rejected prompt (400) or an execution error."""
    try:
        entry = host.run(prompt)
    except HostError as err:        # newer ComfyUI validates combo values before running
        message = str(err)
    else:
        error = execution_error(entry)
        assert error is not None, "the prompt was expected to fail"
        message = f"{error['node_type']}: {error['exception_message']}"
        assert "Traceback" not in error["exception_message"]
    assert host.get("/system_stats")["system"], "server stopped answering"
    return message


def with_set(set_name: str, seed: int, consumer: str = "LatentNudge") -> dict:
    """A small graph that loads `set_name` and hands it to LatentNudge or MemorizationFilter."""
    from conftest import memorizer_data
    res = memorizer_data.RESOLUTION
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": res, "height": res, "batch_size": 1}},
        "2": {"class_type": "LoadEmbeddingSet", "inputs": {"set_name": set_name}},
    }
    if consumer == "LatentNudge":
        prompt["3"] = {"class_type": "LatentNudge", "inputs": {
            "latent": ["1", 0], "undesired_set": ["2", 0], "alpha": 0.0, "beta": 1.0, "proximity": 0.1,
            "steps": 5, "learning_rate": 0.001 * (1 + seed % 997), "aggregate": "max"}}
        prompt["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}}
    else:
        from conftest import CHECKPOINT_NAME
        prompt["5"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}}
        prompt["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["5", 2]}}
        prompt["3"] = {"class_type": "MemorizationFilter", "inputs": {
            "images": ["6", 0], "guarded_set": ["2", 0], "threshold": 0.1 + (seed % 997) * 1e-6}}
        prompt["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["3", 4]}}
    return prompt


def write_bad(host, name, data: bytes):
    path = os.path.join(sets_dir(host), name)
    with open(path, "wb") as f:
        f.write(data)
    return path, digest(path)


def test_missing_set_file(host, fresh_seed):
    message = run_expecting_error(host, with_set("no_such_set.safetensors", seed=fresh_seed))
    assert "LoadEmbeddingSet" in message and "no_such_set" in message


def test_missing_set_is_rejected_at_queue_time_with_the_fix(host, fresh_seed):
    """LoadEmbeddingSet.validate_inputs replaces ComfyUI's bare "Value not in list": the prompt is
    refused (HTTP 400) before anything runs, with the node, the input and the fix in the error."""
    prompt = with_set(f"missing_{fresh_seed}.safetensors", seed=fresh_seed)
    request = urllib.request.Request(host.url + "/prompt", method="POST", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 400
    answer = json.loads(refused.value.read())
    errors = answer["node_errors"]["2"]["errors"]
    assert [e["type"] for e in errors] == ["custom_validation_failed"], errors
    details = errors[0]["details"]
    assert f"missing_{fresh_seed}" in details and "LoadEmbeddingSet" in details and "'set_name'" in details
    assert "build the set with SaveEmbeddingSet" in details, details
    assert host.get("/system_stats")["system"], "server stopped answering"


def test_truncated_set_file(host, fresh_seed):
    good = open(os.path.join(sets_dir(host), GUARDED), "rb").read()
    path, before = write_bad(host, "truncated.safetensors", good[: len(good) // 3])
    message = run_expecting_error(host, with_set("truncated.safetensors", seed=fresh_seed))
    assert "LoadEmbeddingSet" in message and "truncated" in message
    assert digest(path) == before


def test_not_a_safetensors_file(host, fresh_seed):
    path, before = write_bad(host, "pickled.safetensors", b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}q\x00.")
    message = run_expecting_error(host, with_set("pickled.safetensors", seed=fresh_seed))
    assert "LoadEmbeddingSet" in message and "safetensors" in message
    assert digest(path) == before


def test_hostile_header(host, fresh_seed):
    header = json.dumps({"__metadata__": {"format": sets.FORMAT_NAME, "format_version": "1"},
                         "latents": {"dtype": "F32", "shape": [2**20, 4, 64, 64], "data_offsets": [0, 2**40]}}).encode()
    path, before = write_bad(host, "hostile.safetensors", struct.pack("<Q", len(header)) + header + b"\0" * 16)
    message = run_expecting_error(host, with_set("hostile.safetensors", seed=fresh_seed))
    assert "LoadEmbeddingSet" in message and "outside the file" in message
    assert digest(path) == before


@pytest.mark.parametrize("name", ["../../user/comfyui.db", "/etc/passwd"])
def test_names_outside_the_set_folder(host, fresh_seed, name):
    message = run_expecting_error(host, with_set(name, seed=fresh_seed))
    assert "set_name" in message


def _variant_of_guarded(host, name, **changes):
    good = sets.load_set(os.path.join(sets_dir(host), GUARDED))
    for key, value in changes.items():
        setattr(good, key, value(good) if callable(value) else value)
    path = os.path.join(sets_dir(host), name)
    if os.path.exists(path):
        os.remove(path)
    sets.save_set(good, path)
    return path


def test_set_with_another_latent_size(host, fresh_seed):
    _variant_of_guarded(host, "wrong_size.safetensors",
                        latents=lambda s: torch.zeros(len(s), 4, s.latents.shape[2] * 2, s.latents.shape[3] * 2))
    message = run_expecting_error(host, with_set("wrong_size.safetensors", seed=fresh_seed))
    assert "LatentNudge" in message and "latent size" in message and "rebuild" in message


def test_set_with_another_channel_count(host, fresh_seed):
    _variant_of_guarded(host, "wrong_channels.safetensors",
                        latents=lambda s: torch.zeros(len(s), 16, s.latents.shape[2], s.latents.shape[3]))
    message = run_expecting_error(host, with_set("wrong_channels.safetensors", seed=fresh_seed))
    assert "LatentNudge" in message and "16-channel" in message and "VAE" in message


def test_empty_set(host, fresh_seed):
    empty = sets.EmbeddingSet(latents=torch.zeros(0, 4, 8, 8), names=[], pixels=torch.zeros(0, 64, 64, 3, dtype=torch.uint8))
    sets.save_set(empty, os.path.join(sets_dir(host), "empty.safetensors"))
    message = run_expecting_error(host, with_set("empty.safetensors", seed=fresh_seed))
    assert "LoadEmbeddingSet" in message and "no items" in message


def test_nan_in_a_latent(host, fresh_seed):
    _variant_of_guarded(host, "nan.safetensors", latents=lambda s: torch.full_like(s.latents, float("nan")))
    message = run_expecting_error(host, with_set("nan.safetensors", seed=fresh_seed))
    assert "LatentNudge" in message and "NaN" in message


def test_a_set_at_another_size_without_pixel_copies_names_the_fix(host, fresh_seed):
    """With the VAE connected, a set of another latent size is re-encoded from its pixel copies
    (test_guards_at_other_sizes); a set without copies cannot be, and the message says how to fix it."""
    from conftest import CHECKPOINT_NAME
    _variant_of_guarded(host, "no_pixels_other_size.safetensors", pixels=None,
                        latents=lambda s: torch.zeros(len(s), 4, s.latents.shape[2] * 2, s.latents.shape[3] * 2))
    prompt = with_set("no_pixels_other_size.safetensors", seed=fresh_seed)
    prompt["5"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}}
    prompt["3"]["inputs"]["vae"] = ["5", 2]
    message = run_expecting_error(host, prompt)
    assert "LatentNudge" in message and "'undesired_set'" in message and "store_pixels" in message, message


def test_interrupting_a_latent_nudge_run(host, fresh_seed):
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "LoadEmbeddingSet", "inputs": {"set_name": GUARDED}},
        "3": {"class_type": "LatentNudge", "inputs": {
            "latent": ["1", 0], "undesired_set": ["2", 0], "alpha": 0.0, "beta": 1.0, "proximity": 0.0,
            "steps": 100_000, "learning_rate": 1e-6 * (1 + fresh_seed % 1000), "aggregate": "max"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 1]}},
    }
    prompt_id = host.queue(prompt)
    deadline = time.time() + 60
    while time.time() < deadline and not host.get("/queue")["queue_running"]:
        time.sleep(0.1)
    time.sleep(2.0)                      # well inside the 100,000-step loop
    started = time.time()
    host.interrupt()
    entry = host.wait(prompt_id, timeout=60)
    assert time.time() - started < 10, "the nudge did not stop promptly"
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds
    assert host.get("/system_stats")["system"]
