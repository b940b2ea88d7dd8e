"""Single-pass guard: detect and nudge inside the sampler, for KSampler (MODEL) and
SamplerCustomAdvanced (GUIDER). ComfyUI's samplers, schedulers and CFG are left as they are:
the guard only rewrites the post-CFG prediction of images that come close to a guarded item."""
from __future__ import annotations

import logging

import comfy.samplers
from comfy_api.latest import io

from ..nudging_core.embedding_set import check_latent_compatible
from ..nudging_core.errors import NudgeInputError
from ..nudging_core.nudge import NudgeSettings, check_finite
from ..nudging_core.sampling_guard import GuardSettings, SamplingGuard
from .common import CATEGORY, EmbeddingSetType, user_input


def guard_inputs() -> list:
    return [
        EmbeddingSetType.Input("guarded_set", tooltip="Images the sampler must not converge to."),
        io.Float.Input("cos_threshold", default=0.9, min=0.0, max=1.0, step=0.005,
                       tooltip="Cosine (in latent space) between the sampler's predicted clean latent and a "
                               "guarded latent at which the guard starts nudging that image."),
        io.Float.Input("beta", default=1.0, min=0.0, max=100.0, step=0.05,
                       tooltip="Weight of the push away from the guarded item."),
        io.Float.Input("proximity", default=0.1, min=0.0, max=100.0, step=0.01,
                       tooltip="Weight of staying close to the sampler's own prediction."),
        io.Int.Input("steps", default=10, min=1, max=1000, tooltip="Gradient steps per sampler step (no UNet pass)."),
        io.Float.Input("learning_rate", default=0.05, min=0.0, max=10.0, step=0.005,
                       tooltip="Adam step size per gradient step, in units of the prediction's standard deviation."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Where in the schedule the guard starts watching (0 = first step)."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Where in the schedule it stops (1 = last step)."),
    ]


def guarded_model(node_id, model, guarded_set, cos_threshold, beta, proximity, steps, learning_rate,
                  start_percent, end_percent):
    """A clone of `model` whose post-CFG prediction passes through a SamplingGuard."""
    with user_input(node_id, "guarded_set"):
        if len(guarded_set) == 0:
            raise NudgeInputError("the guarded set is empty; build it from at least one image")
        check_finite(guarded_set.latents, "guarded set")
    settings = GuardSettings(cos_threshold=cos_threshold, nudge=NudgeSettings(
        alpha=0.0, beta=beta, proximity=proximity, steps=steps, learning_rate=learning_rate, aggregate="max"))
    inner = model.get_model_object("latent_format")
    guard = SamplingGuard(inner.process_in(guarded_set.latents.clone()), settings)
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
        out = guard(denoised, sigma, in_window=sigma_end <= sigma <= sigma_start)
        if len(guard.caught) > before:
            logging.info("[%s] guard caught images %s at sigma %.3f", node_id, sorted(guard.caught), sigma)
        return out

    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(post_cfg)
    return patched


class MemorizationGuardModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemorizationGuardModel",
            display_name="Memorization Guard (Model, single pass)",
            category=CATEGORY,
            description="Patches the MODEL for KSampler: at every step the predicted clean latent is compared with "
                        "the guarded set; when an image comes too close it is nudged away inside the same pass "
                        "(LatentNudge's objective, no extra UNet work). Prompts that never come close run unchanged. "
                        "Check the final image with MemorizationFilter: a guard that failed is reported there.",
            inputs=[io.Model.Input("model", tooltip="The model to guard.")] + guard_inputs(),
            outputs=[io.Model.Output(display_name="model", tooltip="The guarded model.")],
        )

    @classmethod
    def execute(cls, model, **settings) -> io.NodeOutput:
        return io.NodeOutput(guarded_model("MemorizationGuardModel", model, **settings))


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
    def execute(cls, model, positive, negative, cfg, **settings) -> io.NodeOutput:
        guider = comfy.samplers.CFGGuider(guarded_model("MemorizationGuardGuider", model, **settings))
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES = [MemorizationGuardModel, MemorizationGuardGuider]
