"""ConditionalRegenerate: swaps in regenerated images for flagged ones only, computing the branch lazily."""
from __future__ import annotations

import json

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..nudging_core.memorization import PASSED, STILL_FLAGGED, Verdict, merge_regenerated
from ..nudging_core.preview_retention import PREVIEW_NODES_KEPT, PREVIEW_RUNS_KEPT, PreviewRetention
from .common import CATEGORY, VerdictType, check_inputs, user_input

STILL_FLAGGED_ACTIONS = ("report", "blank")

# Before/after previews go to ComfyUI's temp/, which ComfyUI empties only at startup: a server left
# running wrote one file per image per flagged run (202 in a 300-prompt soak). Each node keeps the
# previews of its last PREVIEW_RUNS_KEPT runs that wrote any and deletes its own older ones; up to
# PREVIEW_NODES_KEPT node ids are remembered (nudging_core/preview_retention.py).
_previews = PreviewRetention(PREVIEW_RUNS_KEPT, PREVIEW_NODES_KEPT)   # server-lifetime, like temp/ itself


class ConditionalRegenerate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConditionalRegenerate",
            display_name="Conditional Regenerate (Nudging)",
            category=CATEGORY,
            description="Passes clean images through and replaces each flagged image with its regenerated version. "
                        "The regenerated branch is only computed when something was flagged. Every replacement is "
                        "tested again: an image that is still a copy is reported as 'still flagged', never silently.",
            inputs=[
                VerdictType.Input("verdicts", tooltip="MemorizationFilter's verdicts for the original images."),
                io.Image.Input("images", tooltip="The original images that went into MemorizationFilter."),
                io.Image.Input("regenerated", lazy=True,
                               tooltip="The regenerated images (whole batch, or flagged images only). Evaluated only "
                                       "when at least one image was flagged."),
                io.Combo.Input("still_flagged_action", options=list(STILL_FLAGGED_ACTIONS), default="report",
                               tooltip="What to do with a regenerated image that is still a copy: 'report' keeps it "
                                       "and says so in status and all_clear; 'blank' replaces it with black."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="Clean originals plus regenerated replacements."),
                io.String.Output(display_name="status", tooltip="Per image: passed / regenerated / still flagged."),
                io.Boolean.Output(display_name="all_clear", tooltip="False when any output image is still flagged."),
                io.Int.Output(display_name="regenerated_count", tooltip="How many images were replaced."),
            ],
            hidden=[io.Hidden.unique_id],   # the node id its previews are kept under
        )

    @classmethod
    def check_lazy_status(cls, verdicts, images, still_flagged_action, regenerated=None):
        # Not a Verdict (a literal in an API prompt): execute refuses it, naming the input.
        if isinstance(verdicts, Verdict) and verdicts.any_flagged and regenerated is None:
            return ["regenerated"]
        return []

    @classmethod
    def execute(cls, verdicts, images, still_flagged_action, regenerated=None) -> io.NodeOutput:
        check_inputs(cls, locals())
        with user_input("ConditionalRegenerate", "regenerated"):
            merged = merge_regenerated(images, verdicts, regenerated)
        out = merged.images
        if still_flagged_action == "blank":
            out = out.clone()
            for b, status in enumerate(merged.statuses):
                if status == STILL_FLAGGED:
                    out[b] = 0.0
        lines = []
        for b, status in enumerate(merged.statuses):
            line = f"image {b}: {status}"
            if merged.distances_after[b] is not None:
                line += f" (distance {verdicts.distances[b]:.4f} -> {merged.distances_after[b]:.4f})"
            if status == STILL_FLAGGED and still_flagged_action == "blank":
                line += ", blanked"
            lines.append(line)
        status_text = "\n".join(lines)
        all_clear = STILL_FLAGGED not in merged.statuses
        replaced = [b for b, s in enumerate(merged.statuses) if s != PASSED]
        details = {"statuses": merged.statuses, "distances_before": verdicts.distances,
                   "distances_after": merged.distances_after, "threshold": verdicts.threshold,
                   "replaced": replaced}
        ui_out = {"text": [status_text], "nudging_status": [json.dumps(details)]}
        if replaced:
            # Before/after thumbnails: the flagged originals, then their replacements.
            pairs = torch.cat([images[replaced], out[replaced]], dim=0)
            preview = ui.PreviewImage(pairs, cls=cls).as_dict()
            _previews.keep(cls.hidden.unique_id, preview["images"], folder_paths.get_temp_directory())
            ui_out.update(preview)
        return io.NodeOutput(out, status_text, all_clear, len(replaced), ui=ui_out)


NODES = [ConditionalRegenerate]
