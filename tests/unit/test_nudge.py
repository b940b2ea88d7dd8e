"""The nudge moves latents away from U and toward D, per image, under inference mode too."""
import pytest
import torch

from nudging_core.errors import NudgeInputError
from nudging_core.nudge import NudgeSettings, nudge_latents, turn_away


def test_nudge_lowers_cosine_to_undesired_and_raises_it_to_desired():
    torch.manual_seed(0)
    u = torch.randn(1, 4, 8, 8)
    d = torch.randn(1, 4, 8, 8)
    z0 = u + 0.3 * torch.randn(1, 4, 8, 8)      # starts close to the undesired item
    result = nudge_latents(z0, u, NudgeSettings(alpha=1.0, beta=1.0, proximity=0.0, steps=50, learning_rate=0.05), desired=d)
    assert result.cos_undesired_after[0] < result.cos_undesired_before[0] - 0.2
    assert result.cos_desired_after[0] > result.cos_desired_before[0] + 0.2


def test_runs_inside_inference_mode_like_comfyui_nodes():
    u = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():
        z0 = u.clone()
        result = nudge_latents(z0, u, NudgeSettings(steps=10))
    assert result.cos_undesired_after[0] < 0.999


def test_owners_restrict_each_image_to_its_own_match():
    torch.manual_seed(1)
    items = torch.randn(1, 4, 8, 8)
    z0 = torch.randn(3, 4, 8, 8)
    result = nudge_latents(z0, items, NudgeSettings(steps=10), undesired_owners=[1])
    assert result.nudged == [False, True, False]
    assert torch.equal(result.latents[0], z0[0]) and torch.equal(result.latents[2], z0[2])
    assert not torch.equal(result.latents[1], z0[1])


def test_proximity_keeps_the_latent_closer():
    torch.manual_seed(2)
    u = torch.randn(1, 4, 8, 8)
    z0 = u + 0.1 * torch.randn_like(u)
    loose = nudge_latents(z0, u, NudgeSettings(proximity=0.0, steps=40, learning_rate=0.05)).latents
    tight = nudge_latents(z0, u, NudgeSettings(proximity=50.0, steps=40, learning_rate=0.05)).latents
    assert (tight - z0).norm() < (loose - z0).norm()


def test_nan_latent_is_refused():
    z0 = torch.zeros(1, 4, 8, 8)
    z0[0, 0, 0, 0] = float("nan")
    with pytest.raises(NudgeInputError, match="NaN"):
        nudge_latents(z0, torch.randn(1, 4, 8, 8), NudgeSettings())


def test_stop_callback_interrupts():
    class Stop(Exception):
        pass

    def on_step(step, loss):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        nudge_latents(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), NudgeSettings(steps=100), on_step=on_step)


def test_mean_and_max_aggregate_differ_with_several_items():
    torch.manual_seed(3)
    items = torch.randn(3, 4, 8, 8)
    z0 = items[0:1] + 0.05 * torch.randn(1, 4, 8, 8)
    by_max = nudge_latents(z0, items, NudgeSettings(aggregate="max", steps=0))
    by_mean = nudge_latents(z0, items, NudgeSettings(aggregate="mean", steps=0))
    assert by_max.cos_undesired_before[0] > by_mean.cos_undesired_before[0]


def test_turn_away_lands_on_the_level_keeping_norm_and_plane():
    torch.manual_seed(7)
    items = torch.randn(3, 4, 8, 8)
    latents = items + 0.2 * torch.randn(3, 4, 8, 8)
    turned = turn_away(latents, items, torch.tensor([0.9, 0.6, 0.2]))
    cosines = torch.nn.functional.cosine_similarity(turned.flatten(1), items.flatten(1), dim=1)
    assert torch.allclose(cosines, torch.tensor([0.9, 0.6, 0.2]), atol=1e-4)
    assert torch.allclose(turned.flatten(1).norm(dim=1), latents.flatten(1).norm(dim=1), rtol=1e-4)
    # The turn stays in the plane of latent and item: nothing orthogonal to both changes.
    probe = torch.randn(3, 4 * 8 * 8)
    for k in range(3):
        plane = torch.linalg.qr(torch.stack([latents[k].flatten(), items[k].flatten()], dim=1)).Q
        off_plane = probe[k] - plane @ (plane.T @ probe[k])
        assert abs(float(off_plane @ (turned[k].flatten() - latents[k].flatten()))) < 1e-3


def test_turn_away_leaves_latents_already_below_the_level():
    torch.manual_seed(8)
    items = torch.randn(2, 4, 8, 8)
    far = torch.randn(2, 4, 8, 8)
    assert torch.equal(turn_away(far, items, 0.9), far)


def test_turn_away_handles_a_latent_on_its_items_direction():
    item = torch.randn(1, 4, 8, 8)
    turned = turn_away(2.0 * item, item, 0.5)
    assert torch.isfinite(turned).all()
    assert abs(float(torch.nn.functional.cosine_similarity(turned.flatten(), item.flatten(), dim=0)) - 0.5) < 1e-4
