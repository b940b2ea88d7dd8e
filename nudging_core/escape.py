"""Nudge, regenerate, re-test — and try again harder for the images that are still copies.

`retry_until_clear` is the loop; `regenerate_until_clear` is its latent-nudge form (the
conditioning form lives in NudgeRegenerate, which moves the prompt toward a desired one).

A memorizing model pulls a nudged latent back toward the memorized image while it denoises,
so one nudge of fixed strength escapes for some seeds and not for others. This loop keeps the
nudge as small as it can be: each attempt multiplies beta and the step size by `growth` (a
stronger push from the matched item against the same proximity pull, and the step budget to
get there), and only images that are still copies pay for another attempt. Sampling and
decoding are passed in (with the attempt number, so the caller can also re-noise less each
time, as NudgeRegenerate's denoise_decay does), so the loop itself is pure torch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from .nudge import NudgeSettings, nudge_latents


@dataclass
class EscapeResult:
    images: torch.Tensor            # one regenerated image per input latent
    latents: torch.Tensor           # the regenerated latents
    attempts: list[int]             # attempts each image took
    still_copy: list[bool]          # True when no attempt escaped
    distances: list[float]          # final distance of each image to its nearest guarded item


def retry_until_clear(
    count: int,
    attempt_images: Callable[[list[int], int], tuple[torch.Tensor, torch.Tensor]],
    test: Callable[[torch.Tensor], tuple[list[bool], list[float]]],
    max_attempts: int = 4,
    on_attempt: Callable[[int, int], None] | None = None,
) -> EscapeResult:
    """The adaptive loop over `count` flagged images: attempt k makes new images for the rows still
    pending (attempt_images(rows, k) -> (images, latents)), test(images) -> (is_copy, distance);
    only the rows that are still copies pay for another attempt."""
    images: list[torch.Tensor | None] = [None] * count
    final_latents: list[torch.Tensor | None] = [None] * count
    attempts, still_copy, distances = [0] * count, [True] * count, [0.0] * count
    pending = list(range(count))
    for attempt in range(max(1, max_attempts)):
        if not pending:
            break
        if on_attempt is not None:
            on_attempt(attempt, len(pending))
        new_images, new_latents = attempt_images(pending, attempt)
        is_copy, distance = test(new_images)
        still_pending = []
        for k, row in enumerate(pending):
            images[row], final_latents[row] = new_images[k], new_latents[k]
            attempts[row], still_copy[row], distances[row] = attempt + 1, is_copy[k], distance[k]
            if is_copy[k]:
                still_pending.append(row)
        pending = still_pending
    return EscapeResult(torch.stack(images), torch.stack(final_latents), attempts, still_copy, distances)


def regenerate_until_clear(
    latents: torch.Tensor,
    undesired: torch.Tensor,
    settings: NudgeSettings,
    regenerate: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    test: Callable[[torch.Tensor], tuple[list[bool], list[float]]],
    max_attempts: int = 4,
    growth: float = 2.0,
    desired: torch.Tensor | None = None,
    on_attempt: Callable[[int, int], None] | None = None,
) -> EscapeResult:
    """latents [B, ...]: the flagged images' latents; undesired [B, ...]: each one's matched item.

    regenerate(nudged_latents, attempt) -> (images, latents); test(images) -> (is_copy, distance).
    """

    def attempt_images(pending: list[int], attempt: int):
        stronger = replace(settings, beta=settings.beta * growth ** attempt,
                           learning_rate=settings.learning_rate * growth ** attempt)
        nudged = nudge_latents(latents[pending], undesired[pending], stronger, desired=desired,
                               undesired_owners=list(range(len(pending)))).latents
        return regenerate(nudged, attempt)

    return retry_until_clear(latents.shape[0], attempt_images, test, max_attempts, on_attempt)
