"""Verdicts and the per-image merge ConditionalRegenerate does."""
import pytest
import torch

from nudging_core.embedding_set import EmbeddingSet, pixels_to_uint8
from nudging_core.errors import NudgeInputError
from nudging_core.memorization import PASSED, REGENERATED, STILL_FLAGGED, check_pixels, merge_regenerated


def guarded(images):
    return EmbeddingSet(latents=torch.randn(images.shape[0], 4, 4, 4), names=[f"g{i}" for i in range(images.shape[0])],
                        pixels=pixels_to_uint8(images))


def test_copies_are_flagged_with_their_nearest_item():
    torch.manual_seed(0)
    train = torch.rand(3, 32, 32, 3)
    generated = torch.stack([train[2], torch.rand(32, 32, 3)])
    verdict = check_pixels(generated, guarded(train), 0.1)
    assert verdict.flagged == [True, False]
    assert verdict.nearest[0] == "g2" and verdict.distances[0] < 0.01
    matched = verdict.matched_set()
    assert matched.names == ["g2"] and matched.owners == [0]


def smooth_images(n, size=8, out=(32, 32)):
    """Photo-like test images: random colours at low resolution, bilinearly enlarged."""
    low = torch.rand(n, 3, size, size)
    return torch.nn.functional.interpolate(low, size=out, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def test_a_set_built_at_one_size_guards_other_sizes_and_aspects():
    torch.manual_seed(1)
    train = smooth_images(3)                                   # guarded at 32x32
    copy_wide = torch.nn.functional.interpolate(train[1:2].permute(0, 3, 1, 2), size=(64, 96), mode="bilinear",
                                                align_corners=False).permute(0, 2, 3, 1)
    other_wide = smooth_images(1, out=(64, 96))
    verdict = check_pixels(torch.cat([copy_wide, other_wide]), guarded(train), 0.1)
    assert verdict.flagged == [True, False]
    assert verdict.nearest[0] == "g1"


def test_too_small_images_name_the_grid():
    with pytest.raises(NudgeInputError, match="smaller than the 4x4 tile grid"):
        check_pixels(torch.rand(1, 2, 64, 3), guarded(torch.rand(1, 32, 32, 3)), 0.1)


def test_empty_guarded_set():
    empty = EmbeddingSet(latents=torch.zeros(0, 4, 4, 4), names=[], pixels=torch.zeros(0, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(NudgeInputError, match="empty"):
        check_pixels(torch.rand(1, 32, 32, 3), empty, 0.1)


def test_merge_replaces_only_flagged_and_reports_still_flagged():
    torch.manual_seed(1)
    train = torch.rand(2, 32, 32, 3)
    originals = torch.stack([train[0], torch.rand(32, 32, 3), train[1]])
    verdict = check_pixels(originals, guarded(train), 0.1)
    assert verdict.flagged == [True, False, True]
    fresh = torch.rand(32, 32, 3)
    regenerated = torch.stack([fresh, train[1]])        # flagged-only batch: 1st escapes, 2nd is still a copy
    merged = merge_regenerated(originals, verdict, regenerated)
    assert merged.statuses == [REGENERATED, PASSED, STILL_FLAGGED]
    assert torch.equal(merged.images[0], fresh) and torch.equal(merged.images[1], originals[1])
    assert merged.distances_after[1] is None and merged.distances_after[2] < 0.01


def test_nothing_flagged_needs_no_regenerated_branch():
    train = torch.rand(1, 32, 32, 3)
    originals = torch.rand(2, 32, 32, 3)
    verdict = check_pixels(originals, guarded(train), 0.1)
    merged = merge_regenerated(originals, verdict, None)
    assert merged.statuses == [PASSED, PASSED] and torch.equal(merged.images, originals)
