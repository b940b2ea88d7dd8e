"""LatentNudge: moves a latent away from undesired items and toward desired ones (the paper's Eq. 2)."""
from __future__ import annotations

import json

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..nudging_core.nudge import AGGREGATES, NudgeSettings, nudge_latents
from .common import CATEGORY, EmbeddingSetType, check_inputs, set_latents_for, user_input


def _slice_latent(latent: dict, samples, rows: list[int] | None) -> dict:
    """A copy of the LATENT dict with new samples; keep only `rows` of per-image extras."""
    out = {k: v for k, v in latent.items() if k not in ("samples", "batch_index")}
    out["samples"] = samples
    if rows is not None:
        mask = latent.get("noise_mask")
        if mask is not None and mask.shape[0] == latent["samples"].shape[0]:
            out["noise_mask"] = mask[rows]
        if "batch_index" in latent:
            out["batch_index"] = [latent["batch_index"][r] for r in rows]
    elif "batch_index" in latent:
        out["batch_index"] = latent["batch_index"]
    return out


class LatentNudge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LatentNudge",
            display_name="Latent Nudge (Nudging)",
            category=CATEGORY,
            description="Optimises the latent by gradient descent (Adam) on beta*cos(z, undesired) - "
                        "alpha*cos(z, desired) + proximity*mean(((z - z0)/std(z0))^2), in SD latent space. When the undesired "
                        "set comes from MemorizationFilter, each image is pushed from its own match and only the "
                        "flagged images are passed on, so the regenerate branch samples only those.",
            inputs=[
                io.Latent.Input("latent", tooltip="The latent to nudge. The example workflows nudge the generated "
                                                  "(denoised) latent, then partly re-noise it when regenerating."),
                EmbeddingSetType.Input("undesired_set", tooltip="Items to push away from (e.g. MemorizationFilter's "
                                                                "matched_set)."),
                EmbeddingSetType.Input("desired_set", optional=True,
                                       tooltip="Optional items to pull toward (e.g. a style to keep)."),
                io.Float.Input("alpha", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of the pull toward the desired set."),
                io.Float.Input("beta", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of the push away from the undesired set."),
                io.Float.Input("proximity", default=0.1, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of staying close to the starting latent (mean squared change, in units of the latent's spread)."),
                io.Int.Input("steps", default=30, min=0, max=100000,
                             tooltip="Gradient steps; each is cheap (no UNet pass)."),
                io.Float.Input("learning_rate", default=0.1, min=0.0, max=10.0, step=0.005,
                               tooltip="Adam step size per element, in units of the latent's standard deviation."),
                io.Combo.Input("aggregate", options=list(AGGREGATES), default="max",
                               tooltip="How each set's cosines combine: max pushes from the nearest item, "
                                       "mean from the set as a whole."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Optional: the graph's VAE. With it, sets built at another image size are "
                                     "re-encoded at this latent's size from their pixel copies (once per set and "
                                     "size); without it, a set must match the latent's size."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="The nudged latent (flagged images only when the "
                                                                "undesired set came from MemorizationFilter)."),
                io.String.Output(display_name="report", tooltip="Cosines to the sets before and after."),
            ],
        )

    @classmethod
    def execute(cls, latent, undesired_set, alpha, beta, proximity, steps, learning_rate, aggregate,
                desired_set=None, vae=None) -> io.NodeOutput:
        check_inputs(cls, locals())
        samples = latent["samples"]
        owners = undesired_set.owners
        if len(undesired_set) == 0:
            note = "undesired set is empty: nothing to push from, latent passed on unchanged"
            return io.NodeOutput(latent, note, ui={"text": [note]})
        undesired = set_latents_for("LatentNudge", "undesired_set", undesired_set, samples, vae, "undesired")
        desired = None if desired_set is None else set_latents_for("LatentNudge", "desired_set", desired_set, samples,
                                                                    vae, "desired")
        if owners is not None and max(owners) >= samples.shape[0]:
            owners = None  # matched against another batch: push every image from every item
        progress = comfy.utils.ProgressBar(max(1, steps))
        report_every = max(1, steps // 100)  # at most ~100 progress messages to the frontend

        def on_step(step, _loss):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if step % report_every == 0 or step == steps:
                progress.update_absolute(step, max(1, steps))

        settings = NudgeSettings(alpha=alpha, beta=beta, proximity=proximity, steps=steps,
                                 learning_rate=learning_rate, aggregate=aggregate)
        with user_input("LatentNudge", "latent"):
            result = nudge_latents(samples, undesired, settings, desired=desired,
                                   undesired_owners=owners, on_step=on_step)
        rows = [b for b, hit in enumerate(result.nudged) if hit] if owners is not None else None
        new_samples = result.latents if rows is None else result.latents[rows]
        lines = []
        for b, hit in enumerate(result.nudged):
            if hit:
                line = f"image {b}: cos to undesired {result.cos_undesired_before[b]:.3f} -> {result.cos_undesired_after[b]:.3f}"
                if result.cos_desired_before[b] is not None:
                    line += f", to desired {result.cos_desired_before[b]:.3f} -> {result.cos_desired_after[b]:.3f}"
                lines.append(line)
        report = "\n".join(lines) or "no image had an undesired item: nothing nudged"
        details = {"nudged": result.nudged, "cos_undesired_before": result.cos_undesired_before,
                   "cos_undesired_after": result.cos_undesired_after}
        return io.NodeOutput(_slice_latent(latent, new_samples, rows), report,
                             ui={"text": [report], "nudging_nudge": [json.dumps(details)]})


NODES = [LatentNudge]
