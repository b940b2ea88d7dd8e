"""Hostile API prompts through the real server (issue #14: reliability under hostile input).

For every node of the pack a small valid graph is built, and one input at a time is replaced by a
hostile value, chosen from the input's type and limits in /object_info, deterministically
(NUDGE_HOSTILE_SEED, default 14): wrong types (strings, lists, dicts, null where a number or a
link belongs), NaN and +-inf (Python's json writes them and ComfyUI's reads them), huge and
negative numbers, combo values that are not options, links to missing nodes, to missing outputs
and to outputs of another type, set and guard index names with '..', absolute paths, symlinks that
leave the set folder, NUL bytes, lone surrogates and 100,000-character strings, SaveEmbeddingSet names that try
to leave the folder or overwrite a set; and upstream changes the nodes must survive (batches of
100,000 and 4096, 16384-pixel and 5-D video latents, 16-channel latents, RGBA and 4-pixel images).

Every prompt must be refused at queue time (HTTP 400, ComfyUI's validation or ours; or HTTP 200 with
node_errors, when ComfyUI drops the attacked branch and runs another output of the graph alone) or
fail with an execution error whose message starts with a pack node's ID ("<NodeID>: input '<name>': ...");
a raw exception from inside the pack (a torch or safetensors message, a TypeError) fails the test,
and so does a hostile value that should have been refused but ran. After every batch the server
must still answer, and at the end no file may have been written outside the home's output/ and
models/embedding_sets/ (ComfyUI's own temp/, user/ and log aside), no set in the folder may have
changed, and a set planted outside the home (reachable through symlinks) must be untouched.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import stat
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

import pytest
from conftest import CHECKPOINT_NAME, GUARD_INDEX, GUARDED
from memorizer import data as memorizer_data

from host.comfy_host import COMFY_DIR, PACK_NAME, REPO

SEED = int(os.environ.get("NUDGE_HOSTILE_SEED", "14"))
TOKEN = f"hostile{SEED}x"          # in every name a save could write: an escaped file is found by it
RES = memorizer_data.RESOLUTION    # 64: the memorizer is tiny, so a real run costs well under a second
NAN, INF = float("nan"), float("inf")
LONG = "x" * 100_000
# Inputs whose value sets the work done: hostile values that must run are kept below these.
COST_CAPS = {"steps": 3, "nudge_steps": 3, "max_attempts": 2, "pixel_checks": 2, "batch_size": 2}
# ComfyUI's own state in the home: its database and settings, previews, its log.
COMFY_STATE = ("temp", "user", "server.log")
WRITABLE = ("output", os.path.join("models", "embedding_sets"))


@dataclass
class Case:
    node: str                 # the pack node under attack
    label: str                # what was changed, for the report
    prompt: dict
    reject: bool              # True: running to success is a failure (the value must be refused)
    check: object = None      # optional callable(entry) -> error text or None, for successes
    outcome: str = ""
    detail: str = ""
    prompt_id: str | None = None
    refused_in_part: bool = False   # accepted with node_errors: ComfyUI runs only the outputs that validated


@dataclass
class Tally:
    prompts: int = 0
    rejected_400: int = 0
    execution_errors: int = 0
    successes: int = 0
    raw: list = field(default_factory=list)         # raw exceptions from the pack
    accepted: list = field(default_factory=list)    # hostile values that should have been refused
    core_errors: int = 0                            # errors of ComfyUI's own nodes (not the pack's)
    refused_in_part: int = 0
    per_node: dict = field(default_factory=dict)
    cases: list = field(default_factory=list)
    summary: str = ""


# --- the valid graphs hostile values are put into --------------------------------------------

def _upstream() -> dict:
    caption = memorizer_data.training_items()[0][1]
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {"class_type": "LoadEmbeddingSet", "inputs": {"set_name": GUARDED}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": caption, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": RES, "height": RES, "batch_size": 1}},
        "9": {"class_type": "CLIPTextEncode",
              "inputs": {"text": memorizer_data.desired_caption(caption), "clip": ["1", 1]}},
    }


def _sampled(prompt: dict) -> None:
    """Nodes 6-8: a 3-step generation of the training caption, decoded, and a filter that flags
    everything (threshold 1.0), so the regenerate branch always has work."""
    prompt["6"] = {"class_type": "KSampler", "inputs": {
        "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": SEED,
        "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    prompt["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
    prompt["8"] = {"class_type": "MemorizationFilter", "inputs": {"images": ["7", 0], "guarded_set": ["2", 0],
                                                                  "threshold": 1.0}}


def base_graph(node: str) -> dict:
    """A small valid graph around `node` (always node "10"), with one output node."""
    p = _upstream()
    guard = {"guarded_set": ["2", 0], "cos_threshold": 0.9, "start_percent": 0.0, "end_percent": 1.0,
             "pixel_checks": 1, "copy_threshold": 0.1, "vae": ["1", 2], "desired_positive": ["9", 0],
             "desired_strength": 0.75}
    if node == "LoadEmbeddingSet":
        p = {"10": {"class_type": node, "inputs": {"set_name": GUARDED}},
             "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}}
    elif node == "LoadGuardIndex":
        p = {"10": {"class_type": node, "inputs": {"guard_name": GUARD_INDEX}},
             "11": {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}}
    elif node == "BuildEmbeddingSet":
        p["12"] = {"class_type": "EmptyImage", "inputs": {"width": RES, "height": RES, "batch_size": 2, "color": 4242}}
        p["10"] = {"class_type": node, "inputs": {"images": ["12", 0], "vae": ["1", 2], "store_pixels": True,
                                                  "item_names": "first,second"}}
        p["11"] = {"class_type": "MemorizationFilter", "inputs": {"images": ["12", 0], "guarded_set": ["10", 0],
                                                                  "threshold": 0.1}}
    elif node == "SaveEmbeddingSet":
        p = {"2": p["2"], "10": {"class_type": node, "inputs": {"embedding_set": ["2", 0], "set_name": f"{TOKEN}_ok"}}}
    elif node == "MemorizationFilter":
        p["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
        p["10"] = {"class_type": node, "inputs": {"images": ["7", 0], "guarded_set": ["2", 0], "threshold": 0.1,
                                                  "clip_threshold": 0.95}}
    elif node == "LatentNudge":
        p["10"] = {"class_type": node, "inputs": {
            "latent": ["5", 0], "undesired_set": ["2", 0], "desired_set": ["2", 0], "alpha": 0.5, "beta": 1.0,
            "proximity": 0.1, "steps": 3, "learning_rate": 0.05, "aggregate": "max"}}
        p["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}
    elif node == "ConditionalRegenerate":
        p["7"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}}
        p["8"] = {"class_type": "MemorizationFilter", "inputs": {"images": ["7", 0], "guarded_set": ["2", 0],
                                                                 "threshold": 1.0}}
        p["12"] = {"class_type": "EmptyImage", "inputs": {"width": RES, "height": RES, "batch_size": 1, "color": 0}}
        p["10"] = {"class_type": node, "inputs": {"verdicts": ["8", 0], "images": ["7", 0], "regenerated": ["12", 0],
                                                  "still_flagged_action": "report"}}
        p["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 1]}}
    elif node == "NudgeRegenerate":
        _sampled(p)
        p["10"] = {"class_type": node, "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "vae": ["1", 2], "latent": ["6", 0],
            "verdicts": ["8", 0], "seed": SEED, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 0.5, "beta": 1.0, "proximity": 1.0, "nudge_steps": 2,
            "learning_rate": 0.05, "max_attempts": 1, "growth": 2.0, "denoise_decay": 0.8,
            "desired_positive": ["9", 0], "desired_strength": 0.75, "desired_denoise": 1.0, "escape_margin": 1.5}}
        p["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 2]}}
    elif node == "MemorizationGuardModel":
        p["10"] = {"class_type": node, "inputs": dict(guard, model=["1", 0])}
        p["6"] = {"class_type": "KSampler", "inputs": {
            "model": ["10", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": SEED,
            "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
        p["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["6", 0]}}
    elif node == "MemorizationGuardGuider":
        p["10"] = {"class_type": node, "inputs": dict(guard, model=["1", 0], positive=["3", 0], negative=["4", 0],
                                                      cfg=5.0)}
        p["13"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        p["14"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2,
                                                              "denoise": 1.0}}
        p["15"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}}
        p["16"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["15", 0], "guider": ["10", 0], "sampler": ["13", 0], "sigmas": ["14", 0],
            "latent_image": ["5", 0]}}
        p["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["16", 0]}}
    else:
        raise KeyError(f"no base graph for {node}: add one when the pack gains a node")
    return p


def with_input(prompt: dict, node_id: str, name: str, value) -> dict:
    p = copy.deepcopy(prompt)
    if value is _MISSING:
        p[node_id]["inputs"].pop(name, None)
    else:
        p[node_id]["inputs"][name] = value
    return p


_MISSING = object()


def graft(prompt: dict, nodes: dict) -> dict:
    """A copy of the prompt with some nodes added or replaced."""
    p = copy.deepcopy(prompt)
    p.update(copy.deepcopy(nodes))
    return p


# --- hostile values by input type -------------------------------------------------------------

def _float_values(lo, hi, rng):
    """(value, must_be_refused) for a FLOAT input with limits lo..hi."""
    mid = (lo + hi) / 2 if lo is not None and hi is not None else 0.5
    bad = ["abc", "", [1, 2, 3], [], {"a": 1}, None, NAN, "nan", INF, -INF, "-inf", 1e308, -1e308, 10**400,
           {"__value__": NAN}, {"__value__": "x"}, "\ud800", LONG]
    if lo is not None:
        bad += [lo - 1, lo - rng.uniform(1, 1e9)]
    if hi is not None:
        bad += [hi + 1e-3 * max(1.0, abs(hi)), hi + rng.uniform(1, 1e9)]
    ok = [str(mid), {"__value__": mid}, lo if lo is not None else -1.0, hi if hi is not None else 1.0, True]
    if lo is not None and lo <= 5e-324 <= (hi if hi is not None else 1):
        ok.append(5e-324)
    return [(v, True) for v in bad] + [(v, False) for v in ok]


def _int_values(lo, hi, cap, rng):
    top = hi if cap is None else min(hi if hi is not None else cap, cap)
    bad = ["abc", "1e3", "", NAN, INF, -INF, None, [1, 2, 3], {"a": 1}, 10**30, -(2**63) - 1, 2**64 + 1,
           {"__value__": "x"}, "\ud800"]
    if lo is not None:
        bad += [lo - 1, lo - rng.randint(1, 2**40)]
    if hi is not None:
        bad += [hi + 1, hi + rng.randint(1, 2**40)]
    ok = [lo if lo is not None else 0, top, str(top), {"__value__": top}]
    if lo is not None and lo <= 1 <= top:
        ok += [1.5, True]
    return [(v, True) for v in bad] + [(v, False) for v in ok]


def _combo_values(options, rng):
    first = options[0]
    bad = ["bogus", "", 5, None, [1, 2, 3], {"a": 1}, LONG, first + "\0", " " + first, "\ud800",
           "".join(rng.choice("abc\u00e9\u4e00\U0001f642/.\\") for _ in range(12))]
    if first.upper() != first:
        bad.append(first.upper())
    return [(v, True) for v in bad] + [(first, False), (options[-1], False), ({"__value__": first}, False)]


def _bool_values():
    # ComfyUI turns anything into a BOOLEAN with bool(): only a list that is not a link is refused.
    return [([1, 2, 3], True), ("false", False), (0, False), (None, False), ({"a": 1}, False), (LONG, False)]


def _socket_values(kind: str, prompt: dict, required: bool):
    """Literals and broken links where a link of type `kind` belongs."""
    wrong = ["2", 1]     # LoadEmbeddingSet's count: an INT
    values = [(5, True), ("x", True), (None, required), ({"samples": 1}, True), ({"__value__": 5}, True),
              ([], True), ([1, 2, 3], True), (["999", 0], True), (["2", 99], True), (["2", "0"], True),
              (wrong, True), (_MISSING, required)]
    if "1" in prompt and kind == "VAE":
        values.append((["1", -1], False))   # a negative slot: Python indexing makes it the VAE output
    return values


def _string_values(node: str, name: str, rng):
    if node == "BuildEmbeddingSet" and name == "item_names":
        return [(LONG, True), ("a,b,c", True), ("\ud800,b", True), (None, True), (5, True), ({"a": 1}, True),
                ([1, 2, 3], True), ("a\0,b\0", False), ("\U0001f642,\u540d\u524d", False), (",,,,", False),
                ("\n" * 50_000, False), ("x" * 5000 + ",y", False)]
    if node == "SaveEmbeddingSet" and name == "set_name":
        return save_names(rng)
    return [(LONG, False), ("\0", False), ([1, 2, 3], True)]


def save_names(rng) -> list:
    """Names that try to leave the set folder or overwrite a set; (name, must_be_refused).
    The ones that may run must save a new file inside the folder (checked on disk afterwards)."""
    t = TOKEN
    outside = _PLANTED["outside"]
    refused = [f"../{t}", f"../../{t}", f"../../../tmp/{t}", f"{outside}/{t}", f"/{t}", f"//{t}",
               f"\\..\\{t}", f"a/../../{t}", f"sub/../{t}", f"outside_dir/{t}", "outside_link", "dangling",
               LONG, "y" * 250, "a/" * 3000 + t, "\0", f"{t}\0", f"\ud800{t}", " ", "", "/",
               [1, 2, 3], f"..\\..\\{t}", f"./../{t}", f"{t}/../../{t}"]
    allowed = [GUARDED[: -len(".safetensors")], GUARDED, f"\u540d\u524d\U0001f642_{t}", f"sub/dir/{t}", f"{t}/",
               f"~/{t}", f"$HOME/{t}", f"-rf {t}", f"CON_{t}", f"a\nb{t}", "fifo", "dir", None, 5, {"a": 1},
               "loop",   # a link loop is a taken name: saved as loop_001, the link untouched
               f"{t}.safetensors.safetensors", f"./{t}_dot", f"  {t}_spaced  ",
               ".", "..", f"{t}/..",     # "..safetensors", "...safetensors", "<t>/...safetensors": inside
               "".join(rng.choice("abc\u00e9\u4e00-_ ") for _ in range(20)) + t]
    return [(n, True) for n in refused] + [(n, False) for n in allowed]


def load_names() -> list:
    outside = _PLANTED["outside"]
    sets = _PLANTED["sets"]
    refused = [f"../{GUARDED}", f"../../models/embedding_sets/{GUARDED}", os.path.join(sets, GUARDED),
               os.path.join(outside, "victim.safetensors"), "outside_link.safetensors",
               "outside_dir/victim.safetensors", "dangling.safetensors", "loop.safetensors", f"sub/../{GUARDED}",
               GUARDED + "\0", "\0", "", " ", LONG, "x" * 255 + ".safetensors", "\ud800.safetensors",
               "\u540d\u524d\U0001f642.safetensors", GUARDED.upper(), "//etc/passwd", "\\..\\..\\etc\\passwd",
               "file:///etc/passwd", f"~/{GUARDED}", "$HOME", ".", "..", "/", "/dev/zero", "/proc/self/environ",
               "fifo.safetensors", "dir.safetensors", None, 5, [1, 2, 3], {"a": 1}, [], ["999", 0]]
    allowed = [GUARDED, f"./{GUARDED}", {"__value__": GUARDED}]
    return [(n, True) for n in refused] + [(n, False) for n in allowed]


def guard_names() -> list:
    """Guard index names: the set names' escapes, plus a link to a real index outside the folder,
    a set file, an index's own files and a folder that holds no guard.json."""
    outside = _PLANTED["outside"]
    sets = _PLANTED["sets"]
    refused = [f"../{GUARD_INDEX}", f"../../models/embedding_sets/{GUARD_INDEX}", os.path.join(sets, GUARD_INDEX),
               os.path.join(outside, "guard"), "outside_guard", "outside_dir/guard", "outside_dir",
               "dangling.safetensors", "loop.safetensors", f"sub/../{GUARD_INDEX}", f"{GUARD_INDEX}/..",
               GUARD_INDEX + "\0", "\0", "", " ", LONG, "x" * 255, "\ud800", GUARD_INDEX.upper(), "//etc",
               "\\..\\..\\etc", "file:///etc", f"~/{GUARD_INDEX}", "$HOME", ".", "..", "/", "/dev/zero", "/proc/self",
               "fifo.safetensors", "dir.safetensors", GUARDED, f"{GUARD_INDEX}/guard.json",
               f"{GUARD_INDEX}/shard_00000.safetensors", None, 5, [1, 2, 3], {"a": 1}, [], ["999", 0]]
    allowed = [GUARD_INDEX, f"./{GUARD_INDEX}", f"{GUARD_INDEX}/", {"__value__": GUARD_INDEX}]
    return [(n, True) for n in refused] + [(n, False) for n in allowed]


# --- the cases -------------------------------------------------------------------------------

def input_specs(object_info: dict, node: str):
    info = object_info[node]["input"]
    for group in ("required", "optional"):
        for name, spec in info.get(group, {}).items():
            kind = spec[0]
            extra = spec[1] if len(spec) > 1 else {}
            if isinstance(kind, list):
                kind, extra = "COMBO", dict(extra, options=kind)
            yield name, kind, extra, group == "required"


def cases_for(node: str, object_info: dict, rng: random.Random) -> list[Case]:
    base = base_graph(node)
    cases = []
    for name, kind, extra, required in input_specs(object_info, node):
        if node == "LoadEmbeddingSet" and name == "set_name":
            values = load_names()
        elif node == "LoadGuardIndex" and name == "guard_name":
            values = guard_names()
        elif kind == "FLOAT":
            values = _float_values(extra.get("min"), extra.get("max"), rng)
        elif kind == "INT":
            values = _int_values(extra.get("min"), extra.get("max"), COST_CAPS.get(name), rng)
        elif kind == "COMBO":
            values = _combo_values(extra.get("options") or [], rng)
        elif kind == "BOOLEAN":
            values = _bool_values()
        elif kind == "STRING":
            values = _string_values(node, name, rng)
        else:
            values = _socket_values(kind, base, required)
        for value, refuse in values:
            shown = "<missing>" if value is _MISSING else repr(value)
            label = f"{node}.{name}={shown[:60]}{'...' if len(shown) > 60 else ''}"
            check = _status_never_passed if node == "ConditionalRegenerate" else None
            cases.append(Case(node, label, with_input(base, "10", name, value), refuse, check))
    return cases + upstream_cases(node, base, object_info)


def upstream_cases(node: str, base: dict, object_info: dict) -> list[Case]:
    """What the graph around the node can feed it: enormous batches, huge and odd sizes, other latent
    layouts, RGBA and tiny images, mismatched batches, an empty matched set."""
    out = []

    def add(label, prompt, refuse, check=None):
        out.append(Case(node, f"{node} <- {label}", prompt, refuse, check))

    def latent_source(**inputs):
        return graft(base, {"5": {"class_type": "EmptyLatentImage", "inputs": dict(
            {"width": RES, "height": RES, "batch_size": 1}, **inputs)}})

    if "5" in base and node not in ("SaveEmbeddingSet", "BuildEmbeddingSet"):    # where node 5 feeds the node
        add("EmptyLatentImage batch 100000", latent_source(batch_size=100_000), True)
        add("EmptyLatentImage batch -1", latent_source(batch_size=-1), True)
        add("EmptyLatentImage width NaN", latent_source(width=NAN), True)
    if node == "LatentNudge":
        add("EmptyLatentImage batch 4096 (4 MB)", latent_source(batch_size=4096), False)
        add("EmptyLatentImage 16384x16384 (64 MB latent)", latent_source(width=16384, height=16384), True)
        add("EmptyLatentImage 72x72 (another size)", latent_source(width=72, height=72), True)
        add("EmptyLatentImage 16x16, vae connected (re-encoded)",
            with_input(latent_source(width=16, height=16), "10", "vae", ["1", 2]), False)
        for cls, inputs in (("EmptySD3LatentImage", {"width": RES, "height": RES, "batch_size": 1}),
                            ("EmptyHunyuanLatentVideo", {"width": RES, "height": RES, "length": 5, "batch_size": 1})):
            if cls in object_info:
                add(f"{cls} (16 channels / 5-D)", graft(base, {"5": {"class_type": cls, "inputs": inputs}}), True)
        add("latent linked to itself", with_input(base, "10", "latent", ["10", 0]), True)
    if node == "MemorizationFilter":
        for w, h, batch, refuse in ((1, 1, 1, True), (3, 64, 1, True), (16, 16, 1, False), (RES, RES, 4096, False)):
            add(f"EmptyImage {w}x{h} batch {batch}", graft(base, {"7": {"class_type": "EmptyImage", "inputs": {
                "width": w, "height": h, "batch_size": batch, "color": 1}}}), refuse)
        rgba = graft(base, {
            "20": {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": RES, "height": RES}},
            "21": {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["7", 0], "alpha": ["20", 0]}}})
        add("RGBA images", with_input(rgba, "10", "images", ["21", 0]), False)
        # The guard index path (not in the base graph: a 4096-image batch searched one image at a time
        # would dominate the run).
        indexed = graft(base, {"22": {"class_type": "LoadGuardIndex", "inputs": {"guard_name": GUARD_INDEX}}})
        indexed = with_input(indexed, "10", "guard_index", ["22", 0])
        index_only = with_input(indexed, "10", "guarded_set", _MISSING)
        add("guard index and set", indexed, False)
        add("guard index alone", index_only, False)
        add("guard index alone, threshold 0", with_input(index_only, "10", "threshold", 0.0), False)
        add("guard index alone, threshold 1 (everything flagged)", with_input(index_only, "10", "threshold", 1.0),
            False)
        add("neither a set nor a guard index", with_input(base, "10", "guarded_set", _MISSING), True)
        add("guard index, images 16x16 (under its 64x64)", graft(index_only, {"7": {"class_type": "EmptyImage",
            "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 1}}}), True)
        add("guard index, RGBA images", with_input(graft(index_only, {
            "20": rgba["20"], "21": rgba["21"]}), "10", "images", ["21", 0]), False)
        add("guard index, EmptyImage 96x64 batch 8", graft(index_only, {"7": {"class_type": "EmptyImage",
            "inputs": {"width": 96, "height": 64, "batch_size": 8, "color": 7}}}), False)
    if node == "BuildEmbeddingSet":
        for w, h, refuse in ((4, RES, True), (1, 1, True), (7, 7, True), (8, 8, False)):
            add(f"EmptyImage {w}x{h}", graft(base, {"12": {"class_type": "EmptyImage", "inputs": {
                "width": w, "height": h, "batch_size": 2, "color": 1}}}), refuse)
        add("EmptyImage batch 100000", with_input(base, "12", "batch_size", 100_000), True)
        saved = graft(base, {"11": {"class_type": "SaveEmbeddingSet", "inputs": {"embedding_set": ["10", 0],
                                                                                 "set_name": f"{TOKEN}_built"}}})
        add("item names with NUL, saved", with_input(saved, "10", "item_names", "a\0,b\0"), False)
        add("item names with a lone surrogate, saved", with_input(saved, "10", "item_names", "\ud800,b"), True)
    if node == "SaveEmbeddingSet":
        empty = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
                 "2": base["2"],
                 "5": {"class_type": "EmptyLatentImage", "inputs": {"width": RES, "height": RES, "batch_size": 1}},
                 "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
                 "8": {"class_type": "MemorizationFilter", "inputs": {"images": ["7", 0], "guarded_set": ["2", 0],
                                                                      "threshold": 0.0}},
                 "10": {"class_type": node, "inputs": {"embedding_set": ["8", 3], "set_name": f"{TOKEN}_empty"}}}
        add("an empty matched set (nothing flagged)", empty, True)
        from_index = copy.deepcopy(empty)
        from_index["22"] = {"class_type": "LoadGuardIndex", "inputs": {"guard_name": GUARD_INDEX}}
        from_index["8"]["inputs"] = {"images": ["7", 0], "guard_index": ["22", 0], "threshold": 1.0}
        from_index["10"]["inputs"]["set_name"] = f"{TOKEN}_from_index"
        add("a matched set from a guard index (no latents)", from_index, True)
    if node == "ConditionalRegenerate":
        add("regenerated 32x32", graft(base, {"12": {"class_type": "EmptyImage", "inputs": {
            "width": 32, "height": 32, "batch_size": 1, "color": 0}}}), True)
        add("regenerated batch 3 for 1 image", with_input(base, "12", "batch_size", 3), True)
        add("regenerated = the flagged image itself", with_input(base, "10", "regenerated", ["7", 0]), False,
            _status_never_passed)
        add("images batch 2, verdicts for 1", with_input(graft(base, {"13": {
            "class_type": "RepeatImageBatch", "inputs": {"image": ["7", 0], "amount": 2}}}), "10", "images", ["13", 0]),
            True)
        add("EmptyImage batch 4096, nothing flagged", with_input(graft(base, {"7": {"class_type": "EmptyImage",
            "inputs": {"width": RES, "height": RES, "batch_size": 4096, "color": 3}}}), "8", "threshold", 0.0), False)
    if node == "NudgeRegenerate":
        add("nothing flagged (threshold 0)", with_input(base, "8", "threshold", 0.0), True)
        add("latent batch 2 for verdicts of 1", with_input(graft(base, {"17": {
            "class_type": "RepeatLatentBatch", "inputs": {"samples": ["6", 0], "amount": 2}}}), "10", "latent",
            ["17", 0]), True)
        no_desired = copy.deepcopy(base)
        for key in ("desired_positive", "desired_strength", "desired_denoise"):
            no_desired["10"]["inputs"].pop(key)
        add("latent fallback, seed 2**64-1, 2 attempts", with_input(with_input(
            no_desired, "10", "seed", 2**64 - 1), "10", "max_attempts", 2), False)
        add("desired prompt, seed 2**64-1, 2 attempts", with_input(with_input(
            base, "10", "seed", 2**64 - 1), "10", "max_attempts", 2), False)
    if node in ("MemorizationGuardModel", "MemorizationGuardGuider"):
        no_vae = with_input(base, "10", "vae", _MISSING)
        add("EmptyLatentImage 128x128 without vae (another size)", graft(no_vae, {"5": {
            "class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}}}), True)
        add("EmptyLatentImage batch 2", with_input(base, "5", "batch_size", 2), False)
    return out


def _status_never_passed(entry: dict) -> str | None:
    """Fail-closed: the filter flagged the image (threshold 1.0), so it must never be 'passed'."""
    texts = [t for out in entry.get("outputs", {}).values() for t in out.get("text", [])]
    status = [t for t in texts if t.startswith("image 0:")]
    if not status or "passed" in status[0] or "still flagged" not in status[0]:
        return f"ConditionalRegenerate status {status!r}: a flagged image must stay 'still flagged'"
    return None


def all_cases(object_info: dict) -> list[Case]:
    rng = random.Random(SEED)
    ours = sorted(n for n, info in object_info.items()
                  if info.get("python_module", "").split(".")[:2] == ["custom_nodes", PACK_NAME])
    assert len(ours) >= 9, ours
    return [case for node in ours for case in cases_for(node, object_info, rng)]


# --- the test home: planted symlinks, a set outside, snapshots -------------------------------

_PLANTED: dict = {}


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def snapshot(root: str, skip: tuple[str, ...] = ()) -> dict:
    """Every entry under root (symlinks not followed): kind, and content hash or link target."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if os.path.normpath(os.path.join(rel_dir, d)) not in skip]
        for name in dirnames + filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in skip:
                continue
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                tree[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                tree[rel] = ("file", st.st_size, digest(path) if st.st_size < 64 << 20 else st.st_mtime_ns)
            elif stat.S_ISDIR(st.st_mode):
                tree[rel] = ("dir",)
            else:
                tree[rel] = ("other", stat.S_IFMT(st.st_mode))
    return tree


@contextlib.contextmanager
def plant(host, outside: str):
    """A valid set outside the home, reachable from models/embedding_sets through a file symlink and a
    folder symlink; a dangling link, a link loop, a FIFO and a folder named like set files. On the
    way out, everything planted or saved in the set folder is removed again (the session's later
    test modules expect the folder as the session built it)."""
    sets = os.path.join(host.home, "models", "embedding_sets")
    with open(os.path.join(sets, GUARDED), "rb") as src, open(os.path.join(outside, "victim.safetensors"), "wb") as dst:
        dst.write(src.read())
    before = snapshot(sets)
    shutil.copytree(os.path.join(sets, GUARD_INDEX), os.path.join(outside, "guard"))   # a real index outside
    for name, target in (("outside_link.safetensors", os.path.join(outside, "victim.safetensors")),
                         ("outside_dir", outside), ("dangling.safetensors", os.path.join(outside, "gone.safetensors")),
                         ("loop.safetensors", "loop.safetensors"), ("outside_guard", os.path.join(outside, "guard"))):
        os.symlink(target, os.path.join(sets, name))
    os.mkfifo(os.path.join(sets, "fifo.safetensors"))
    os.mkdir(os.path.join(sets, "dir.safetensors"))
    _PLANTED.update(outside=outside, sets=sets)
    try:
        yield _PLANTED
    finally:
        _PLANTED.clear()
        for rel in sorted(set(snapshot(sets)) - set(before), key=lambda r: -r.count(os.sep)):
            path = os.path.join(sets, rel)
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.remove(path)


@pytest.fixture(scope="module")
def planted(host, tmp_path_factory):
    with plant(host, str(tmp_path_factory.mktemp("outside-the-home"))) as places:
        yield places


# --- talking to the server -------------------------------------------------------------------

def post(host, prompt: dict) -> tuple[int, dict]:
    body = json.dumps({"prompt": prompt, "client_id": uuid.uuid4().hex}).encode()   # NaN/Infinity as Python writes them
    request = urllib.request.Request(host.url + "/prompt", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"raw": raw.decode(errors="replace")[:2000]}


def ours_in(frames) -> bool:
    return any(f"{PACK_NAME}/" in frame or f"{PACK_NAME}\\" in frame for frame in frames or [])


def judge_400(case: Case, answer: dict, tally: Tally) -> None:
    """A refusal at queue time is fine unless it is an exception raised inside the pack's own code."""
    tally.rejected_400 += 1
    case.outcome = "refused"
    for node_id, errors in answer.get("node_errors", {}).items():
        for error in errors.get("errors", []):
            extra = error.get("extra_info", {})
            if error.get("type", "").startswith("exception_during") and ours_in(extra.get("traceback")):
                tally.raw.append(f"{case.label}: exception in the pack at validation: {error.get('details')}")
    top = answer.get("error", {})
    if isinstance(top, dict) and ours_in(top.get("extra_info", {}).get("traceback")):
        tally.raw.append(f"{case.label}: exception in the pack at validation: {top.get('details')}")


def judge_entry(case: Case, entry: dict, ours: list[str], tally: Tally) -> None:
    messages = entry.get("status", {}).get("messages", [])
    kinds = [kind for kind, _ in messages]
    error = next((data for kind, data in messages if kind == "execution_error"), None)
    if error is not None:
        message = error.get("exception_message", "")
        if not case.refused_in_part:
            tally.execution_errors += 1
            case.outcome, case.detail = "error", message[:200]
        named = any(message.startswith(f"{node}: ") for node in ours)
        if named:
            return
        if error.get("node_type") in ours or ours_in(error.get("traceback")):
            tally.raw.append(f"{case.label}: raw {error.get('exception_type')} in {error.get('node_type')}: "
                             f"{message[:300]!r}")
        else:
            tally.core_errors += 1      # a core node refused a hostile value given to it (not the pack's code)
        return
    if "execution_interrupted" in kinds or not entry.get("status", {}).get("completed"):
        tally.raw.append(f"{case.label}: ended without success or error: {kinds}")
        return
    if case.refused_in_part:
        return
    tally.successes += 1
    case.outcome = "success"
    if case.reject:
        tally.accepted.append(f"{case.label}: ran to success, must be refused")
    elif case.check is not None:
        problem = case.check(entry)
        if problem:
            tally.accepted.append(f"{case.label}: {problem}")


def wait_for_queue(host, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = host.get("/queue")
        if not queue["queue_running"] and not queue["queue_pending"]:
            return
        time.sleep(0.1)
    raise AssertionError(f"the queue did not drain within {timeout:.0f}s:\n{host.log_tail()}")


def run_batch(host, cases: list[Case], ours: list[str], tally: Tally) -> None:
    """POST every prompt of the batch, let the queue run them, then judge each."""
    for case in cases:
        tally.prompts += 1
        code, answer = post(host, case.prompt)
        if code == 200:
            case.prompt_id = answer["prompt_id"]
            if answer.get("node_errors"):
                # The attacked branch was refused at queue time; another output (a MemorizationFilter)
                # validated and runs alone. A refusal all the same.
                case.refused_in_part = True
                tally.refused_in_part += 1
                judge_400(case, answer, tally)
        elif code == 400:
            judge_400(case, answer, tally)
        else:
            tally.raw.append(f"{case.label}: HTTP {code}: {str(answer)[:300]}")
    wait_for_queue(host, timeout=180)
    for case in cases:
        if case.prompt_id is not None:
            entry = host.get(f"/history/{case.prompt_id}").get(case.prompt_id)
            if entry is None:
                tally.raw.append(f"{case.label}: no history entry")
            else:
                judge_entry(case, entry, ours, tally)
    assert host.get("/system_stats")["system"], "server stopped answering"


def test_hostile_prompts_are_refused_or_named(host, object_info, planted, capsys):
    tally = check_hostile_prompts(host, object_info, planted)
    with capsys.disabled():         # the figures, quoted in the issue: shown with or without -s
        print(tally.summary)


def check_hostile_prompts(host, object_info: dict, planted: dict) -> Tally:
    started = time.time()
    sets = planted["sets"]
    home_skip = COMFY_STATE + WRITABLE
    home_before = snapshot(host.home, home_skip)
    sets_before = snapshot(sets)
    outside_before = snapshot(planted["outside"])
    victim = digest(os.path.join(planted["outside"], "victim.safetensors"))
    around_before = {root: set(os.listdir(root)) for root in _around(host)}

    cases = all_cases(object_info)
    ours = sorted({case.node for case in cases})
    tally = Tally(cases=cases)
    for node in ours:
        batch = [case for case in cases if case.node == node]
        batch_started = time.time()
        run_batch(host, batch, ours, tally)
        counts = {}
        for case in batch:
            counts[case.outcome or "?"] = counts.get(case.outcome or "?", 0) + 1
        tally.per_node[node] = dict(counts, seconds=round(time.time() - batch_started, 1))

    seconds = time.time() - started
    sets_after = snapshot(sets)
    new = {rel: entry for rel, entry in sets_after.items() if rel not in sets_before}
    tally.summary = (f"\nhostile prompts (seed {SEED}): {tally.prompts} prompts, "
          f"{tally.rejected_400} refused at validation "
          f"(HTTP 400, {tally.refused_in_part} of them HTTP 200 with node_errors: only other outputs ran), "
          f"{tally.execution_errors} execution errors ({tally.core_errors} in ComfyUI's own nodes), "
          f"{tally.successes} successes, {len(tally.raw)} raw exceptions, {len(tally.accepted)} hostile values run, "
          f"{len(new)} new entries inside the set folder; {seconds:.0f} s")
    tally.summary += "".join(f"\n  {node}: {counts}" for node, counts in tally.per_node.items())
    tally.summary += "".join(f"\n  FAIL {line}" for line in tally.raw + tally.accepted)
    print(tally.summary)

    # Nothing written outside output/ and models/embedding_sets/, no set changed, the outside set untouched.
    assert snapshot(host.home, home_skip) == home_before, "files changed outside output/ and embedding_sets/"
    changed = [rel for rel, entry in sets_before.items() if sets_after.get(rel) != entry]
    assert not changed, f"pre-existing entries of models/embedding_sets changed: {changed}"
    assert all(entry[0] in ("file", "dir") for entry in new.values()), f"links or devices were created: {new}"
    assert snapshot(planted["outside"]) == outside_before
    assert digest(os.path.join(planted["outside"], "victim.safetensors")) == victim
    for root, names in around_before.items():
        escaped = [n for n in set(os.listdir(root)) - names if TOKEN in n]
        assert not escaped, f"a save escaped to {root}: {escaped}"
    assert tally.prompts >= 500
    assert not tally.raw, "raw exceptions from the pack:\n" + "\n".join(tally.raw)
    assert not tally.accepted, "hostile values that ran:\n" + "\n".join(tally.accepted)
    return tally


def _around(host) -> list[str]:
    """Folders an escaping save would land in: the home's parents, /tmp, the repository, ComfyUI."""
    roots = [os.path.dirname(host.home), os.path.dirname(os.path.dirname(host.home)), "/tmp", REPO, COMFY_DIR,
             os.getcwd(), os.path.join(host.home, "models")]
    return [r for r in dict.fromkeys(roots) if os.path.isdir(r)]
