"""MemorizationGuardGuider with the stock SamplerCustomAdvanced, through the real server: the same
graph with ComfyUI's own CFGGuider reproduces a training photo; with the guard's guider the one
pass ends away from it, and MemorizationFilter says so."""
import os

from conftest import GUARDED
from memorizer import data as memorizer_data

from host.comfy_host import execution_error
from host.comfy_host import node_ui as node_output


def custom_sampler_prompt(checkpoint: str, caption: str, seed: int, guarded: bool) -> dict:
    settings = memorizer_data.SAMPLER_SETTINGS
    size = memorizer_data.RESOLUTION
    guider = {"class_type": "MemorizationGuardGuider",
              "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "cfg": settings["cfg"],
                         "guarded_set": ["2", 0], "cos_threshold": 0.9, "start_percent": 0.0, "end_percent": 1.0,
                         "pixel_checks": 4, "copy_threshold": 0.1, "vae": ["1", 2]}} if guarded else \
        {"class_type": "CFGGuider",
         "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "cfg": settings["cfg"]}}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": os.path.basename(checkpoint)}},
        "2": {"class_type": "LoadEmbeddingSet", "inputs": {"set_name": GUARDED}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": caption, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": guider,
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": settings["sampler_name"]}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": settings["scheduler"],
                                                          "steps": settings["steps"], "denoise": 1.0}},
        "9": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["9", 0], "guider": ["6", 0],
                                                                 "sampler": ["7", 0], "sigmas": ["8", 0],
                                                                 "latent_image": ["5", 0]}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "MemorizationFilter", "inputs": {"images": ["11", 0], "guarded_set": ["2", 0],
                                                              "threshold": 0.1}},
    }


def filter_report(host, prompt: dict) -> str:
    entry = host.run(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    return node_output(entry, prompt, "MemorizationFilter")["text"][0]


def test_guard_guider_steers_samplercustomadvanced_off_a_copy(host, checkpoint, fresh_seed):
    name, caption, _ = memorizer_data.training_items()[1]
    plain = filter_report(host, custom_sampler_prompt(checkpoint, caption, fresh_seed, guarded=False))
    # The memorizer reproduces its photo for every training-caption seed (test_memorizer, make bench).
    assert plain.splitlines()[-1] == "1 of 1 flagged" and f"'{name}'" in plain, plain
    guarded = filter_report(host, custom_sampler_prompt(checkpoint, caption, fresh_seed, guarded=True))
    assert guarded.splitlines()[-1] == "0 of 1 flagged", guarded
