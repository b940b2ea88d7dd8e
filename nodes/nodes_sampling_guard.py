"""Single-pass guard: detect and turn away inside the sampler, for KSampler (MODEL) and
SamplerCustomAdvanced (GUIDER). ComfyUI's samplers, schedulers and CFG are left as they are:
the guard only rewrites the post-CFG prediction of images that come close to a guarded item."""
from __future__ import annotations

import logging

import comfy.patcher_extension
import comfy.samplers
import torch
from comfy_api.latest import io

from ..nudging_core.conditioning_nudge import match_token_length, toward_desired
from ..nudging_core.errors import NudgeInputError
from ..nudging_core.nudge import check_finite
from ..nudging_core.sampling_guard import GuardSettings, SamplingGuard
from ..nudging_core.tiled_l2 import (DEFAULT_GRID, comparison_size, image_tiles, tiled_l2, tiled_l2_from_tiles,
                                     to_comparison)
from .common import (CATEGORY, EmbeddingSetType, NudgeNodeError, check_inputs, desired_prompt_inputs, desired_tensor,
                     set_latents_for, user_input)


def guard_inputs() -> list:
    return [
        EmbeddingSetType.Input("guarded_set", tooltip="Images the sampler must not converge to."),
        io.Float.Input("cos_threshold", default=0.9, min=0.0, max=1.0, step=0.005,
                       tooltip="Cosine (in latent space) between the sampler's predicted clean latent and a "
                               "guarded latent at which the guard catches that image. A caught prediction is "
                               "turned away from its item until its cosine is back at this value."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Where in the schedule the guard starts watching (0 = first step)."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Where in the schedule it stops (1 = last step)."),
        io.Int.Input("pixel_checks", default=4, min=0, max=50,
                     tooltip="With a VAE connected: at most this many decodes per caught image, in the last steps. "
                             "While the turned prediction still decodes to a copy, the guard turns it further. "
                             "Prompts that are never caught decode nothing."),
        io.Float.Input("copy_threshold", default=0.1, min=0.0, max=10.0, step=0.005,
                       tooltip="Tiled L2 below which a decoded prediction counts as a copy (as in MemorizationFilter)."),
        io.Vae.Input("vae", optional=True,
                     tooltip="The graph's VAE. Optional, but without it the guard cannot see whether a turned "
                             "image still decodes to a copy and only keeps the latent below cos_threshold. With it, "
                             "a set built at another image size guards this one too (re-encoded once per size)."),
    ] + desired_prompt_inputs(
        "A caught image then continues with its prompt moved toward this one (desired_strength) and becomes a new "
        "image; without it the guard turns the prediction, which often leaves a smeared copy.",
        "How far a caught image's prompt embedding moves toward desired_positive (0 = not at all, 1 = the desired "
        "prompt itself).")


def guarded_model(node_id, model, guarded_set, cos_threshold, start_percent, end_percent, pixel_checks,
                  copy_threshold, vae=None, desired_positive=None, desired_strength=0.9):
    """A clone of `model` whose post-CFG prediction passes through a SamplingGuard (and, with a
    desired prompt, whose model calls give caught images the moved conditioning)."""
    with user_input(node_id, "guarded_set"):
        if len(guarded_set) == 0:
            raise NudgeInputError("the guarded set is empty; build it from at least one image")
        check_finite(guarded_set.latents, "guarded set")
    settings = GuardSettings(cos_threshold=cos_threshold, pixel_checks=pixel_checks, copy_threshold=copy_threshold)
    inner = model.get_model_object("latent_format")
    check = None if vae is None or pixel_checks == 0 else pixel_check(node_id, vae, inner, guarded_set)
    guard = SamplingGuard(inner.process_in(guarded_set.latents.clone()), settings, pixel_check=check,
                          switching=desired_positive is not None)
    sampling = model.get_model_object("model_sampling")
    sigma_start = float(sampling.percent_to_sigma(start_percent))
    sigma_end = float(sampling.percent_to_sigma(end_percent))

    def post_cfg(args):
        denoised = args["denoised"]
        if not torch.isfinite(denoised).all():
            raise NudgeNodeError(f"{node_id}: input 'model': the sampler's prediction holds NaN or infinite values "
                                 f"(sigma {float(args['sigma'].max()):.3f}); check the model, its LoRAs and the "
                                 "conditioning (a NaN usually comes from fp16 overflow: try --force-fp32)")
        if tuple(denoised.shape[1:]) != tuple(guard.items.shape[1:]):
            # Another generation size: the set at this size (re-encoded by the VAE, once per size).
            items = set_latents_for(node_id, "guarded_set", guarded_set, inner.process_out(denoised), vae, "guarded")
            guard.use_items(inner.process_in(items.clone()))
        sigma = float(args["sigma"].max())
        before = len(guard.caught)
        out = guard(denoised, sigma, in_window=sigma_end <= sigma <= sigma_start,
                    check_pixels=in_last_calls(args, sigma, pixel_checks))
        if len(guard.caught) > before:
            logging.info("[%s] guard caught images %s at sigma %.3f", node_id, sorted(guard.caught), sigma)
        return out

    def fresh_run(executor, *args, **kwargs):
        # The guard lives in the MODEL (or GUIDER) output, which ComfyUI caches between prompts: without
        # this, the images the last run caught or switched (also a run that was interrupted or failed)
        # would be switched again at the next run's first model call, before the guard sees a prediction.
        guard.reset()
        return executor(*args, **kwargs)

    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "embedding_nudging_guard", fresh_run)
    patched.set_model_sampler_post_cfg_function(post_cfg)
    if desired_positive is not None:
        desired = desired_tensor(node_id, desired_positive)
        with user_input(node_id, "desired_positive"):
            check_finite(desired, "desired conditioning")
        previous = patched.model_options.get("model_function_wrapper")
        patched.set_model_unet_function_wrapper(switching_wrapper(node_id, guard, desired, desired_strength, previous))
    return patched


def switching_wrapper(node_id, guard, desired, strength, previous=None):
    """A model wrapper that gives every image the guard switched its prompt moved toward `desired`
    (the positive rows only: the negative prompt stays as it is)."""

    def wrapper(apply_model, args):
        cross = args["c"].get("c_crossattn")
        chunks = args.get("cond_or_uncond") or []
        if guard.switched and cross is not None and chunks and args["input"].shape[0] % len(chunks) == 0:
            per = args["input"].shape[0] // len(chunks)
            rows = [i * per + b for i, kind in enumerate(chunks) if kind == 0 for b in guard.switched if b < per]
            if rows:
                with user_input(node_id, "positive"):      # NaN can arrive mid-pass (a timestep-ranged prompt)
                    check_finite(cross[rows], "positive conditioning")
                with user_input(node_id, "desired_positive"):
                    cross, target = match_token_length(cross.clone(), desired.to(cross.device, cross.dtype))
                    cross[rows] = toward_desired(cross[rows], target, strength)
                args = dict(args, c=dict(args["c"], c_crossattn=cross))
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    return wrapper


def in_last_calls(args, sigma: float, count: int) -> bool:
    """Is this model call among the run's last `count` noise levels? The guard decodes only there,
    where the prediction is as sharp as the final image. Without the schedule (a sampler that
    does not pass it on), every call may check, within the per-image budget."""
    sigmas = args.get("model_options", {}).get("transformer_options", {}).get("sample_sigmas")
    if sigmas is None or count <= 0:
        return count > 0
    levels = sigmas[sigmas > 0]
    return len(levels) == 0 or sigma <= float(levels[-min(count, len(levels))]) * 1.0001


def pixel_check(node_id, vae, latent_format, guarded_set):
    """Decode turned predictions; the tiled L2 of each to its item's pixel copy, compared at the
    comparison size as MemorizationFilter does (any generation size). A set without copies: the
    item's own latent, decoded by this VAE once."""
    decoded = {}

    def check(latents, items):
        with user_input(node_id, "vae"):
            images = vae.decode(latent_format.process_out(latents.clone()))
            images = images.reshape(latents.shape[0], *images.shape[-3:])[..., :3].float().cpu()
            # A NaN distance would compare as "not a copy" and end the checks: refuse it instead.
            check_finite(images, "decoded prediction (the VAE's output)")
            if guarded_set.pixels is not None:
                hw = comparison_size(tuple(images.shape[1:3]), guarded_set.image_size)
                ours, theirs = image_tiles(to_comparison(images, hw)), guarded_set.comparison_tiles(hw, DEFAULT_GRID)
                return [float(tiled_l2_from_tiles([t[k:k + 1] for t in ours], [t[j:j + 1] for t in theirs]))
                        for k, j in enumerate(items)]
            for j in set(items) - decoded.keys():
                decoded[j] = vae.decode(guarded_set.latents[j:j + 1]).reshape(1, *images.shape[1:3], -1)[0, ..., :3]
            return [tiled_l2(images[k], decoded[j].float().cpu()) for k, j in enumerate(items)]

    return check


class MemorizationGuardModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemorizationGuardModel",
            display_name="Memorization Guard (Model, single pass)",
            category=CATEGORY,
            description="Patches the MODEL for KSampler: at every step the predicted clean latent is compared with "
                        "the guarded set; when an image comes too close it is turned away inside the same pass "
                        "(LatentNudge's objective in closed form, no extra UNet work) until it is back at "
                        "cos_threshold. With the VAE connected, its last predictions are decoded and turned "
                        "further while they still decode to a copy. With a desired prompt connected (recommended), "
                        "a caught image is not turned: it continues with its prompt moved toward the desired one "
                        "and becomes a new image of it, still in the same pass. Prompts that never come close run "
                        "unchanged. Check the final image with MemorizationFilter: a guard that failed is reported "
                        "there.",
            inputs=[io.Model.Input("model", tooltip="The model to guard.")] + guard_inputs(),
            outputs=[io.Model.Output(display_name="model", tooltip="The guarded model.")],
        )

    @classmethod
    def execute(cls, model, vae=None, **settings) -> io.NodeOutput:
        check_inputs(cls, dict(settings, model=model, vae=vae))
        return io.NodeOutput(guarded_model("MemorizationGuardModel", model, vae=vae, **settings))


class MemorizationGuardGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemorizationGuardGuider",
            display_name="Memorization Guard (Guider, single pass)",
            category=CATEGORY,
            description="A CFG guider for SamplerCustomAdvanced with the single-pass memorization guard built in "
                        "(same behaviour as Memorization Guard (Model)).",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with."),
                io.Conditioning.Input("positive", tooltip="Positive conditioning."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="Classifier-free guidance scale."),
            ] + guard_inputs(),
            outputs=[io.Guider.Output(display_name="guider", tooltip="Use with SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, vae=None, **settings) -> io.NodeOutput:
        check_inputs(cls, dict(settings, model=model, positive=positive, negative=negative, cfg=cfg, vae=vae))
        guider = comfy.samplers.CFGGuider(guarded_model("MemorizationGuardGuider", model, vae=vae, **settings))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES = [MemorizationGuardModel, MemorizationGuardGuider]
