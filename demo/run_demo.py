"""`make demo`: the shipped memorization_guard.json on a headless ComfyUI, end to end.

Embedded default: the project's own memorizer (a tiny SD 1.x-format model that reproduces its
8 training photos), guarding those photos. With --checkpoint (e.g. a real sd-v1-4.ckpt) the
same workflow runs on that model; give --guard-dir with the images to guard (sized like the
generation) and --prompts, or leave --guard-dir out to guard the model's own first outputs
(each prompt is generated once, that image is guarded, and the workflow must then catch it).

Writes out/demo/report.json, report.html and the images.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import subprocess
import sys
import time

from host.comfy_host import CACHE, REPO, ComfyHost, execution_error, node_ui_json, output_paths
from host.workflow import configure_txt2img, generation_only, ui_to_api

WORKFLOW = "memorization_guard.json"
GUARDED = "guarded_images.safetensors"


def copy_outputs(host: ComfyHost, entry: dict, prompt: dict, class_type: str, kind: str, dest: str,
                 stem: str) -> list[str]:
    names = []
    for i, src in enumerate(output_paths(host, entry, prompt, class_type, kind)):
        names.append(f"{stem}_{i}.png")
        shutil.copyfile(src, os.path.join(dest, names[-1]))
    return names


def build_set(images_dir: str, checkpoint: str, out: str) -> None:
    if os.path.exists(out):
        os.remove(out)  # the demo's own scratch home: never a user's file
    subprocess.run([sys.executable, "-m", "tools.build_embedding_set", images_dir, "--checkpoint", checkpoint,
                    "--out", out], cwd=REPO, check=True)


def embedded_default(models_dir: str):
    from memorizer import data
    from memorizer.build_checkpoint import ensure_checkpoint
    checkpoint = ensure_checkpoint(models_dir)
    trained = data.training_items()
    jobs = [(caption, seed) for _, caption, _ in trained[:4] for seed in (1, 2)]
    jobs += [(caption, 1) for caption in data.unseen_captions()[:2]]
    return checkpoint, trained, jobs, data.RESOLUTION, data.SAMPLER_SETTINGS


def write_html(report: dict, path: str) -> None:
    rows = []
    for item in report["images"]:
        before = "".join(f'<img src="{html.escape(f)}" width="128">' for f in item.get("before_files", []))
        after = f'<img src="{html.escape(item["file"])}" width="128">' if item.get("file") else ""
        colour = {"passed": "#2e7d32", "regenerated": "#1565c0", "still flagged": "#c62828"}.get(item["status"], "#555")
        after_d = "" if item["distance_after"] is None else f"{item['distance_after']:.4f}"
        guarded = f'<img src="{html.escape(item["guarded_file"])}" width="128">' if item.get("guarded_file") else ""
        rows.append(
            f"<tr><td>{html.escape(item['prompt'])}</td><td>{html.escape(item.get('desired', ''))}</td>"
            f"<td>{item['seed']}</td>"
            f"<td>{'yes' if item['flagged_before'] else 'no'}</td><td>{item['distance_before']:.4f}</td>"
            f"<td>{html.escape(item['nearest'])}</td><td style='color:{colour};font-weight:bold'>{item['status']}</td>"
            f"<td>{after_d}</td><td>{guarded}</td><td>{before}</td><td>{after}</td></tr>")
    page = f"""<!doctype html><meta charset="utf-8"><title>Embedding nudging demo</title>
<style>body{{font-family:sans-serif}} td,th{{border:1px solid #ccc;padding:4px}} table{{border-collapse:collapse}}
img{{image-rendering:pixelated;margin:2px}}</style>
<h1>Embedding nudging demo</h1>
<p>Workflow <code>{html.escape(report['workflow'])}</code> on <code>{html.escape(report['checkpoint'])}</code>,
tiled-L2 threshold {report['threshold']} (an output closer than this to a guarded image is a copy).</p>
<table><tr><th>prompt</th><th>desired prompt</th><th>seed</th><th>flagged</th><th>distance before</th><th>nearest</th>
<th>status</th><th>distance after</th><th>guarded image</th><th>first pass / its replacement</th><th>final output</th></tr>
{''.join(rows)}</table>
<p>Seconds: {html.escape(json.dumps(report['seconds']))}</p>"""
    with open(path, "w") as f:
        f.write(page)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run the shipped memorization guard workflow end to end.")
    parser.add_argument("--checkpoint", help="an SD 1.x checkpoint (default: the project's own memorizer)")
    parser.add_argument("--guard-dir", help="images to guard, sized like the generation (with --checkpoint)")
    parser.add_argument("--prompts", nargs="*", default=["Ann Graham Lotz", "a photo of an astronaut"],
                        help="prompts to run with --checkpoint")
    parser.add_argument("--desired", nargs="*", default=None,
                        help="with --prompts: each prompt's desired re-wording (without the name or title that makes "
                             "the model copy); default: the prompt itself, which leaves only the new noise to escape")
    parser.add_argument("--resolution", type=int, default=512, help="generation size with --checkpoint")
    parser.add_argument("--out", default=os.path.join(REPO, "out", "demo"))
    args = parser.parse_args(argv)
    t0 = time.time()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    home = os.path.join(CACHE, "demo-home")
    shutil.rmtree(home, ignore_errors=True)
    host = ComfyHost(home)
    host.prepare()
    seconds = {}

    if args.checkpoint:
        checkpoint = os.path.abspath(args.checkpoint)
        resolution, sampler = args.resolution, None
        if args.desired is not None and len(args.desired) != len(args.prompts):
            raise SystemExit("--desired: give one desired prompt per --prompts entry")
        desired = dict(zip(args.prompts, args.desired or args.prompts))
        jobs = [(p, 1) for p in args.prompts]
        self_guard = not args.guard_dir
    else:
        checkpoint, trained, jobs, resolution, sampler = embedded_default(os.path.join(CACHE, "models"))
        from memorizer import data
        desired = {caption: data.desired_caption(caption) for caption, _seed in jobs}
        self_guard = False
    seconds["checkpoint"] = round(time.time() - t0, 2)
    os.symlink(checkpoint, os.path.join(host.dir("models", "checkpoints"), os.path.basename(checkpoint)))

    guard_dir = host.dir("guard")
    if args.guard_dir:
        guard_dir = os.path.abspath(args.guard_dir)
    elif not args.checkpoint:
        from PIL import Image
        for name, _caption, pixels in trained:
            Image.fromarray(pixels).save(os.path.join(guard_dir, f"{name}.png"))

    t = time.time()
    host.start()
    seconds["server_start"] = round(time.time() - t, 2)
    try:
        with open(os.path.join(REPO, "workflows", WORKFLOW)) as f:
            base = ui_to_api(json.load(f), host.object_info())
        base = configure_txt2img(base, os.path.basename(checkpoint), resolution, sampler)
        if self_guard:
            # Guard each prompt's own first output: the workflow must then catch and replace it.
            t = time.time()
            for i, (caption, seed) in enumerate(jobs):
                entry = host.run(configure_txt2img(generation_only(base), caption=caption, seed=seed))
                copy_outputs(host, entry, base, "SaveImage", "output", guard_dir, f"self_guard_{i}")
            seconds["self_guard_generation"] = round(time.time() - t, 2)
        t = time.time()
        build_set(guard_dir, checkpoint, os.path.join(home, "models", "embedding_sets", GUARDED))
        seconds["build_guarded_set"] = round(time.time() - t, 2)

        images, per_image = [], []
        for i, (caption, seed) in enumerate(jobs):
            prompt = configure_txt2img(base, caption=caption, seed=seed, desired=desired[caption])
            t = time.time()
            entry = host.run(prompt)
            per_image.append(round(time.time() - t, 2))
            error = execution_error(entry)
            if error:
                raise SystemExit(f"the workflow failed on '{caption}': {error['node_type']}: {error['exception_message']}")
            verdict = node_ui_json(entry, prompt, "MemorizationFilter", "nudging_verdicts")["images"][0]
            status = node_ui_json(entry, prompt, "ConditionalRegenerate", "nudging_status")
            final = copy_outputs(host, entry, prompt, "SaveImage", "output", out, f"image_{i:02d}")
            before = copy_outputs(host, entry, prompt, "ConditionalRegenerate", "temp", out, f"before_after_{i:02d}")
            guarded_png = os.path.join(guard_dir, f"{verdict['nearest']}.png")
            guarded_file = None
            if verdict["flagged"] and os.path.isfile(guarded_png):
                guarded_file = f"guarded_{i:02d}.png"
                shutil.copyfile(guarded_png, os.path.join(out, guarded_file))
            images.append({"prompt": caption, "desired": desired[caption], "seed": seed,
                           "flagged_before": verdict["flagged"], "guarded_file": guarded_file,
                           "distance_before": verdict["distance"], "nearest": verdict["nearest"],
                           "status": status["statuses"][0],
                           "distance_after": None if status["distances_after"][0] is None
                           else round(status["distances_after"][0], 5),
                           "file": final[0] if final else None, "before_files": before})
            print(f"[demo] {caption!r} seed {seed}: {images[-1]['status']} "
                  f"(distance {verdict['distance']:.4f}"
                  + (f" -> {images[-1]['distance_after']:.4f})" if images[-1]["distance_after"] is not None else ")"))
        seconds["per_image"] = per_image
    finally:
        host.stop()
    seconds["total"] = round(time.time() - t0, 2)
    report = {"workflow": f"workflows/{WORKFLOW}", "checkpoint": os.path.basename(checkpoint),
              "threshold": _threshold(base), "images": images, "seconds": seconds}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    write_html(report, os.path.join(out, "report.html"))
    regenerated = sum(1 for i in images if i["flagged_before"] and i["status"] == "regenerated")
    print(f"[demo] {sum(i['flagged_before'] for i in images)} of {len(images)} flagged, {regenerated} regenerated "
          f"clean; report in {os.path.join(out, 'report.html')}")
    return 0


def _threshold(prompt: dict) -> float:
    return next(n["inputs"]["threshold"] for n in prompt.values() if n["class_type"] == "MemorizationFilter")


if __name__ == "__main__":
    sys.exit(main())
