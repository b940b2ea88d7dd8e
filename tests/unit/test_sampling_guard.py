"""The single-pass guard on a toy memorizing denoiser: it stays off for far predictions and
steers an Euler trajectory away from the memorized latent when the prediction comes close."""
import torch

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
    guard = SamplingGuard(items, GuardSettings(cos_threshold=0.5))
    guard(torch.ones(1, 4, 2, 2), 5.0)
    assert guard.caught == {0: 0}
    guard(-torch.ones(1, 4, 2, 2), 10.0)     # sigma went up: another sampling run
    assert guard.caught == {}


def test_caught_prediction_is_held_at_the_release_cosine_not_pushed_further():
    torch.manual_seed(2)
    memorized = torch.randn(1, 4, 8, 8)
    guard = SamplingGuard(memorized, GuardSettings(cos_threshold=0.9))
    out = guard(memorized + 0.05 * torch.randn(1, 4, 8, 8), 1.0)
    # Down to the threshold and no further: the smallest turn that clears the bar.
    assert abs(cos(out, memorized) - 0.9) < 1e-4


def test_pixel_check_lowers_the_release_until_the_image_is_no_copy():
    """A 'decoder' that only sees a copy escape below cosine 0.5 (like a dark photo whose latent
    can move a lot before its pixels do): the guard escalates 0.9 -> 0.8 -> 0.6 -> 0.2."""
    torch.manual_seed(3)
    memorized = torch.randn(1, 4, 8, 8)
    decodes = []

    def still_copy(latents, items):
        decodes.append(latents.shape[0])
        return [0.05 if cos(z, memorized[j]) > 0.5 else 0.12 for z, j in zip(latents, items)]

    guard = SamplingGuard(memorized, GuardSettings(cos_threshold=0.9, pixel_checks=4), pixel_check=still_copy)
    prediction = memorized + 0.05 * torch.randn(1, 4, 8, 8)
    held = guard(prediction, 2.0)                       # not a check call: released at 0.9 only
    assert cos(held, memorized) > 0.5 and decodes == []
    out = guard(prediction, 1.0, check_pixels=True)
    assert cos(out, memorized) <= 0.5
    assert guard.release[0] < 0.5 and guard.still_copy == {0: False}
    assert 1 < len(decodes) <= 4


def counting_check(distance: float, calls: list):
    """A pixel check that records each decode and reports `distance` for every image."""
    return lambda z, items: calls.append(1) or [distance] * z.shape[0]


def run_checked(memorized, pixel_checks: int, distance: float, prediction) -> tuple[SamplingGuard, list]:
    """Three check calls (sigma 3, 2, 1) on prediction(); returns the guard and its decodes."""
    calls = []
    guard = SamplingGuard(memorized, GuardSettings(cos_threshold=0.9, pixel_checks=pixel_checks),
                          pixel_check=counting_check(distance, calls))
    for sigma in (3.0, 2.0, 1.0):
        guard(prediction(), sigma, check_pixels=True)
    return guard, calls


def test_pixel_checks_are_bounded_per_image():
    torch.manual_seed(4)
    memorized = torch.randn(1, 4, 8, 8)
    guard, calls = run_checked(memorized, 3, 0.05, memorized.clone)
    assert len(calls) == 3 and guard.still_copy == {0: True}


def test_clean_predictions_never_decode():
    torch.manual_seed(5)
    calls = []
    guard = SamplingGuard(torch.randn(2, 4, 8, 8), GuardSettings(cos_threshold=0.9),
                          pixel_check=counting_check(0.05, calls))
    far = torch.randn(1, 4, 8, 8)
    assert torch.equal(guard(far, 1.0, check_pixels=True), far) and calls == []


def test_an_image_far_from_its_item_is_cleared_after_one_decode():
    """Caught by the latent cosine but clearly no copy in pixels: one decode, then no more."""
    torch.manual_seed(6)
    memorized = torch.randn(1, 4, 8, 8)
    guard, calls = run_checked(memorized, 4, 0.3, lambda: memorized + 0.05 * torch.randn(1, 4, 8, 8))
    assert len(calls) == 1 and guard.still_copy == {0: False} and guard.release[0] == 0.9


def test_switching_guard_marks_a_caught_image_and_leaves_its_prediction_alone():
    """With a desired prompt the guard only records the catch (the model wrapper then switches
    that image's conditioning); the prediction is not turned, and a far image is not marked."""
    torch.manual_seed(7)
    memorized = torch.randn(1, 4, 8, 8)
    guard = SamplingGuard(memorized, GuardSettings(cos_threshold=0.9), switching=True)
    batch = torch.cat([memorized + 0.05 * torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)])
    out = guard(batch, 5.0)
    assert torch.equal(out, batch)
    assert guard.switched == {0: 0} and guard.caught == {}
    guard(batch, 4.0)                                   # caught once: no second event
    assert len(guard.events) == 1
    guard(batch, 10.0)                                  # a new run forgets the switch
    assert guard.switched == {0: 0} and len(guard.events) == 1
