"""The single-pass guard on a toy memorizing denoiser: it stays off for far predictions and
steers an Euler trajectory away from the memorized latent when the prediction comes close."""
import torch

from nudging_core.nudge import NudgeSettings
from nudging_core.sampling_guard import GuardSettings, SamplingGuard


def euler(denoiser, x, sigmas, guard=None):
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x)
        if guard is not None:
            denoised = guard(denoised, float(sigmas[i]))
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def test_memorized_trajectory_is_steered_away():
    torch.manual_seed(0)
    memorized = torch.randn(1, 4, 8, 8)
    denoiser = lambda x: memorized + 0.05 * x  # noqa: E731  (always returns to the same image)
    sigmas = torch.linspace(10, 0, 21)
    noise = torch.randn(1, 4, 8, 8) * sigmas[0]
    plain = euler(denoiser, noise.clone(), sigmas)
    guard = SamplingGuard(memorized, GuardSettings(cos_threshold=0.9))
    guarded = euler(denoiser, noise.clone(), sigmas, guard)
    assert cos(plain, memorized) > 0.99
    assert cos(guarded, memorized) < cos(plain, memorized) - 0.05
    assert guard.caught == {0: 0} and guard.events


def test_guard_stays_off_for_far_predictions():
    torch.manual_seed(1)
    guarded_items = torch.randn(3, 4, 8, 8)
    target = torch.randn(1, 4, 8, 8)
    denoiser = lambda x: target + 0.0 * x  # noqa: E731
    sigmas = torch.linspace(10, 0, 11)
    noise = torch.randn(1, 4, 8, 8) * sigmas[0]
    guard = SamplingGuard(guarded_items, GuardSettings(cos_threshold=0.9))
    assert torch.equal(euler(denoiser, noise.clone(), sigmas, guard), euler(denoiser, noise.clone(), sigmas))
    assert guard.caught == {} and guard.events == []


def test_a_new_run_resets_what_was_caught():
    items = torch.ones(1, 4, 2, 2)
    guard = SamplingGuard(items, GuardSettings(cos_threshold=0.5, nudge=NudgeSettings(steps=1)))
    guard(torch.ones(1, 4, 2, 2), 5.0)
    assert guard.caught == {0: 0}
    guard(-torch.ones(1, 4, 2, 2), 10.0)     # sigma went up: another sampling run
    assert guard.caught == {}
