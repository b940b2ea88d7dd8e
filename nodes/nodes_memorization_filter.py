"""MemorizationFilter: flags generated images that reproduce a guarded image (Carlini's tiled L2),
from a guarded set, a guard index (millions of items), or both."""
from __future__ import annotations

import json

from comfy_api.latest import io

from ..nudging_core.index_guard import add_index
from ..nudging_core.memorization import DEFAULT_THRESHOLD, check_pixels, format_report
from .common import CATEGORY, EmbeddingSetType, GuardIndexType, NudgeNodeError, VerdictType, check_inputs, user_input


class MemorizationFilter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemorizationFilter",
            display_name="Memorization Filter (Nudging)",
            category=CATEGORY,
            description="Compares each generated image with a guarded set, a guard index (up to millions of items), "
                        "or both, using Carlini et al.'s tiled L2 (max over 4x4 tiles of the per-tile RMS difference). "
                        "An image closer than the threshold is flagged. Outputs per-image verdicts, whether anything "
                        "fired and the matched items to push from.",
            inputs=[
                io.Image.Input("images", tooltip="The generated images to check."),
                EmbeddingSetType.Input("guarded_set", optional=True,
                                       tooltip="Images that must not be reproduced (needs pixel copies), from Load "
                                               "Embedding Set. Connect this, guard_index, or both."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=1.0, step=0.005,
                               tooltip="Tiled-L2 distance below which an image counts as a copy (0.1 in the paper)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional: also flag images whose CLIP embedding is close to the set's "
                                            "(only when the set carries CLIP embeddings)."),
                io.Float.Input("clip_threshold", default=0.95, min=0.0, max=1.0, step=0.005, optional=True,
                               tooltip="CLIP cosine at or above which an image is flagged (used with clip_vision)."),
                GuardIndexType.Input("guard_index", optional=True,
                                     tooltip="Optional: a guard index from Load Guard Index (millions of guarded "
                                             "images, checked exactly at the same threshold). A match flags the image "
                                             "as a set match does."),
            ],
            outputs=[
                VerdictType.Output(display_name="verdicts", tooltip="Per-image verdicts for ConditionalRegenerate."),
                io.Boolean.Output(display_name="any_flagged", tooltip="True when at least one image was flagged."),
                io.Int.Output(display_name="flagged_count", tooltip="How many images were flagged."),
                EmbeddingSetType.Output(display_name="matched_set",
                                        tooltip="The guarded items the flagged images matched: the set to push from."),
                io.String.Output(display_name="report", tooltip="A readable report, one line per image."),
            ],
            # An output node: its verdict is shown (and the check runs) even when nothing downstream uses it.
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, threshold, guarded_set=None, clip_vision=None, clip_threshold=0.95,
                guard_index=None) -> io.NodeOutput:
        check_inputs(cls, locals())
        if guarded_set is None and guard_index is None:
            raise NudgeNodeError("MemorizationFilter: input 'guarded_set': nothing to check against; connect a "
                                 "guarded set (Load Embedding Set), a guard index to guard_index (Load Guard Index), "
                                 "or both")
        verdict = None
        if guarded_set is not None:
            clip_embeds = None
            if clip_vision is not None and guarded_set.clip_embeds is not None:
                clip_embeds = clip_vision.encode_image(images).image_embeds
            with user_input("MemorizationFilter", "images / guarded_set"):
                verdict = check_pixels(images, guarded_set, threshold, clip_embeds=clip_embeds,
                                       clip_threshold=clip_threshold if clip_embeds is not None else None)
        if guard_index is not None:
            # A match in the index flags the image like a set match; the verdict carries the matched items.
            with user_input("MemorizationFilter", "images / guard_index"):
                verdict = add_index(verdict, images, guard_index, threshold)
        report = format_report(verdict)
        ui = {"text": [report], "nudging_verdicts": [json.dumps(verdict.as_json())]}
        return io.NodeOutput(verdict, verdict.any_flagged, sum(verdict.flagged), verdict.matched_set(), report, ui=ui)


NODES = [MemorizationFilter]
