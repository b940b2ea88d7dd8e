"""The shapes fixture's table: do flagged prompts get a NEW on-prompt image, or a degraded copy?

The shapes fixture (shapes_world/) draws any "a {colour} {shape} on a {colour} background" and
memorized 8 duplicated items under their own captions (the same words plus a unique tail). So a
flagged prompt has many right answers — any scene with its attributes — and the bench can judge
both halves of the claim with tests the loops never optimise:

- memorized rate: tiled L2 < 0.1 to the prompt's own item (the detector the loops stop on);
- near-copy rate: bench/near_copy.py against the item (blurred, darkened, partly changed copies);
- relevance rate: the attribute reader (shapes_world/reader.py) reads the caption's shape and colours;
- quality: the reader's mean confidence (is it a clean scene at all?), beside the model's own
  outputs for the same attributes without the tail (the plain captions, loop off).

Jobs: each duplicated caption and each plain caption (its words without the tail: clean prompts)
x n seeds, through the loop off / two-pass / single-pass exactly as bench/run_bench.py runs them.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from bench.run_bench import (NEAR_COPY_MEASURE, cost_ratios, machine, near_copy_figures, run_jobs, shipped_prompts,
                             start_bench_host)
from host.comfy_host import CACHE
from memorizer.data import SAMPLER_SETTINGS
from nudging_core.tiled_l2 import tiled_l2_matrix
from shapes_world.build_checkpoint import ensure_checkpoint
from shapes_world.reader import AttributeReader
from shapes_world.scenes import World

METHODS = {"off": "before", "two_pass": "after", "single_pass": "single"}


def run_shapes_table(n_seeds: int, out_dir: str) -> dict:
    world = World.load()
    items = [(item.name, world.item_image(item)) for item in world.duplicated]
    jobs = []
    for i, item in enumerate(world.duplicated):
        for seed in range(n_seeds):
            # The desired prompt is the caption without its unique tail: what a user shown the copy asks for.
            plain = world.caption(*item.scene.attributes)
            jobs.append({"caption": world.item_caption(item), "desired": plain, "group": "duplicated", "own": i,
                         "seed": seed, "attributes": item.scene.attributes})
            jobs.append({"caption": plain, "desired": plain, "group": "plain", "own": i, "seed": seed,
                         "attributes": item.scene.attributes})
    checkpoint = ensure_checkpoint(os.path.join(CACHE, "models"))
    host = start_bench_host("bench-shapes-home", checkpoint, items)
    with host:
        prompts = shipped_prompts(host, checkpoint, world.resolution, SAMPLER_SETTINGS)
        rows = run_jobs(host, prompts, jobs)
    results = summarize_shapes(rows, world, [px for _, px in items], n_seeds)
    contact_sheets(rows, world, [px for _, px in items], out_dir)
    return {"shapes_world": results}


def summarize_shapes(rows, world, item_pixels, n_seeds) -> dict:
    reader = AttributeReader(world)
    guarded = torch.from_numpy(np.stack([p.astype(np.float32) / 255.0 for p in item_pixels]))
    groups = {g: [i for i, r in enumerate(rows) if r["group"] == g] for g in ("duplicated", "plain")}
    readings = {m: [reader.read(r[key]) for r in rows] for m, key in METHODS.items()}
    dist = {m: tiled_l2_matrix(torch.from_numpy(np.stack([r[key] for r in rows])), guarded).numpy()
            for m, key in METHODS.items()}

    def rate(values):
        return round(float(np.mean(values)), 4) if len(values) else None

    table = {}
    for group, idx in groups.items():
        for m, key in METHODS.items():
            own = [rows[i]["own"] for i in idx]
            near_rate, tiles_mean = near_copy_figures([rows[i][key] for i in idx], [item_pixels[o] for o in own])
            table[f"{group}/{m}"] = {
                "memorized_rate": rate([dist[m][i, o] < 0.1 for i, o in zip(idx, own)]),
                "memorized_any_rate": rate([dist[m][i].min() < 0.1 for i in idx]),
                "near_copy_rate": near_rate, "copied_tiles_mean": tiles_mean,
                "relevance_rate": rate([readings[m][i].attributes == tuple(rows[i]["attributes"]) for i in idx]),
                "reader_confidence_mean": rate([readings[m][i].confidence for i in idx]),
            }
    plain_off = table["plain/off"]
    for m in METHODS:
        entry = table[f"duplicated/{m}"]
        entry["relevance_vs_plain"] = (round(entry["relevance_rate"] / plain_off["relevance_rate"], 4)
                                       if plain_off["relevance_rate"] else None)
        entry["quality_vs_plain"] = (round(entry["reader_confidence_mean"] / plain_off["reader_confidence_mean"], 4)
                                     if plain_off["reader_confidence_mean"] else None)
    flagged = [i for i in range(len(rows)) if rows[i]["flagged_before"]]
    clean = [i for i in groups["plain"] if not rows[i]["flagged_before"]]
    return {
        "table": table, **cost_ratios(rows, flagged, clean),
        "n_flagged": len(flagged), "n_flagged_plain": sum(rows[i]["flagged_before"] for i in groups["plain"]),
        "n_still_flagged": sum(r["status"] == "still flagged" for r in rows),
        "n_duplicated_captions": len(world.duplicated), "n_seeds": n_seeds, "resolution": world.resolution,
        "sampler": SAMPLER_SETTINGS, "threshold": 0.1, "near_copy_measure": NEAR_COPY_MEASURE,
        "relevance_measure": "shapes_world.reader.AttributeReader finds the caption's shape, colour and background",
        "quality_measure": "mean reader confidence; *_vs_plain divides by the plain captions' loop-off outputs",
        "model": "shapes_world fixture (SD1.x layout, 64x64)", "machine": machine(),
        "workflows": ["workflows/memorization_guard.json", "workflows/single_pass_guard.json"],
    }


def contact_sheets(rows, world, item_pixels, out_dir, seeds_shown: int = 10) -> None:
    """bench/figure_shapes_<method>.png: per duplicated caption, its guarded image then one output per seed."""
    from PIL import Image
    gap = np.full((world.resolution, 4, 3), 1.0, np.float32)
    for m, key in METHODS.items():
        lines = []
        for i, px in enumerate(item_pixels):
            outs = [r[key] for r in rows if r["group"] == "duplicated" and r["own"] == i][:seeds_shown]
            lines.append(np.concatenate([px.astype(np.float32) / 255.0, gap] + outs, axis=1))
        sheet = np.concatenate(lines, axis=0)
        Image.fromarray((np.clip(sheet, 0, 1) * 255).round().astype(np.uint8)).resize(
            (sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(os.path.join(out_dir, f"figure_shapes_{m}.png"))
    # side by side: guarded | loop off | two-pass | single-pass, three seeds of each
    lines = []
    for i, px in enumerate(item_pixels):
        own = [r for r in rows if r["group"] == "duplicated" and r["own"] == i][:3]
        parts = [px.astype(np.float32) / 255.0]
        for key in METHODS.values():
            parts += [gap] + [r[key] for r in own]
        lines.append(np.concatenate(parts, axis=1))
    sheet = np.concatenate(lines, axis=0)
    Image.fromarray((np.clip(sheet, 0, 1) * 255).round().astype(np.uint8)).resize(
        (sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(os.path.join(out_dir, "figure_shapes.png"))
