"""The nudge: gradient descent on a latent, away from undesired items and toward desired ones.

Objective for one latent z (the paper's Eq. 2, written out):

    L(z) = beta  * agg_{u in U} cos(z, u)
         - alpha * agg_{d in D} cos(z, d)
         + proximity * mean(((z - z0) / std(z0))^2)

in SD latent space (every latent flattened). `agg` is the mean over the set, or the max
("nearest"): the max pushes hardest from the closest item, the mean from the set as a whole.
The change is measured in units of the starting latent's own standard deviation (z = z0 +
std(z0) * delta, proximity on mean(delta^2)), and the optimiser is Adam, whose step is about
`learning_rate` per element: so the settings mean the same for any VAE's latent scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import NudgeInputError

AGGREGATES = ("mean", "max")


@dataclass
class NudgeSettings:
    alpha: float = 1.0
    beta: float = 1.0
    proximity: float = 0.1
    steps: int = 30
    learning_rate: float = 0.1
    aggregate: str = "max"


@dataclass
class NudgeResult:
    latents: torch.Tensor
    cos_undesired_before: list[float | None]
    cos_undesired_after: list[float | None]
    cos_desired_before: list[float | None]
    cos_desired_after: list[float | None]
    nudged: list[bool]


def _cosines(z: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Cosine of each latent in z [B, ...] with each item [M, ...] -> [B, M]."""
    a = torch.nn.functional.normalize(z.flatten(1), dim=1)
    b = torch.nn.functional.normalize(items.flatten(1), dim=1)
    return a @ b.T


def _aggregate(values: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Mean or max over the masked items of each row; rows with no item give 0."""
    if how == "max":
        filled = values.masked_fill(~mask, float("-inf")).max(dim=1).values
        return torch.where(mask.any(dim=1), filled, torch.zeros_like(filled))
    counts = mask.sum(dim=1).clamp(min=1)
    return (values * mask).sum(dim=1) / counts


def _owner_mask(count: int, batch: int, owners: list[int] | None, device) -> torch.Tensor:
    """[B, M] mask: which items apply to which batch image (all, unless owners say)."""
    if owners is None:
        return torch.ones(batch, count, dtype=torch.bool, device=device)
    owner = torch.tensor(owners, device=device)
    # Items owned by -1 apply to every image; others only to their own image.
    rows = torch.arange(batch, device=device)[:, None]
    return (owner[None, :] == rows) | (owner[None, :] < 0)


def turn_away(latents: torch.Tensor, items: torch.Tensor, level: torch.Tensor | float) -> torch.Tensor:
    """Each latent [B, ...] whose cosine to its item [B, ...] is above `level` (one value, or one
    per latent), turned away from the item until the cosine is exactly `level`.

    The closed-form answer to the nudge's question for a single item and no desired set: the
    turn happens in the plane the latent and its item span, so the latent keeps its norm and
    everything orthogonal to that plane, and moves by the smallest angle that clears the bar.
    No iterations: cheap enough to run at every sampler step.
    """
    flat = latents.flatten(1).float()
    unit_item = torch.nn.functional.normalize(items.flatten(1).float().to(flat.device), dim=1)
    norm = flat.norm(dim=1, keepdim=True)
    along = (flat * unit_item).sum(dim=1, keepdim=True)
    rest = flat - along * unit_item
    rest_norm = rest.norm(dim=1, keepdim=True)
    on_axis = rest_norm <= 1e-6 * norm
    if bool(on_axis.any()):
        # A latent exactly on its item's direction has no plane to turn in: borrow a fixed one.
        other = torch.randn(flat.shape, generator=torch.Generator().manual_seed(0)).to(flat.device)
        other = other - (other * unit_item).sum(dim=1, keepdim=True) * unit_item
        rest = torch.where(on_axis, other, rest)
        rest_norm = rest.norm(dim=1, keepdim=True)
    level = torch.as_tensor(level, dtype=flat.dtype, device=flat.device).expand(flat.shape[0]).reshape(-1, 1)
    angle = torch.acos(level.clamp(-1.0, 1.0))
    turned = norm * (torch.cos(angle) * unit_item + torch.sin(angle) * rest / rest_norm.clamp(min=1e-12))
    return torch.where(along > level * norm, turned, flat).reshape(latents.shape).to(latents.dtype)


def check_finite(latent: torch.Tensor, what: str) -> None:
    if not torch.isfinite(latent).all():
        raise NudgeInputError(f"the {what} contains NaN or infinite values; check the node that produced it "
                              "(a NaN usually comes from fp16 overflow: try --force-fp32 or another VAE)")


def nudge_latents(
    z0: torch.Tensor,
    undesired: torch.Tensor,
    settings: NudgeSettings,
    desired: torch.Tensor | None = None,
    undesired_owners: list[int] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> NudgeResult:
    """Optimise each latent in the batch z0 [B, C, h, w]; images with no undesired item stay put.

    on_step(step, loss) runs after every iteration; it may raise to stop (ComfyUI's interrupt).
    Runs with gradients enabled even when called inside torch.inference_mode().
    """
    if settings.aggregate not in AGGREGATES:
        raise NudgeInputError(f"aggregate must be one of {AGGREGATES}, got '{settings.aggregate}'")
    if settings.steps < 0 or settings.learning_rate < 0:
        raise NudgeInputError("steps and learning_rate must not be negative")
    check_finite(z0, "latent")
    check_finite(undesired, "undesired set")
    if desired is not None:
        check_finite(desired, "desired set")
    with torch.inference_mode(False), torch.enable_grad():
        # Fresh tensors: ones created under inference mode cannot take part in autograd.
        start = z0.detach().clone().float()
        u_items = undesired.detach().clone().float().to(start.device)
        d_items = None if desired is None or desired.shape[0] == 0 else desired.detach().clone().float().to(start.device)
        u_mask = _owner_mask(u_items.shape[0], start.shape[0], undesired_owners, start.device)
        active = u_mask.any(dim=1)
        d_mask = None if d_items is None else torch.ones(start.shape[0], d_items.shape[0], dtype=torch.bool, device=start.device)

        def terms(z):
            cu = _aggregate(_cosines(z, u_items), u_mask, settings.aggregate)
            cd = None if d_items is None else _aggregate(_cosines(z, d_items), d_mask, settings.aggregate)
            return cu, cd

        with torch.no_grad():
            cu0, cd0 = terms(start)
        # Optimise the change in units of each latent's own spread: z = z0 + scale * delta. Step
        # size and proximity then mean the same for any VAE's latent scale.
        scale = start.flatten(1).std(dim=1).clamp(min=1e-6).view(-1, *([1] * (start.ndim - 1)))
        delta = torch.zeros_like(start, requires_grad=True)
        optimiser = torch.optim.Adam([delta], lr=settings.learning_rate)
        for step in range(settings.steps):
            if not bool(active.any()):
                break
            optimiser.zero_grad(set_to_none=True)
            cu, cd = terms(start + scale * delta)
            loss_per = settings.beta * cu
            if cd is not None:
                loss_per = loss_per - settings.alpha * cd
            loss_per = loss_per + settings.proximity * delta.square().flatten(1).mean(dim=1)
            loss = (loss_per * active).sum()
            loss.backward()
            delta.grad[~active] = 0
            optimiser.step()
            if on_step is not None:
                on_step(step + 1, float(loss.detach()))
        result = (start + scale * delta).detach()
        result[~active] = start[~active]
        with torch.no_grad():
            cu1, cd1 = terms(result)

    def as_list(values, mask=None):
        if values is None:
            return [None] * start.shape[0]
        return [float(v) if (mask is None or bool(m)) else None for v, m in zip(values, mask if mask is not None else values)]

    return NudgeResult(
        latents=result.to(z0.dtype),
        cos_undesired_before=as_list(cu0, active), cos_undesired_after=as_list(cu1, active),
        cos_desired_before=as_list(cd0), cos_desired_after=as_list(cd1),
        nudged=[bool(a) for a in active],
    )
