"""The single-pass guard: turn the sampler's predicted clean latent away while sampling.

At every model call the sampler's prediction of the clean latent ("denoised", after CFG) is
compared with the guarded latents by cosine. Below `cos_threshold` nothing happens (one small
matrix product per step). Once an image's prediction reaches the threshold, that image is
marked for the rest of the run, and every following prediction of it is turned away from its
guarded item until its cosine is down to the image's release level: LatentNudge's objective
(lower the cosine to the item, stay as close to the prediction as possible) solved in closed
form for one item, so it costs next to nothing per step. The sampler then steps toward the
turned prediction, so the trajectory leaves the memorized image within the same pass: no
second generation, no extra UNet evaluation.

With a desired prompt (`switching`), a caught image is not turned: it is marked as switched, and
the caller's model wrapper gives it the desired prompt's conditioning (nudging_core.
conditioning_nudge) from the next model call on. The copy is decided by the text conditioning, so
taken early this escapes to a new image of the desired prompt, where turning the prediction only
smears the copy (measured on the shapes fixture; see README).

How far a latent must move before its decoded image stops being a copy differs from image to
image (a dark photo can stay a pixel copy at a latent cosine of 0.6). So, when a pixel check is
given, the last predictions of a caught image are decoded and tested against the item's
pixels; while the turned prediction still is a copy, the image's release level is lowered
(1 - release doubles) and the prediction turned further, at most `pixel_checks` decodes per
image. Prompts that are never caught never decode anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .nudge import turn_away

# (turned latents [k, C, h, w], guarded item index of each) -> tiled L2 of each decoded image to its item
PixelCheck = Callable[[torch.Tensor, list[int]], list[float]]


@dataclass
class GuardSettings:
    cos_threshold: float = 0.9
    release: float | None = None     # cosine a caught prediction is turned down to; None: cos_threshold
    pixel_checks: int = 4            # most decodes per caught image (with a pixel check)
    copy_threshold: float = 0.1      # tiled L2 below which a decoded prediction is a copy
    # A check this many times above copy_threshold clears the image: its last predictions are
    # too far from the item to come back, so it needs no more decodes.
    clear_factor: float = 1.5

    def first_release(self) -> float:
        return self.cos_threshold if self.release is None else min(self.release, self.cos_threshold)


def lower_release(release: float) -> float:
    """One escalation: the distance from cosine 1 doubles (0.9 -> 0.8 -> 0.6 -> 0.2 -> -0.6)."""
    return max(-1.0, 1.0 - 2.0 * (1.0 - release))


@dataclass
class GuardEvent:
    batch_index: int
    item: int
    step_sigma: float
    cos_before: float
    cos_after: float
    release: float


@dataclass
class SamplingGuard:
    """Called with each prediction; keeps which images it caught during the current run."""

    items: torch.Tensor                      # guarded latents in the model's latent space [M, C, h, w]
    settings: GuardSettings = field(default_factory=GuardSettings)
    pixel_check: PixelCheck | None = None
    switching: bool = False                  # caught images are switched to the desired prompt, not turned
    switched: dict[int, int] = field(default_factory=dict)
    caught: dict[int, int] = field(default_factory=dict)
    release: dict[int, float] = field(default_factory=dict)
    checks_used: dict[int, int] = field(default_factory=dict)
    still_copy: dict[int, bool] = field(default_factory=dict)
    events: list[GuardEvent] = field(default_factory=list)
    _last_sigma: float | None = None
    _items_f32: torch.Tensor | None = None
    _unit_items: torch.Tensor | None = None

    def reset(self) -> None:
        self.caught, self.release, self.checks_used, self.still_copy, self.switched = {}, {}, {}, {}, {}
        self.events, self._last_sigma = [], None

    def use_items(self, items: torch.Tensor) -> None:
        """Guard against these latents from now on (the same items, encoded at another generation size)."""
        self.items, self._items_f32, self._unit_items = items, None, None

    def _items(self, device) -> torch.Tensor:
        """The guarded latents as float32 on the sampler's device, converted once (hot path)."""
        if self._items_f32 is None or self._items_f32.device != device:
            self._items_f32 = self.items.to(device=device, dtype=torch.float32)
            self._unit_items = torch.nn.functional.normalize(self._items_f32.flatten(1), dim=1)
        return self._items_f32

    def __call__(self, denoised: torch.Tensor, sigma: float, in_window: bool = True,
                 check_pixels: bool = False) -> torch.Tensor:
        """in_window: False outside the part of the schedule the guard should act in.
        check_pixels: this call is one of the last ones, where caught images are decoded and tested."""
        if self._last_sigma is not None and sigma > self._last_sigma * 1.0001:
            self.reset()                     # a new sampling run (noise level went back up)
        self._last_sigma = sigma
        if not in_window:
            return denoised
        flat = torch.nn.functional.normalize(denoised.detach().float().flatten(1), dim=1)
        self._items(flat.device)
        cosines = flat @ self._unit_items.T
        best, index = cosines.max(dim=1)
        for b in torch.nonzero(best >= self.settings.cos_threshold).flatten().tolist():
            if b in self.caught or b in self.switched:
                continue
            if self.switching:
                self.switched[b] = int(index[b])
                self.events.append(GuardEvent(b, int(index[b]), sigma, float(best[b]), float(best[b]), 1.0))
            else:
                self.caught[b], self.release[b] = int(index[b]), self.settings.first_release()
        if not self.caught:
            return denoised
        owners = sorted(self.caught)
        out = denoised.clone()
        out[owners] = self._turn(denoised, owners, sigma, cosines)
        if check_pixels and self.pixel_check is not None:
            self._check_and_escalate(denoised, out, owners, sigma, cosines)
        return out

    def _turn(self, denoised: torch.Tensor, rows: list[int], sigma: float, cosines: torch.Tensor) -> torch.Tensor:
        """Turn each row's prediction down to its release level (all rows in one batched step).
        cosines: this call's cosines of every prediction to every item."""
        owned = [self.caught[b] for b in rows]
        levels = [self.release[b] for b in rows]
        before = cosines[rows, owned].tolist()
        for b, j, cos_before, level in zip(rows, owned, before, levels):
            self.events.append(GuardEvent(b, j, sigma, cos_before, min(cos_before, level), level))
        return turn_away(denoised[rows], self._items(denoised.device)[owned],
                         torch.tensor(levels, device=denoised.device))

    def _check_and_escalate(self, denoised: torch.Tensor, out: torch.Tensor, owners: list[int], sigma: float,
                            cosines: torch.Tensor) -> None:
        """Decode-and-test the turned predictions; turn the ones that are still copies further."""
        pending = [b for b in owners if self.checks_used.get(b, 0) < self.settings.pixel_checks]
        while pending:
            for b in pending:
                self.checks_used[b] = self.checks_used.get(b, 0) + 1
            distances = self.pixel_check(out[pending], [self.caught[b] for b in pending])
            threshold = self.settings.copy_threshold
            for b, distance in zip(pending, distances):
                self.still_copy[b] = distance < threshold
                if distance >= threshold * self.settings.clear_factor:
                    self.checks_used[b] = self.settings.pixel_checks      # cleared: no more decodes
            pending = [b for b in pending if self.still_copy[b]]
            if not pending:
                return
            for b in pending:
                self.release[b] = lower_release(self.release[b])
            out[pending] = self._turn(denoised, pending, sigma, cosines)
            pending = [b for b in pending if self.checks_used[b] < self.settings.pixel_checks]
