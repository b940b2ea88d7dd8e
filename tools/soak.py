"""Soak: hundreds of queued prompts on one ComfyUI server, memory and statuses watched (issue #14).

Mixes, deterministically (--seed): clean and memorized captions of the photo memorizer, both shipped
guard workflows (memorization_guard.json, single_pass_guard.json), batches of 1 and 2, and an
interrupt every --interrupt-every prompts. Checks every finished prompt's status: a memorized
caption is flagged by MemorizationFilter and then regenerated or reported still flagged, never
passed silently; a clean caption passes or is handled. Prints the server's resident memory (VmRSS
of the server process) after warm-up and at the end, the growth, the files left in temp/ and how many
of ConditionalRegenerate's previews are still there. run_soak is also the short soak in `make test`
(tests/integration/test_soak_short.py), on that session's server.

  python -m tools.soak [--prompts 300] [--seed 0] [--interrupt-every 25] [--json out/soak.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter

from PIL import Image

from host.comfy_host import CACHE, REPO, ComfyHost, HostError, execution_error, node_ui, output_paths
from host.workflow import configure_txt2img, set_inputs, ui_to_api
from memorizer import data as memorizer_data
from memorizer.build_checkpoint import ensure_checkpoint

GUARDED = "guarded_images.safetensors"
WORKFLOWS = ("memorization_guard.json", "single_pass_guard.json")


def server_rss_mb(host: ComfyHost) -> float:
    with open(f"/proc/{host.process.pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def setup(home: str) -> tuple[ComfyHost, dict]:
    checkpoint = ensure_checkpoint(os.path.join(CACHE, "models"))
    host = ComfyHost(home)
    host.prepare()
    os.symlink(checkpoint, os.path.join(host.dir("models", "checkpoints"), os.path.basename(checkpoint)))
    images = host.dir("input", "training")
    for name, _caption, pixels in memorizer_data.training_items():
        Image.fromarray(pixels).save(os.path.join(images, f"{name}.png"))
    subprocess.run([sys.executable, "-m", "tools.build_embedding_set", images, "--checkpoint", checkpoint,
                    "--out", os.path.join(host.dir("models", "embedding_sets"), GUARDED)], cwd=REPO, check=True)
    host.start()
    return host, soak_context(host, os.path.basename(checkpoint))


def soak_context(host: ComfyHost, checkpoint_name: str) -> dict:
    """What make_prompt needs from a running server that has the memorizer checkpoint and GUARDED."""
    info = host.object_info()
    workflows = {}
    for name in WORKFLOWS:
        with open(os.path.join(REPO, "workflows", name)) as fh:
            workflows[name] = ui_to_api(json.load(fh), info)
    return dict(workflows=workflows, checkpoint=checkpoint_name)


def make_prompt(ctx: dict, rng: random.Random, index: int) -> tuple[dict, bool, str, int]:
    memorized = rng.random() < 0.5
    caption = rng.choice(memorizer_data.training_captions() if memorized else memorizer_data.unseen_captions())
    workflow = rng.choice(WORKFLOWS)
    prompt = configure_txt2img(ctx["workflows"][workflow], ctx["checkpoint"], memorizer_data.RESOLUTION,
                               memorizer_data.SAMPLER_SETTINGS, caption, 1000 + index,
                               desired=memorizer_data.desired_caption(caption) if memorized else caption)
    batch = rng.choice((1, 1, 2))
    prompt = set_inputs(prompt, "EmptyLatentImage", batch_size=batch)
    return prompt, memorized, workflow, batch


def verdict_problems(entry: dict, prompt: dict, memorized: bool, workflow: str) -> list[str]:
    """What is wrong with a finished prompt's statuses (empty: all correct)."""
    error = execution_error(entry)
    if error is not None:
        return [f"error in {error.get('node_type')}: {error.get('exception_message', '')[:200]}"]
    report = (node_ui(entry, prompt, "MemorizationFilter") or {}).get("text", [""])[0]
    if not report.startswith("threshold"):
        return ["no MemorizationFilter report"]
    if workflow == "memorization_guard.json":
        status = (node_ui(entry, prompt, "ConditionalRegenerate") or {}).get("text", [""])[0]
        lines = [line for line in status.splitlines() if line.startswith("image ")]
        flagged = [line for line in report.splitlines() if "FLAGGED" in line]
        handled = [line for line in lines if "regenerated" in line or "still flagged" in line]
        if len(handled) != len(flagged):
            return [f"{len(flagged)} flagged but {len(handled)} regenerated/still flagged: {status!r}"]
    return []


def temp_file_count(host: ComfyHost) -> int:
    return sum(len(files) for _r, _d, files in os.walk(os.path.join(host.home, "temp")))


def run_soak(host: ComfyHost, ctx: dict, prompts: int, seed: int = 0, interrupt_every: int = 25,
             warmup: int = 30, report_every: int = 25) -> dict:
    """Queue `prompts` prompts one after another on a running server, check each finished one, and
    return the counts, problems, memory curve and the previews ConditionalRegenerate wrote."""
    rng = random.Random(seed)
    started, rss, problems, interrupted, done = time.time(), [], [], 0, 0
    baseline, mix, previews = None, Counter(), []
    for index in range(prompts):
        prompt, memorized, workflow, batch = make_prompt(ctx, rng, index)
        mix[f"{workflow} batch {batch}"] += 1
        prompt_id = host.queue(prompt)
        if interrupt_every and index % interrupt_every == interrupt_every - 1:
            time.sleep(rng.uniform(0.05, 0.6))
            host.interrupt()
        try:
            entry = host.wait(prompt_id, timeout=300)
        except HostError as err:
            problems.append(f"prompt {index}: {err}")
            continue
        written = [os.path.relpath(path, host.home)
                   for path in output_paths(host, entry, prompt, "ConditionalRegenerate", kind="temp")]
        if written:
            previews.append(written)
        kinds = [m[0] for m in entry.get("status", {}).get("messages", [])]
        if "execution_interrupted" in kinds:
            interrupted += 1
        else:
            problems += [f"prompt {index} ({workflow}, {'memorized' if memorized else 'clean'}): {p}"
                         for p in verdict_problems(entry, prompt, memorized, workflow)]
            done += 1
        if index + 1 == warmup:
            baseline = server_rss_mb(host)
        if report_every and (index + 1) % report_every == 0:
            rss.append((index + 1, round(server_rss_mb(host), 1)))
            print(f"[soak] {index + 1}/{prompts} prompts, server RSS {rss[-1][1]:.0f} MB, "
                  f"{len(problems)} problems", flush=True)
    final = server_rss_mb(host)
    growth = (final - baseline) / baseline if baseline else float("nan")
    on_disk = sum(os.path.isfile(os.path.join(host.home, p)) for run in previews for p in run)
    return {"prompts": prompts, "completed": done, "interrupted": interrupted, "problems": problems,
            "mix": dict(sorted(mix.items())), "rss_after_warmup_mb": round(baseline or float("nan"), 1),
            "rss_final_mb": round(final, 1), "rss_growth": round(growth, 4), "rss_curve": rss,
            "temp_files": temp_file_count(host), "preview_runs": len(previews), "previews_on_disk": on_disk,
            "previews": previews, "seconds": round(time.time() - started, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interrupt-every", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=30, help="prompts before the memory baseline is taken")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nudging-soak-") as home:
        host, ctx = setup(home)
        try:
            result = run_soak(host, ctx, args.prompts, args.seed, args.interrupt_every, args.warmup)
        finally:
            host.stop()
    print(json.dumps({k: v for k, v in result.items() if k not in ("problems", "previews")}))
    for line in result["problems"]:
        print("PROBLEM", line)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0 if not result["problems"] and result["rss_growth"] <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
