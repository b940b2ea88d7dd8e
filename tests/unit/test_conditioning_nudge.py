"""Moving a prompt embedding toward a desired prompt's (the conditioning nudge), by hand-made cases."""
import pytest
import torch

from nudging_core.conditioning_nudge import escalated_strength, match_token_length, toward_desired
from nudging_core.errors import NudgeInputError


def test_strength_zero_keeps_the_prompt_and_one_gives_the_desired_prompt():
    torch.manual_seed(0)
    cond, desired = torch.randn(2, 77, 8), torch.randn(1, 77, 8)
    assert torch.equal(toward_desired(cond, desired, 0.0), cond)
    assert torch.allclose(toward_desired(cond, desired, 1.0), desired.expand(2, -1, -1))
    half = toward_desired(cond, desired, 0.5)
    assert torch.allclose(half, (cond + desired) / 2, atol=1e-6)


def test_a_longer_desired_prompt_is_matched_by_repeating_both_to_a_common_length():
    cond, desired = torch.zeros(1, 77, 4), torch.ones(1, 154, 4)
    moved = toward_desired(cond, desired, 0.25)
    assert moved.shape == (1, 154, 4) and torch.allclose(moved, torch.full((1, 154, 4), 0.25))
    a, b = match_token_length(torch.zeros(1, 154, 4), torch.ones(1, 231, 4))
    assert a.shape == b.shape == (1, 462, 4)


def test_bad_desired_prompts_are_named():
    with pytest.raises(NudgeInputError, match="768-d"):
        toward_desired(torch.zeros(1, 77, 768), torch.zeros(1, 77, 1024), 0.5)
    with pytest.raises(NudgeInputError, match="between 0 and 1"):
        toward_desired(torch.zeros(1, 77, 4), torch.zeros(1, 77, 4), 1.5)
    with pytest.raises(NudgeInputError, match="NaN"):
        toward_desired(torch.zeros(1, 77, 4), torch.full((1, 77, 4), float("nan")), 0.5)


def test_each_retry_halves_the_distance_left_and_never_passes_the_desired_prompt():
    assert escalated_strength(0.75, 0, 2.0) == 0.75
    assert escalated_strength(0.75, 1, 2.0) == pytest.approx(0.875)
    assert escalated_strength(0.75, 2, 2.0) == pytest.approx(0.9375)
    assert escalated_strength(1.0, 3, 2.0) == 1.0
    assert escalated_strength(0.5, 5, 1.0) == 0.5
