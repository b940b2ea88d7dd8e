"""Per-image memorization verdicts and the per-image merge that ConditionalRegenerate does."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .embedding_set import EmbeddingSet
from .errors import NudgeInputError
from .tiled_l2 import DEFAULT_GRID, comparison_size, image_tiles, tiled_l2_from_tiles, to_comparison

PASSED, REGENERATED, STILL_FLAGGED = "passed", "regenerated", "still flagged"
DEFAULT_THRESHOLD = 0.1  # Carlini et al. (2023)


@dataclass
class Verdict:
    """What MemorizationFilter decided about each image of a batch."""

    flagged: list[bool]
    distances: list[float]
    nearest: list[str]
    nearest_index: list[int]
    threshold: float
    guarded: EmbeddingSet = field(repr=False)
    clip_cosines: list[float] | None = None
    clip_threshold: float | None = None
    # A guard index checked too (index_guard.IndexGuard; anything with check(images, threshold) ->
    # (distances, indices), a label and a length): `guarded` then holds the set, if any, and of the
    # index only the items matched, and recheck searches the whole index again. distance_at_least[b]
    # is True where no item was within the threshold and no set gave a distance: distances[b] then
    # holds the threshold, a lower bound.
    index: object | None = field(default=None, repr=False)
    distance_at_least: list[bool] | None = None

    @property
    def any_flagged(self) -> bool:
        return any(self.flagged)

    def recheck(self, images: torch.Tensor) -> tuple[list[bool], list[float]]:
        """(flagged, distance) of each image against everything this verdict was decided on: the
        guarded set (with the matched index items) and, when there is one, the whole guard index."""
        n = images.shape[0]
        flagged, distances = [False] * n, [math.inf] * n
        if len(self.guarded):
            again = check_pixels(images, self.guarded, self.threshold)
            flagged, distances = list(again.flagged), list(again.distances)
        if self.index is not None:
            index_distances, index_items = self.index.check(images, self.threshold)
            for k in range(n):
                if index_items[k] >= 0:
                    flagged[k] = True
                    distances[k] = min(distances[k], float(index_distances[k]))
        # Unknown beyond the threshold (nothing guarded within it): the threshold, a lower bound.
        return flagged, [d if math.isfinite(d) else float(self.threshold) for d in distances]

    def matched_set(self) -> EmbeddingSet:
        """The guarded items that flagged images matched, each tagged with its image."""
        owners = [b for b, hit in enumerate(self.flagged) if hit]
        return self.guarded.subset([self.nearest_index[b] for b in owners], owners=owners)

    def at_least(self, b: int) -> bool:
        return bool(self.distance_at_least and self.distance_at_least[b])

    def as_json(self) -> dict:
        images = []
        for b, hit in enumerate(self.flagged):
            entry = {"index": b, "flagged": hit, "distance": round(self.distances[b], 5), "nearest": self.nearest[b]}
            if self.at_least(b):
                entry["at_least"] = True
            if self.clip_cosines is not None:
                entry["clip_cosine"] = round(self.clip_cosines[b], 5)
            images.append(entry)
        out = {"threshold": self.threshold, "any_flagged": self.any_flagged, "images": images}
        if self.index is not None:
            out["guard_index"] = {"name": self.index.label, "items": len(self.index)}
        return out


def check_pixels(images: torch.Tensor, guarded: EmbeddingSet, threshold: float, grid: int = DEFAULT_GRID,
                 clip_embeds: torch.Tensor | None = None, clip_threshold: float | None = None) -> Verdict:
    """Tiled-L2 test of each image against every guarded pixel copy (and the optional CLIP check)."""
    if len(guarded) == 0:
        raise NudgeInputError("the guarded set is empty; build it from at least one image")
    if guarded.pixels is None:
        raise NudgeInputError("the guarded set holds no pixel copies, so the tiled-L2 test cannot run; "
                              "rebuild it with store_pixels on")
    if not torch.isfinite(images).all():
        raise NudgeInputError("the images contain NaN or infinite values; check the VAE decode before this node")
    if images.ndim != 4 or images.shape[-1] < 3:
        raise NudgeInputError(f"images must be [batch, height, width, 3] (ComfyUI IMAGE), got {tuple(images.shape)}")
    # Any generation size: both sides are compared at the comparison size (see tiled_l2).
    hw = comparison_size(tuple(images.shape[1:3]), guarded.image_size)
    if min(hw) < grid:
        raise NudgeInputError(f"images of {images.shape[2]}x{images.shape[1]} are smaller than the {grid}x{grid} tile grid")
    matrix = tiled_l2_from_tiles(image_tiles(to_comparison(images, hw), grid),
                                 guarded.comparison_tiles(hw, grid, images.device))
    distance, index = (t.cpu() for t in matrix.min(dim=1))
    flagged = [bool(d < threshold) for d in distance]
    cosines = None
    if clip_embeds is not None and guarded.clip_embeds is not None and clip_threshold is not None:
        a = torch.nn.functional.normalize(clip_embeds.float().cpu().flatten(1), dim=1)  # the set's are on the CPU
        b = torch.nn.functional.normalize(guarded.clip_embeds.float().flatten(1), dim=1)
        if a.shape[1] != b.shape[1]:
            raise NudgeInputError(f"the CLIP vision model gives {a.shape[1]}-d embeddings but the set holds "
                                  f"{b.shape[1]}-d ones; use the CLIP vision model the set was built with")
        best, best_index = (a @ b.T).max(dim=1)
        cosines = [float(c) for c in best]
        for i, c in enumerate(cosines):
            if c >= clip_threshold and not flagged[i]:
                flagged[i] = True
                index[i] = best_index[i]
    return Verdict(flagged=flagged, distances=[float(d) for d in distance],
                   nearest=[guarded.names[int(i)] for i in index], nearest_index=[int(i) for i in index],
                   threshold=threshold, guarded=guarded, clip_cosines=cosines, clip_threshold=clip_threshold)


def format_report(verdict: Verdict) -> str:
    lines = [f"threshold {verdict.threshold:g} (tiled L2, max over 4x4 tiles)"]
    if verdict.index is not None:
        lines[0] += f"; guard index '{verdict.index.label}' ({len(verdict.index)} items)"
    for b, hit in enumerate(verdict.flagged):
        mark = "FLAGGED" if hit else "passed"
        extra = f", clip cos {verdict.clip_cosines[b]:.3f}" if verdict.clip_cosines is not None else ""
        if verdict.at_least(b):
            lines.append(f"image {b}: {mark}  no guarded item within {verdict.threshold:g}{extra}")
        else:
            lines.append(f"image {b}: {mark}  distance {verdict.distances[b]:.4f} to '{verdict.nearest[b]}'{extra}")
    lines.append(f"{sum(verdict.flagged)} of {len(verdict.flagged)} flagged")
    return "\n".join(lines)


@dataclass
class MergeResult:
    images: torch.Tensor
    statuses: list[str]
    distances_after: list[float | None]


def merge_regenerated(original: torch.Tensor, verdict: Verdict, regenerated: torch.Tensor | None) -> MergeResult:
    """Replace only the flagged images, and re-test each replacement against the guarded set.

    A replacement that still matches is kept but reported as STILL_FLAGGED: never silently.
    """
    if original.shape[0] != len(verdict.flagged):
        raise NudgeInputError(f"{original.shape[0]} images but the verdicts cover {len(verdict.flagged)}; "
                              "connect the same image batch that went into MemorizationFilter")
    if not verdict.any_flagged:
        return MergeResult(original, [PASSED] * len(verdict.flagged), [None] * len(verdict.flagged))
    if regenerated is None:
        raise NudgeInputError("images were flagged but no regenerated images are connected")
    if regenerated.shape[1:] != original.shape[1:]:
        raise NudgeInputError(f"regenerated images are {tuple(regenerated.shape[1:3])} but the originals are "
                              f"{tuple(original.shape[1:3])}; regenerate at the same size")
    if regenerated.shape[0] not in (original.shape[0], sum(verdict.flagged)):
        raise NudgeInputError(f"regenerated batch has {regenerated.shape[0]} images; expected {original.shape[0]} "
                              f"(whole batch) or {sum(verdict.flagged)} (flagged only)")
    whole_batch = regenerated.shape[0] == original.shape[0]
    flagged_rows = [b for b, hit in enumerate(verdict.flagged) if hit]
    out = original.clone()
    statuses = [PASSED] * len(verdict.flagged)
    after: list[float | None] = [None] * len(verdict.flagged)
    replacements = regenerated[flagged_rows] if whole_batch else regenerated
    # Against everything the verdict was decided on (a guard index's every item included).
    still, distances = verdict.recheck(replacements.to(original.device))
    for k, b in enumerate(flagged_rows):
        out[b] = replacements[k].to(out.dtype)
        statuses[b] = STILL_FLAGGED if still[k] else REGENERATED
        after[b] = distances[k]
    return MergeResult(out, statuses, after)
