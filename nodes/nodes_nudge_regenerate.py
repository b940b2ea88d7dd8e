"""NudgeRegenerate: regenerate each flagged image as a new one, re-test it, retry harder where it
is still a copy. Goes in ConditionalRegenerate's lazy branch, so only flagged prompts pay.

With a desired prompt connected, each attempt samples the whole trajectory again with the prompt
embedding moved toward the desired one (nudging_core.conditioning_nudge: the copy is decided by
the prompt, early, so this is what escapes). Without one it falls back to LatentNudge on the
finished latent plus a partial resample, which keeps the copy's composition by construction.
An attempt is accepted only when its distance clears the threshold by `escape_margin`."""
from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..nudging_core.conditioning_nudge import escalated_strength, toward_desired
from ..nudging_core.escape import regenerate_until_clear, retry_until_clear
from ..nudging_core.memorization import check_pixels
from ..nudging_core.nudge import NudgeSettings, check_finite
from .common import (CATEGORY, NudgeNodeError, VerdictType, check_inputs, desired_prompt_inputs, desired_tensor,
                     set_latents_for, user_input)


class NudgeRegenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NudgeRegenerate",
            display_name="Nudge and Regenerate (Nudging)",
            category=CATEGORY,
            description="For each flagged image, makes a new image and re-tests it. With desired_positive connected "
                        "(recommended: the prompt re-worded without what makes it a copy), samples the whole image "
                        "again with the prompt embedding moved toward the desired one (desired_strength; each retry "
                        "halves the distance left). Without it, nudges the generated latent away from the matched "
                        "item (LatentNudge's objective), re-noises it part way (denoise) and samples again: that keeps "
                        "the copy's composition and often leaves a degraded copy. An attempt counts as escaped only "
                        "at a distance of at least escape_margin x the filter's threshold; the rest are retried, up "
                        "to max_attempts. Outputs only the flagged images' replacements, for ConditionalRegenerate.",
            inputs=[
                io.Model.Input("model", tooltip="The model that generated the images."),
                io.Conditioning.Input("positive", tooltip="The generation's positive conditioning."),
                io.Conditioning.Input("negative", tooltip="The generation's negative conditioning."),
                io.Vae.Input("vae", tooltip="The graph's VAE, to decode and re-test each attempt."),
                io.Latent.Input("latent", tooltip="The first pass's generated (denoised) latent."),
                VerdictType.Input("verdicts", tooltip="MemorizationFilter's verdicts for that latent's images."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed for the re-noising (attempt k uses seed + k)."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampler steps (as in KSampler)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG scale."),
                io.Combo.Input("sampler_name", options=list(comfy.samplers.KSampler.SAMPLERS), default="euler",
                               tooltip="Sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="normal",
                               tooltip="Scheduler, as in KSampler."),
                io.Float.Input("denoise", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="How far the nudged latent is re-noised before sampling again: low keeps the "
                                       "nudge, high lets a memorizing model pull the image back."),
                io.Float.Input("beta", default=1.0, min=0.0, max=1000.0, step=0.05,
                               tooltip="Push away from the matched item on the first attempt."),
                io.Float.Input("proximity", default=1.0, min=0.0, max=1000.0, step=0.05,
                               tooltip="Pull toward the generated latent (in units of its spread)."),
                io.Int.Input("nudge_steps", default=30, min=1, max=10000, tooltip="Adam steps of each nudge."),
                io.Float.Input("learning_rate", default=0.05, min=0.0, max=10.0, step=0.005,
                               tooltip="Adam step per element, in units of the latent's standard deviation."),
                io.Int.Input("max_attempts", default=4, min=1, max=20,
                             tooltip="Attempts per image before it is handed on as still flagged."),
                io.Float.Input("growth", default=2.0, min=1.0, max=10.0, step=0.1,
                               tooltip="Factor beta and the step size grow by after each failed attempt."),
                io.Float.Input("denoise_decay", default=0.8, min=0.05, max=1.0, step=0.05,
                               tooltip="Factor denoise shrinks by after each failed attempt: re-noising less keeps "
                                       "more of the stronger nudge, so a memorizing model cannot pull it back."),
            ] + desired_prompt_inputs(
                "Switches the node to regenerating the whole image with the prompt moved toward it (denoise, beta, "
                "proximity, nudge_steps, learning_rate and denoise_decay then do not apply).",
                "First attempt: how far the prompt embedding moves toward desired_positive (1 = the desired prompt "
                "itself). Each retry divides the distance left by `growth`.") + [
                io.Float.Input("desired_denoise", default=1.0, min=0.05, max=1.0, step=0.05, optional=True,
                               tooltip="With desired_positive, first attempt: how far the first pass's image is "
                                       "re-noised before it is sampled with the moved prompt (1 = from new noise; "
                                       "0.8 costs 80 % of a generation and still starts where the copy is not yet "
                                       "decided). Retries start from new noise."),
                io.Float.Input("escape_margin", default=1.5, min=1.0, max=10.0, step=0.1, optional=True,
                               tooltip="An attempt is accepted only when its tiled L2 to every guarded image is at "
                                       "least this many times the filter's threshold: an image that is only just "
                                       "past the line is usually the copy, blurred."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="Replacements for the flagged images, in batch order."),
                io.Latent.Output(display_name="latent", tooltip="Their latents."),
                io.String.Output(display_name="report", tooltip="Attempts and final distance per image."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, vae, latent, verdicts, seed, steps, cfg, sampler_name, scheduler,
                denoise, beta, proximity, nudge_steps, learning_rate, max_attempts, growth,
                denoise_decay, desired_positive=None, desired_strength=0.9, desired_denoise=1.0,
                escape_margin=1.5) -> io.NodeOutput:
        check_inputs(cls, locals())
        samples = latent["samples"]
        if samples.shape[0] != len(verdicts.flagged):
            raise NudgeNodeError(f"NudgeRegenerate: input 'latent': {samples.shape[0]} latents but the verdicts "
                                 f"cover {len(verdicts.flagged)} images; connect the latent MemorizationFilter's "
                                 "images were decoded from")
        rows = [b for b, hit in enumerate(verdicts.flagged) if hit]
        if not rows:
            raise NudgeNodeError("NudgeRegenerate: input 'verdicts': nothing was flagged; connect this node to "
                                 "ConditionalRegenerate's lazy 'regenerated' input so it only runs when needed")
        matched = verdicts.matched_set()
        for name, conditioning in (("positive", positive), ("negative", negative)):
            with user_input("NudgeRegenerate", name):
                for entry in conditioning:
                    check_finite(entry[0], f"{name} conditioning")
        progress = comfy.utils.ProgressBar(max_attempts * steps)
        attempt_offset = [0]

        def sample(start, attempt, attempt_positive, attempt_denoise):
            comfy.model_management.throw_exception_if_processing_interrupted()
            attempt_seed = (seed + attempt) % 2**64   # seed may be the widget's maximum, 2**64 - 1
            noise = comfy.sample.prepare_noise(start, attempt_seed)
            attempt_offset[0] = attempt * steps

            def callback(step, _x0, _x, total):
                progress.update_absolute(attempt_offset[0] + step + 1, max_attempts * steps)

            out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, attempt_positive, negative,
                                      start, denoise=attempt_denoise, callback=callback, disable_pbar=True,
                                      seed=attempt_seed)
            if not torch.isfinite(out).all():
                # Said here, not as "the VAE decoded NaN" by the test that would come next.
                raise NudgeNodeError(f"NudgeRegenerate: input 'model': attempt {attempt + 1} sampled NaN or infinite "
                                     "latents; check the model, its LoRAs and the conditioning (a NaN usually comes "
                                     "from fp16 overflow: try --force-fp32)")
            return vae.decode(out), out

        def test(images):
            with user_input("NudgeRegenerate", "vae"):
                verdict = check_pixels(images, verdicts.guarded, verdicts.threshold)
            # Accepted only with a margin: just past the threshold is usually the copy, degraded.
            accept_at = verdicts.threshold * escape_margin
            return [d < accept_at for d in verdict.distances], verdict.distances

        if desired_positive is not None:
            desired = desired_tensor("NudgeRegenerate", desired_positive)
            with user_input("NudgeRegenerate", "desired_positive"):
                check_finite(desired, "desired conditioning")

            def attempt_images(pending, attempt):
                strength = escalated_strength(desired_strength, attempt, growth)
                with user_input("NudgeRegenerate", "desired_positive"):
                    moved = [[toward_desired(c, desired, strength), dict(extra)] for c, extra in positive]
                # (Nearly) the whole trajectory again: the copy is decided in the first steps.
                start = samples[[rows[k] for k in pending]]
                if attempt == 0 and desired_denoise < 1.0:
                    return sample(start, attempt, moved, desired_denoise)
                return sample(torch.zeros_like(start), attempt, moved, 1.0)

            result = retry_until_clear(len(rows), attempt_images, test, max_attempts=max_attempts)
        else:
            settings = NudgeSettings(alpha=0.0, beta=beta, proximity=proximity, steps=nudge_steps,
                                     learning_rate=learning_rate, aggregate="max")

            def regenerate(nudged, attempt):
                return sample(nudged, attempt, positive, denoise * denoise_decay ** attempt)

            # The matched items at this latent's size (re-encoded by the VAE when the set was built at another).
            undesired = set_latents_for("NudgeRegenerate", "verdicts", matched, samples, vae, "guarded")
            with user_input("NudgeRegenerate", "latent"):
                result = regenerate_until_clear(samples[rows], undesired, settings, regenerate, test,
                                                max_attempts=max_attempts, growth=growth)
        # By the filter's own threshold, as ConditionalRegenerate re-tests it (the margin only decides
        # whether another attempt is made).
        lines = [f"image {b}: {'STILL A COPY' if result.distances[k] < verdicts.threshold else 'escaped'} after "
                 f"{result.attempts[k]} attempt(s), distance {verdicts.distances[b]:.4f} -> {result.distances[k]:.4f}"
                 for k, b in enumerate(rows)]
        report = "\n".join(lines)
        return io.NodeOutput(result.images, {"samples": result.latents}, report, ui={"text": [report]})


NODES = [NudgeRegenerate]
