"""The escalating regenerate loop, with a toy model that pulls latents back to a memorized one."""
import torch

from nudging_core.escape import regenerate_until_clear
from nudging_core.nudge import NudgeSettings


def toy_model_and_test(memorized):
    calls = []

    def regenerate(nudged, attempt):
        calls.append((attempt, nudged.shape[0]))
        pulled = 0.5 * nudged + 0.5 * memorized      # the "model" pulls half-way back to the copy
        return pulled, pulled

    def test(images):
        cos = torch.nn.functional.cosine_similarity(images.flatten(1), memorized.flatten(1))
        return [bool(c > 0.9) for c in cos], [float(1 - c) for c in cos]

    return calls, regenerate, test


def test_only_copies_retry_and_beta_grows_until_they_escape():
    torch.manual_seed(0)
    memorized = torch.randn(1, 4, 8, 8)
    start = memorized.repeat(2, 1, 1, 1)
    start[1] += 2.0 * torch.randn_like(start[1])      # image 1 starts far enough to escape at once
    calls, regenerate, test = toy_model_and_test(memorized)
    settings = NudgeSettings(beta=0.05, proximity=1.0, steps=30, learning_rate=0.05)
    result = regenerate_until_clear(start, memorized.repeat(2, 1, 1, 1), settings, regenerate, test,
                                    max_attempts=6, growth=4.0)
    assert calls[0] == (0, 2) and all(n == 1 for _, n in calls[1:])   # only the copy is retried
    assert result.still_copy == [False, False]
    assert result.attempts[1] == 1 and result.attempts[0] > 1


def test_gives_up_after_max_attempts_and_says_so():
    memorized = torch.randn(1, 4, 8, 8)
    result = regenerate_until_clear(memorized.clone(), memorized, NudgeSettings(steps=2),
                                    lambda z, a: (memorized.clone(), memorized.clone()),
                                    lambda imgs: ([True] * imgs.shape[0], [0.0] * imgs.shape[0]), max_attempts=3)
    assert result.still_copy == [True] and result.attempts == [3]
