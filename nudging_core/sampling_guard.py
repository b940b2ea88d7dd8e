"""The single-pass guard: nudge the sampler's predicted clean latent while sampling.

At every model call the sampler's prediction of the clean latent ("denoised", after CFG) is
compared with the guarded latents by cosine. Below `cos_threshold` nothing happens (one small
matrix product per step). Once an image's prediction reaches the threshold, that image is
marked for the rest of the run, and every following prediction of it is nudged with the same
objective as LatentNudge (beta * cos to its guarded item, proximity to the prediction). The
sampler then steps toward the nudged prediction, so the trajectory leaves the memorized image
within the same pass: no second generation, no extra UNet evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .nudge import NudgeSettings, nudge_latents


def default_guard_nudge() -> NudgeSettings:
    """Fewer steps than LatentNudge: the guard nudges again at every sampler step."""
    return NudgeSettings(alpha=0.0, beta=1.0, proximity=0.1, steps=10, learning_rate=0.05, aggregate="max")


@dataclass
class GuardSettings:
    cos_threshold: float = 0.9
    nudge: NudgeSettings = field(default_factory=default_guard_nudge)


@dataclass
class GuardEvent:
    batch_index: int
    item: int
    step_sigma: float
    cos_before: float
    cos_after: float


@dataclass
class SamplingGuard:
    """Called with each prediction; keeps which images it caught during the current run."""

    items: torch.Tensor                      # guarded latents in the model's latent space [M, C, h, w]
    settings: GuardSettings = field(default_factory=GuardSettings)
    caught: dict[int, int] = field(default_factory=dict)
    events: list[GuardEvent] = field(default_factory=list)
    max_cos: list[float] = field(default_factory=list)
    _last_sigma: float | None = None

    def reset(self) -> None:
        self.caught, self.events, self.max_cos, self._last_sigma = {}, [], [], None

    def __call__(self, denoised: torch.Tensor, sigma: float, in_window: bool = True) -> torch.Tensor:
        """in_window: False outside the part of the schedule the guard should act in."""
        if self._last_sigma is not None and sigma > self._last_sigma * 1.0001:
            self.reset()                     # a new sampling run (noise level went back up)
        self._last_sigma = sigma
        if not in_window:
            return denoised
        items = self.items.to(device=denoised.device, dtype=torch.float32)
        flat = torch.nn.functional.normalize(denoised.detach().float().flatten(1), dim=1)
        cos = flat @ torch.nn.functional.normalize(items.flatten(1), dim=1).T
        best, index = cos.max(dim=1)
        self.max_cos = [max(a, float(b)) for a, b in zip(self.max_cos or [-1.0] * len(best), best)]
        for b in range(denoised.shape[0]):
            if b not in self.caught and float(best[b]) >= self.settings.cos_threshold:
                self.caught[b] = int(index[b])
        if not self.caught:
            return denoised
        owners = sorted(self.caught)
        result = nudge_latents(denoised, items[[self.caught[b] for b in owners]], self.settings.nudge,
                               undesired_owners=owners)
        for b in owners:
            self.events.append(GuardEvent(b, self.caught[b], sigma, result.cos_undesired_before[b],
                                          result.cos_undesired_after[b]))
        return result.latents.to(denoised.dtype)
