"""`make bench`: the paper's memorization table, reproduced through a real ComfyUI server.

For every training caption of the memorizer (n_seeds seeds each) and for captions it never
saw, runs the shipped workflows/memorization_guard.json, plus the plain generation part of
the same workflow (the loop off) for the wall-time baseline. Writes bench/results.json,
bench/figure_distances.png (the paper's Figure 4) and bench/figure_shift.png (Figure 5).

Besides the detector (tiled L2 < 0.1, what the loops stop on), every output of a training
caption is judged by the independent near-copy test (bench/near_copy.py). This model knows one
image per caption, so it cannot say whether an output is on-prompt: the shapes fixture's table
(bench/shapes_table.py, `--fixture shapes`) measures that with its attribute reader.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from bench.full_size import ensure_full_size_checkpoint
from host.comfy_host import CACHE, REPO, ComfyHost, execution_error, execution_seconds, node_ui_json, output_paths
from host.workflow import configure_txt2img, generation_only, ui_to_api
from memorizer import data
from memorizer.build_checkpoint import ensure_checkpoint
from bench.near_copy import near_copy
from nudging_core.tiled_l2 import tiled_l2_matrix

WORKFLOW = "memorization_guard.json"
SINGLE_WORKFLOW = "single_pass_guard.json"
GUARDED = "guarded_images.safetensors"
THUMB = 8


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} CPU, no GPU"


def load_rgb(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def thumb(img: np.ndarray) -> np.ndarray:
    h, w, c = img.shape
    return img.reshape(THUMB, h // THUMB, THUMB, w // THUMB, c).mean(axis=(1, 3))


def start_bench_host(name: str, checkpoint: str, guarded: list[tuple[str, np.ndarray]]) -> ComfyHost:
    """A fresh server home with `checkpoint` linked in and the guarded set built from `guarded` (name, pixels)."""
    home = os.path.join(CACHE, name)
    shutil.rmtree(home, ignore_errors=True)
    host = ComfyHost(home)
    host.prepare()
    os.symlink(checkpoint, os.path.join(host.dir("models", "checkpoints"), os.path.basename(checkpoint)))
    guard_dir = host.dir("guard")
    for item_name, pixels in guarded:
        Image.fromarray(pixels).save(os.path.join(guard_dir, f"{item_name}.png"))
    build_set(guard_dir, checkpoint, os.path.join(home, "models", "embedding_sets", GUARDED))
    return host


def shipped_prompts(host: ComfyHost, checkpoint: str, resolution: int, sampler: dict) -> dict:
    """API prompts of the shipped workflows on this model: two-pass, its plain part, single-pass."""
    prompts = {}
    for key, workflow in (("two_pass", WORKFLOW), ("single", SINGLE_WORKFLOW)):
        with open(os.path.join(REPO, "workflows", workflow)) as f:
            prompts[key] = configure_txt2img(ui_to_api(json.load(f), host.object_info()), os.path.basename(checkpoint),
                                             resolution, sampler)
    prompts["plain"] = generation_only(prompts["two_pass"])
    return prompts


def run_jobs(host: ComfyHost, prompts: dict, jobs: list[dict]) -> list[dict]:
    """Every job ({'caption', 'seed', ...}) through the loop off, the two-pass loop and the single pass.

    Plain and guarded runs use different seeds: identical inputs would be served from ComfyUI's
    cache. The guarded run's first pass IS the plain generation for its seed. Plain and
    single-pass are timed twice each, interleaved, on other seeds of the same caption (same
    work): a 2% difference needs the fastest of two on a shared CPU. The two-pass loop (one run)
    is compared with the first plain run alone.
    """
    base, plain, single = prompts["two_pass"], prompts["plain"], prompts["single"]
    # Warm-up: model load and every caption's text encoding are cached for all runs alike.
    for caption in {job["caption"] for job in jobs}:
        host.run(configure_txt2img(plain, caption=caption, seed=10**6))
    rows = []
    for n, job in enumerate(jobs):
        caption, seed, desired = job["caption"], job["seed"], job.get("desired")
        entry_plain = host.run(configure_txt2img(plain, caption=caption, seed=seed + 50_000))
        prompt = configure_txt2img(base, caption=caption, seed=seed, desired=desired)
        entry = host.run(prompt)
        single_prompt = configure_txt2img(single, caption=caption, seed=seed, desired=desired)
        entry_single = host.run(single_prompt)
        entry_plain_again = host.run(configure_txt2img(plain, caption=caption, seed=seed + 60_000))
        entry_single_again = host.run(configure_txt2img(single, caption=caption, seed=seed + 70_000, desired=desired))
        error = next(filter(None, map(execution_error, (entry, entry_plain, entry_single, entry_plain_again,
                                                          entry_single_again))), None)
        if error:
            raise SystemExit(f"{error['node_type']}: {error['exception_message']}")
        verdict = node_ui_json(entry, prompt, "MemorizationFilter", "nudging_verdicts")["images"][0]
        status = node_ui_json(entry, prompt, "ConditionalRegenerate", "nudging_status")
        final = load_rgb(output_paths(host, entry, prompt, "SaveImage")[0])
        previews = output_paths(host, entry, prompt, "ConditionalRegenerate", "temp")
        before = load_rgb(previews[0]) if previews else final
        rows.append(dict(job, flagged_before=verdict["flagged"], distance_before=verdict["distance"],
                         status=status["statuses"][0], t_plain=execution_seconds(entry_plain),
                         t_guarded=execution_seconds(entry), t_plain_fastest=fastest(entry_plain, entry_plain_again),
                         t_single=fastest(entry_single, entry_single_again),
                         single=load_rgb(output_paths(host, entry_single, single_prompt, "SaveImage")[0]),
                         before=before, after=final))
        print(f"[bench] {n + 1}/{len(jobs)} {caption!r} seed {seed}: {status['statuses'][0]} "
              f"d={verdict['distance']:.3f} plain {rows[-1]['t_plain']:.2f}s two-pass {rows[-1]['t_guarded']:.2f}s "
              f"single-pass {rows[-1]['t_single']:.2f}s", flush=True)
    return rows


def run_bench(n_seeds: int, out_dir: str, full_size: bool = True) -> dict:
    """The photo memorizer's table (and the full-size SD 1.4 UNet cost ratios)."""
    items = data.training_items()
    train_pixels = np.stack([p.astype(np.float32) / 255.0 for _, _, p in items])
    jobs = [{"caption": caption, "desired": data.desired_caption(caption), "own": i, "seed": seed}
            for i, (_, caption, _) in enumerate(items) for seed in range(n_seeds)]
    jobs += [{"caption": caption, "desired": caption, "own": -1, "seed": seed} for caption in data.unseen_captions()
             for seed in range(n_seeds)]
    checkpoint = ensure_checkpoint(os.path.join(CACHE, "models"))
    host = start_bench_host("bench-home", checkpoint, [(name, pixels) for name, _, pixels in items])
    full_checkpoint = ensure_full_size_checkpoint(os.path.join(CACHE, "models")) if full_size else None
    if full_checkpoint:
        os.symlink(full_checkpoint, os.path.join(host.dir("models", "checkpoints"), os.path.basename(full_checkpoint)))
    with host:
        prompts = shipped_prompts(host, checkpoint, data.RESOLUTION, data.SAMPLER_SETTINGS)
        rows = run_jobs(host, prompts, jobs)
        results = summarize(rows, train_pixels, n_seeds, out_dir)
        save(results, out_dir)      # the main table is kept even if the full-size part fails
        if full_checkpoint:
            results["full_size_unet"] = full_size_ratios(host, prompts["two_pass"], prompts["single"],
                                                         full_checkpoint, items)
    return results


def save(results: dict, out_dir: str) -> None:
    """Write results.json. A run of one fixture keeps the other fixture's table, and a photo run
    without the full-size part keeps the earlier full-size figures (marked as such); every other
    key of the table that ran is replaced, so no stale figure survives."""
    path = os.path.join(out_dir, "results.json")
    old = {}
    if os.path.isfile(path):
        with open(path) as f:
            old = json.load(f)
    merged = {}
    if "shapes_world" not in results and "shapes_world" in old:
        merged["shapes_world"] = old["shapes_world"]
    if "baseline_memorized_rate" not in results:            # the photo table did not run: keep it whole
        merged.update({k: v for k, v in old.items() if k != "shapes_world"})
    elif "full_size_unet" not in results and "full_size_unet" in old:
        merged["full_size_unet"] = dict(old["full_size_unet"], note="from an earlier run (this one skipped it)")
    merged.update(results)
    with open(path, "w") as f:
        json.dump(merged, f, indent=1)


def build_set(images_dir: str, checkpoint: str, out: str) -> None:
    subprocess.run([sys.executable, "-m", "tools.build_embedding_set", images_dir, "--checkpoint", checkpoint,
                    "--out", out], cwd=REPO, check=True)


def full_size_ratios(host: ComfyHost, base: dict, single: dict, checkpoint: str, items, size: int = 256,
                     steps: int = 10, repeats: int = 2) -> dict:
    """Cost ratios on the full SD 1.4 UNet (random weights), after a warm-up; each time is the
    fastest of `repeats` runs (the CPU is shared, and the least disturbed run is the cost).

    Flagged: the guarded set is the model's own output for the same seed, so the first pass is a
    copy. Clean: the guarded set is the memorizer's photos. Every run gets a negative prompt of a
    different number of spaces: the same conditioning, but no answer from ComfyUI's cache.
    """
    name = os.path.basename(checkpoint)
    sets_dir = host.dir("models", "embedding_sets")
    runs = iter(range(1, 100))

    def run(prompt, set_name):
        prompt = configure_txt2img(prompt, name, size, None, caption="a photo", seed=7,
                                   set_names={GUARDED: set_name})
        for node in prompt.values():
            if node["class_type"] == "CLIPTextEncode" and node["_meta"]["title"] == "Negative prompt":
                node["inputs"]["text"] = " " * next(runs)
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = steps
        entry = host.run(prompt, timeout=3600)
        if execution_error(entry):
            raise SystemExit(str(execution_error(entry)))
        return entry, prompt

    entry, prompt = run(generation_only(base), GUARDED)           # warm-up; its image becomes the guarded one
    self_dir, photo_dir = host.dir("full_self"), host.dir("full_photos")
    shutil.copyfile(output_paths(host, entry, prompt, "SaveImage")[0], os.path.join(self_dir, "own_output.png"))
    for item_name, _, pixels in items:
        Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(os.path.join(photo_dir, f"{item_name}.png"))
    build_set(self_dir, checkpoint, os.path.join(sets_dir, "full_self.safetensors"))
    build_set(photo_dir, checkpoint, os.path.join(sets_dir, "full_photos.safetensors"))
    runs_of = {"plain": (generation_only(base), GUARDED), "two_pass_flagged": (base, "full_self.safetensors"),
               "two_pass_clean": (base, "full_photos.safetensors"), "single_flagged": (single, "full_self.safetensors"),
               "single_clean": (single, "full_photos.safetensors")}
    seconds = {key: [] for key in runs_of}
    for _ in range(repeats):          # interleaved, so slow spells of the machine hit every variant
        for key, (prompt, set_name) in runs_of.items():
            entry, prompt = run(prompt, set_name)
            if key == "two_pass_flagged":
                assert node_ui_json(entry, prompt, "MemorizationFilter", "nudging_verdicts")["any_flagged"], \
                    "self-guard missed"
            seconds[key].append(execution_seconds(entry))
    t = {key: min(values) for key, values in seconds.items()}
    print(f"[bench] full-size seconds: {t}", flush=True)
    return {"overhead_ratio_flagged": round(t["two_pass_flagged"] / t["plain"], 3),
            "overhead_ratio_clean": round(t["two_pass_clean"] / t["plain"], 3),
            "overhead_ratio_flagged_single": round(t["single_flagged"] / t["plain"], 3),
            "overhead_ratio_clean_single": round(t["single_clean"] / t["plain"], 3),
            "seconds": t, "all_seconds": seconds, "repeats": repeats, "resolution": size, "steps": steps,
            "model": "SD 1.4 UNet architecture (859.5M params), random weights; memorizer's CLIP-L and TAESD"}


def fastest(*entries) -> float:
    return min(execution_seconds(entry) for entry in entries)


def near_copy_figures(images, guarded) -> tuple[float | None, float | None]:
    """(near-copy rate, mean share of copied tiles) of images against their guarded images: the
    bench's independent near-copy test, computed once per image."""
    tests = [near_copy(img, ref) for img, ref in zip(images, guarded)]
    if not tests:
        return None, None
    return (round(float(np.mean([t["near_copy"] for t in tests])), 4),
            round(float(np.mean([t["copied_tiles"] for t in tests])), 4))


def summarize(rows, train_pixels, n_seeds, out_dir) -> dict:
    train_t = torch.from_numpy(train_pixels)
    after = torch.from_numpy(np.stack([r["after"] for r in rows]))
    before = torch.from_numpy(np.stack([r["before"] for r in rows]))
    d_after = tiled_l2_matrix(after, train_t).min(dim=1).values.numpy()
    d_before = tiled_l2_matrix(before, train_t).min(dim=1).values.numpy()
    trained = [i for i, r in enumerate(rows) if r["own"] >= 0]
    unseen = [i for i, r in enumerate(rows) if r["own"] < 0]
    flagged = [i for i in range(len(rows)) if rows[i]["flagged_before"]]
    nudged = [i for i in flagged if rows[i]["status"] != "passed"]
    pair = [np.sqrt(((train_pixels[a] - train_pixels[b]) ** 2).mean())
            for a in range(len(train_pixels)) for b in range(a + 1, len(train_pixels))]
    shifts = [np.sqrt(((rows[i]["after"] - rows[i]["before"]) ** 2).mean()) for i in nudged]
    single = torch.from_numpy(np.stack([r["single"] for r in rows]))
    d_single = tiled_l2_matrix(single, train_t).min(dim=1).values.numpy()
    clean_unseen = [i for i in unseen if not rows[i]["flagged_before"]]
    own = [train_pixels[rows[i]["own"]] for i in trained]

    near = {key: near_copy_figures([rows[i][key] for i in trained], own) for key in ("before", "after", "single")}

    results = {
        "baseline_memorized_rate": round(float(np.mean(d_before[trained] < 0.1)), 4),
        "baseline_memorized_rate_unseen": round(float(np.mean(d_before[unseen] < 0.1)), 4) if unseen else None,
        "guarded_memorized_rate": round(float(np.mean(d_after < 0.1)), 4),
        "guarded_memorized_rate_trained": round(float(np.mean(d_after[trained] < 0.1)), 4),
        "guarded_min_tiled_l2": round(float(d_after.min()), 4),
        "guarded_min_tiled_l2_nudged": round(float(d_after[nudged].min()), 4) if nudged else None,
        "near_copy_rate_off": near["before"][0], "near_copy_rate": near["after"][0],
        "single_pass_near_copy_rate": near["single"][0],
        "copied_tiles_mean": {"off": near["before"][1], "two_pass": near["after"][1], "single_pass": near["single"][1]},
        "mean_shift_ratio": round(float(np.mean(shifts) / np.mean(pair)), 4) if shifts else None,
        "single_pass_memorized_rate": round(float(np.mean(d_single < 0.1)), 4),
        "single_pass_memorized_rate_trained": round(float(np.mean(d_single[trained] < 0.1)), 4),
        "single_pass_min_tiled_l2": round(float(d_single.min()), 4),
        **cost_ratios(rows, flagged, clean_unseen),
        "n_flagged": len(flagged), "n_still_flagged": sum(r["status"] == "still flagged" for r in rows),
        "n_prompts": len({r["caption"] for r in rows}), "n_training_prompts": len({r["caption"] for r in rows if r["own"] >= 0}),
        "n_seeds": n_seeds, "resolution": data.RESOLUTION, "sampler": data.SAMPLER_SETTINGS,
        "threshold": 0.1, "near_copy_measure": NEAR_COPY_MEASURE,
        "relevance_measure": "none: each training caption of this model has exactly one on-prompt image (its photo), "
                             "so 'on-prompt' and 'not a copy' cannot both be judged here; see shapes_world",
        "machine": machine(), "workflow": f"workflows/{WORKFLOW}",
    }
    figures(rows, d_before, d_after, d_single, nudged, train_pixels, out_dir)
    return results


NEAR_COPY_MEASURE = ("bench/near_copy.py, against the prompt's own guarded image: near-copy when >= half of the "
                     "informative 4x4 tiles stay within RMS 0.1, or SSIM of standardised 16x16 luminance >= 0.5")


def cost_ratios(rows, flagged, clean) -> dict:
    """Median of per-prompt ratios against one plain generation: one run each on a shared CPU
    varies by +-20%, and a single disturbed run would move a mean by more than the 2% measured."""
    def ratio(idx, key="t_guarded", average=statistics.median):
        base = "t_plain_fastest" if key == "t_single" else "t_plain"
        t = [rows[i][key] / rows[i][base] for i in idx if rows[i][base]]
        return round(average(t), 3) if t else None

    return {
        "overhead_ratio_flagged": ratio(flagged), "overhead_ratio_clean": ratio(clean),
        "overhead_ratio_flagged_single": ratio(flagged, "t_single"),
        "overhead_ratio_clean_single": ratio(clean, "t_single"),
        "overhead_ratios_mean": {"flagged": ratio(flagged, average=statistics.mean),
                                 "clean": ratio(clean, average=statistics.mean),
                                 "flagged_single": ratio(flagged, "t_single", statistics.mean),
                                 "clean_single": ratio(clean, "t_single", statistics.mean)},
        "overhead_ratio_average": "median of per-prompt ratios (overhead_ratios_mean: their mean); plain and "
                                  "single-pass times are the fastest of 2 interleaved runs, two-pass one run",
    }


def figures(rows, d_before, d_after, d_single, nudged, train_pixels, out_dir) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, max(0.6, float(max(d_before.max(), d_after.max(), d_single.max()))), 40)
    ax.hist(d_before, bins=bins, alpha=0.6, label="loop off (first pass)")
    ax.hist(d_after, bins=bins, alpha=0.6, label="after the two-pass nudge loop")
    ax.hist(d_single, bins=bins, alpha=0.6, histtype="step", lw=2, label="single-pass guard")
    ax.axvline(0.1, color="k", linestyle="--", label="threshold 0.1")
    ax.set_xlabel("tiled L2 to the nearest guarded image")
    ax.set_ylabel("outputs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "figure_distances.png"), dpi=110)
    plt.close(fig)

    # 2-D PCA of 8x8 thumbnails: training images, outputs, arrows to their nudged versions.
    feats = lambda imgs: np.stack([thumb(i).ravel() for i in imgs])  # noqa: E731  (figure only)
    base = np.concatenate([feats(train_pixels), feats([r["before"] for r in rows]), feats([r["after"] for r in rows])])
    mean = base.mean(axis=0)
    _, _, vt = np.linalg.svd(base - mean, full_matrices=False)
    proj = lambda x: (x - mean) @ vt[:2].T  # noqa: E731
    t2, b2, a2 = proj(feats(train_pixels)), proj(feats([r["before"] for r in rows])), proj(feats([r["after"] for r in rows]))
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(b2[:, 0], b2[:, 1], s=10, c="tab:gray", label="outputs (loop off)")
    for i in nudged:
        ax.annotate("", xy=a2[i], xytext=b2[i], arrowprops=dict(arrowstyle="->", color="tab:blue", lw=0.8))
    ax.scatter(a2[nudged, 0], a2[nudged, 1], s=12, c="tab:blue", label="nudged outputs")
    ax.scatter(t2[:, 0], t2[:, 1], s=80, marker="*", c="tab:red", label="guarded training images")
    ax.set_title("Outputs before and after the nudge (PCA of 8x8 thumbnails)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "figure_shift.png"), dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(REPO, "bench"))
    parser.add_argument("--fixture", choices=["all", "photos", "shapes"], default="all",
                        help="which table to run (results.json keeps the other one's keys)")
    parser.add_argument("--no-full-size", action="store_true", help="skip the full-size SD 1.4 UNet cost ratios")
    args = parser.parse_args(argv)
    results = {}
    if args.fixture in ("all", "shapes"):
        from bench.shapes_table import run_shapes_table
        started = time.time()
        results.update(run_shapes_table(args.seeds, args.out))
        results["shapes_world"]["bench_seconds"] = round(time.time() - started, 1)
        save(results, args.out)
    if args.fixture in ("all", "photos"):
        started = time.time()
        results.update(run_bench(args.seeds, args.out, full_size=not args.no_full_size))
        results["bench_seconds"] = round(time.time() - started, 1)
        save(results, args.out)
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
