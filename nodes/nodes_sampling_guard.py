"""Single-pass guard: detect and turn away inside the sampler, for KSampler (MODEL) and
SamplerCustomAdvanced (GUIDER). ComfyUI's samplers, schedulers and CFG are left as they are:
the guard only rewrites the post-CFG prediction of images that come close to a guarded item."""
from __future__ import annotations

import logging

import comfy.samplers
from comfy_api.latest import io

from ..nudging_core.conditioning_nudge import match_token_length, toward_desired
from ..nudging_core.embedding_set import check_latent_compatible
from ..nudging_core.errors import NudgeInputError
from ..nudging_core.nudge import check_finite
from ..nudging_core.sampling_guard import GuardSettings, SamplingGuard
from ..nudging_core.tiled_l2 import tiled_l2
from .common import CATEGORY, EmbeddingSetType, desired_prompt_inputs, desired_tensor, user_input


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
                             "image still decodes to a copy and only keeps the latent below cos_threshold."),
    ] + desired_prompt_inputs(
        "A caught image then continues with its prompt moved toward this one (desired_strength) and becomes a new "
        "image; without it the guard turns the prediction, which often leaves a smeared copy.",
        "How far a caught image's prompt embedding moves toward desired_positive (0 = not at all, 1 = the desired "
        "prompt itself).")


def guarded_model(node_id, model, guarded_set, cos_threshold, start_percent, end_percent, pixel_checks,
                  copy_threshold, vae=None, desired_positive=None, desired_strength=0.75):
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
        if tuple(denoised.shape[1:]) != tuple(guard.items.shape[1:]):
            with user_input(node_id, "guarded_set"):
                check_latent_compatible(guarded_set, inner.process_out(denoised), "guarded")
        sigma = float(args["sigma"].max())
        before = len(guard.caught)
        out = guard(denoised, sigma, in_window=sigma_end <= sigma <= sigma_start,
                    check_pixels=in_last_calls(args, sigma, pixel_checks))
        if len(guard.caught) > before:
            logging.info("[%s] guard caught images %s at sigma %.3f", node_id, sorted(guard.caught), sigma)
        return out

    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(post_cfg)
    if desired_positive is not None:
        desired = desired_tensor(node_id, desired_positive)
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
    """Decode turned predictions; the tiled L2 of each to its item's pixels."""
    references = {}
    stored = guarded_set.pixels_float() if guarded_set.pixels is not None else None

    def reference(index, size):
        """The item's pixels as float32 on the CPU, converted once per item."""
        if index not in references:
            pixels = stored
            if pixels is None or tuple(pixels.shape[1:3]) != size:
                # No stored copy at this size: the item's own latent, decoded by this VAE.
                pixels = vae.decode(guarded_set.latents[index:index + 1]).reshape(1, *size, -1)[:, :, :, :3]
                index_in = 0
            else:
                index_in = index
            references[index] = pixels[index_in].float().cpu()
        return references[index]

    def check(latents, items):
        with user_input(node_id, "vae"):
            images = vae.decode(latent_format.process_out(latents.clone()))
            images = images.reshape(latents.shape[0], images.shape[-3], images.shape[-2], images.shape[-1])
            size = tuple(images.shape[1:3])
            return [tiled_l2(images[k, :, :, :3].float().cpu(), reference(j, size))
                    for k, j in enumerate(items)]

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
        guider = comfy.samplers.CFGGuider(guarded_model("MemorizationGuardGuider", model, vae=vae, **settings))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES = [MemorizationGuardModel, MemorizationGuardGuider]
