"""Regenerates the shipped UI-format workflows from the live node definitions.

Run `make workflows` after changing a node's inputs: widget order in the files then matches
what the frontend expects, so they keep loading without missing or shifted values.
"""
from __future__ import annotations

import json
import os
import tempfile

from host.comfy_host import REPO, ComfyHost
from host.workflow import DESIRED_TITLE, WorkflowBuilder

CHECKPOINT = "sd-v1-4.ckpt"
GUARDED_SET = "guarded_images.safetensors"
STYLE_SET = "style_reference.safetensors"
PROMPT = "Ann Graham Lotz"   # a caption Carlini et al. extracted from SD 1.4
# The same request without the name that makes SD 1.4 reproduce its training photo.
DESIRED_PROMPT = "a portrait photo of a smiling woman with blonde hair"
DESIRED_SIZE = (400, 130)

GUARD_NOTE = (
    "Memorization guard (SD 1.4). The first KSampler generates; MemorizationFilter compares the image with the "
    "guarded set (tiled L2 < 0.1 = a copy). Only when it fires does ConditionalRegenerate ask for its lazy input: "
    "NudgeRegenerate re-noises the flagged image most of the way (desired_denoise 0.8) and samples it again with the "
    "prompt embedding moved 90 % of the way toward the Desired prompt (the same request without the name that makes "
    "the model copy). A memorized copy is "
    "decided by the prompt in the first steps, so nudging the finished latent only blurs it; moving the prompt gives "
    "a new image. An attempt counts only when it clears the threshold by escape_margin (1.5x); otherwise it is "
    "retried closer to the desired prompt. ConditionalRegenerate re-tests every replacement; one that is still a copy "
    "is reported as 'still flagged'. Disconnect desired_positive to get the old latent nudge.")


def txt2img(b: WorkflowBuilder, x0: int = 0):
    ckpt = b.add("CheckpointLoaderSimple", (x0, 0), ckpt_name=CHECKPOINT, size=(315, 98))
    pos = b.add("CLIPTextEncode", (x0 + 360, 0), title="Prompt", text=PROMPT, clip=(ckpt, 1), size=(400, 150))
    neg = b.add("CLIPTextEncode", (x0 + 360, 200), title="Negative prompt", text="", clip=(ckpt, 1), size=(400, 150))
    empty = b.add("EmptyLatentImage", (x0, 200), width=512, height=512, batch_size=1, size=(315, 106))
    sampler = b.add("KSampler", (x0 + 800, 0), title="Generate", model=(ckpt, 0), positive=(pos, 0),
                    negative=(neg, 0), latent_image=(empty, 0), seed=42, steps=20, cfg=7.5,
                    sampler_name="euler", scheduler="normal", denoise=1.0, size=(315, 262))
    decode = b.add("VAEDecode", (x0 + 1160, 0), samples=(sampler, 0), vae=(ckpt, 2), size=(210, 46))
    return ckpt, pos, neg, sampler, decode


def guard_loop(b: WorkflowBuilder, desired_set_node: int | None = None, alpha: float = 0.0):
    """The two-pass loop with LatentNudge and a second KSampler (composable; optional desired set)."""
    ckpt, pos, neg, sampler, decode = txt2img(b)
    guarded = b.add("LoadEmbeddingSet", (800, 320), set_name=GUARDED_SET, size=(315, 82))
    filt = b.add("MemorizationFilter", (1160, 120), images=(decode, 0), guarded_set=(guarded, 0), threshold=0.1,
                 size=(420, 220))
    extra = {} if desired_set_node is None else {"desired_set": (desired_set_node, 0)}
    nudge = b.add("LatentNudge", (1160, 380), latent=(sampler, 0), undesired_set=(filt, 3), alpha=alpha, beta=1.0,
                  proximity=1.0, steps=30, learning_rate=0.1, aggregate="max", vae=(ckpt, 2), size=(420, 320),
                  **extra)
    regen = b.add("KSampler", (1620, 380), title="Regenerate (nudged)", model=(ckpt, 0), positive=(pos, 0),
                  negative=(neg, 0), latent_image=(nudge, 0), seed=43, steps=20, cfg=7.5, sampler_name="euler",
                  scheduler="normal", denoise=0.3, size=(315, 262))
    decode2 = b.add("VAEDecode", (1980, 380), samples=(regen, 0), vae=(ckpt, 2), size=(210, 46))
    cond = b.add("ConditionalRegenerate", (1620, 0), verdicts=(filt, 0), images=(decode, 0),
                 regenerated=(decode2, 0), still_flagged_action="report", size=(420, 330))
    b.add("SaveImage", (2080, 0), images=(cond, 0), filename_prefix="nudging/guarded", size=(320, 300))
    return cond


def memorization_guard(info: dict) -> dict:
    """Filter -> NudgeRegenerate (nudge, partial resample, re-test, retry harder) -> ConditionalRegenerate."""
    b = WorkflowBuilder(info)
    ckpt, pos, neg, sampler, decode = txt2img(b)
    guarded = b.add("LoadEmbeddingSet", (800, 320), set_name=GUARDED_SET, size=(315, 82))
    filt = b.add("MemorizationFilter", (1160, 120), images=(decode, 0), guarded_set=(guarded, 0), threshold=0.1,
                 size=(420, 220))
    desired = b.add("CLIPTextEncode", (360, 560), title=DESIRED_TITLE, text=DESIRED_PROMPT, clip=(ckpt, 1),
                    size=DESIRED_SIZE)
    regen = b.add("NudgeRegenerate", (1160, 380), model=(ckpt, 0), positive=(pos, 0), negative=(neg, 0),
                  vae=(ckpt, 2), latent=(sampler, 0), verdicts=(filt, 0), desired_positive=(desired, 0), seed=43,
                  steps=20, cfg=7.5, sampler_name="euler", scheduler="normal", denoise=0.3, beta=1.0, proximity=1.0,
                  nudge_steps=30, learning_rate=0.05, max_attempts=4, growth=2.0, denoise_decay=0.8,
                  desired_strength=0.9, desired_denoise=0.8, escape_margin=1.5, size=(420, 590))
    cond = b.add("ConditionalRegenerate", (1620, 0), verdicts=(filt, 0), images=(decode, 0),
                 regenerated=(regen, 0), still_flagged_action="report", size=(420, 330))
    b.add("SaveImage", (2080, 0), images=(cond, 0), filename_prefix="nudging/guarded", size=(320, 300))
    b.note(GUARD_NOTE, (0, 720), size=(760, 210))
    return b.workflow()


def nudge_toward_style(info: dict) -> dict:
    b = WorkflowBuilder(info)
    style = b.add("LoadEmbeddingSet", (800, 700), title="Desired style", set_name=STYLE_SET, size=(315, 82))
    guard_loop(b, desired_set_node=style, alpha=1.0)
    b.note("The loop built from single steps: LatentNudge pushes the generated latent from the matched item and "
           "pulls it toward a desired set (alpha; build it from a few images in the style to keep with "
           "build_embedding_set.json), then a second KSampler re-noises it a little (denoise 0.3) and samples again. "
           "One attempt, no retries: memorization_guard.json's NudgeRegenerate retries harder where needed.",
           (0, 560), size=(760, 110), title="Pull toward a style")
    return b.workflow()


def build_embedding_set(info: dict) -> dict:
    b = WorkflowBuilder(info)
    ckpt = b.add("CheckpointLoaderSimple", (0, 0), ckpt_name=CHECKPOINT, size=(315, 98))
    image = b.add("LoadImage", (0, 150), image="guarded_image.png", size=(315, 314))
    built = b.add("BuildEmbeddingSet", (380, 0), images=(image, 0), vae=(ckpt, 2), store_pixels=True,
                  item_names="", size=(340, 200))
    b.add("SaveEmbeddingSet", (780, 0), embedding_set=(built, 0), set_name="guarded_images", size=(315, 82))
    b.note("Encodes images with the graph's VAE into an embedding set and saves it in models/embedding_sets. "
           "Use images of the size you generate at (512x512 for SD 1.4); batch several with an image batch node, "
           "or use `python -m tools.build_embedding_set` for a whole folder.", (380, 260), size=(520, 120))
    return b.workflow()


def single_pass_guard(info: dict) -> dict:
    b = WorkflowBuilder(info)
    ckpt = b.add("CheckpointLoaderSimple", (0, 0), ckpt_name=CHECKPOINT, size=(315, 98))
    guarded = b.add("LoadEmbeddingSet", (0, 150), set_name=GUARDED_SET, size=(315, 82))
    desired = b.add("CLIPTextEncode", (0, 700), title=DESIRED_TITLE, text=DESIRED_PROMPT, clip=(ckpt, 1),
                    size=DESIRED_SIZE)
    guard = b.add("MemorizationGuardModel", (0, 280), model=(ckpt, 0), guarded_set=(guarded, 0), vae=(ckpt, 2),
                  desired_positive=(desired, 0), desired_strength=0.9, size=(340, 400))
    pos = b.add("CLIPTextEncode", (380, 0), title="Prompt", text=PROMPT, clip=(ckpt, 1), size=(400, 150))
    neg = b.add("CLIPTextEncode", (380, 200), title="Negative prompt", text="", clip=(ckpt, 1), size=(400, 150))
    empty = b.add("EmptyLatentImage", (380, 400), width=512, height=512, batch_size=1, size=(315, 106))
    sampler = b.add("KSampler", (820, 0), title="Generate (guarded)", model=(guard, 0), positive=(pos, 0),
                    negative=(neg, 0), latent_image=(empty, 0), seed=42, steps=20, cfg=7.5,
                    sampler_name="euler", scheduler="normal", denoise=1.0, size=(315, 262))
    decode = b.add("VAEDecode", (1180, 0), samples=(sampler, 0), vae=(ckpt, 2), size=(210, 46))
    b.add("MemorizationFilter", (1180, 100), images=(decode, 0), guarded_set=(guarded, 0), threshold=0.1,
          size=(420, 220))
    b.add("SaveImage", (1640, 0), images=(decode, 0), filename_prefix="nudging/single_pass", size=(320, 300))
    b.note("Single-pass guard: the patched model watches the sampler's predicted clean latent at every step. As soon "
           "as an image comes close to a guarded one (in the first steps, where a copy is decided), the rest of its "
           "pass runs with the prompt moved 90 % of the way toward the Desired prompt (the same request without the "
           "name that makes the model copy): a new image, in the same pass, at no extra model cost. Without a desired "
           "prompt it turns the prediction away instead, which often leaves a smeared copy. Prompts that never come "
           "close run unchanged. MemorizationFilter still checks the final image: a guard that failed is reported, "
           "not hidden.", (380, 560), size=(760, 140))
    return b.workflow()


WORKFLOWS = {"single_pass_guard.json": single_pass_guard, "memorization_guard.json": memorization_guard, "nudge_toward_style.json": nudge_toward_style,
             "build_embedding_set.json": build_embedding_set}


def main() -> None:
    with tempfile.TemporaryDirectory() as home, ComfyHost(home) as host:
        info = host.object_info()
    for name, make in WORKFLOWS.items():
        path = os.path.join(REPO, "workflows", name)
        with open(path, "w") as f:
            json.dump(make(info), f, indent=1)
            f.write("\n")
        print("wrote", path)


if __name__ == "__main__":
    main()
