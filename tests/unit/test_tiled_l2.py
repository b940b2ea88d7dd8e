"""Carlini's tiled L2 against hand-computed cases."""
import math

import pytest
import torch

from nudging_core.errors import NudgeInputError
from nudging_core.tiled_l2 import tiled_l2, tiled_l2_matrix


def test_identical_images_have_distance_zero():
    img = torch.rand(64, 64, 3)
    assert tiled_l2(img, img) == 0.0


def test_one_changed_tile_gives_that_tiles_rms_not_the_mean():
    a = torch.zeros(8, 8, 3)
    b = a.clone()
    b[0:2, 0:2, :] = 0.5          # one of the 16 tiles differs by 0.5 everywhere
    # per-tile RMS: 0.5 in that tile, 0 elsewhere; max = 0.5 (a mean over tiles would be 0.03125)
    assert tiled_l2(a, b) == pytest.approx(0.5)


def test_rms_within_a_tile_by_hand():
    a = torch.zeros(4, 4, 1)
    b = torch.zeros(4, 4, 1)
    b[0, 0, 0] = 0.3   # 4x4 image -> 1x1 tiles; that tile's RMS is |0.3|
    b[3, 3, 0] = 0.4
    assert tiled_l2(a, b) == pytest.approx(0.4)
    c = torch.zeros(8, 8, 1)
    d = torch.zeros(8, 8, 1)
    d[0, 0, 0], d[0, 1, 0] = 0.3, 0.4   # both in tile (0,0) of 2x2 pixels: sqrt((0.09+0.16)/4)
    assert tiled_l2(c, d) == pytest.approx(math.sqrt(0.25 / 4))


def test_threshold_case_copy_with_small_noise_everywhere_vs_local_edit():
    torch.manual_seed(0)
    img = torch.rand(128, 128, 3)
    noisy = (img + 0.05 * torch.randn_like(img)).clamp(0, 1)
    edited = img.clone()
    edited[:32, :32] = 1 - edited[:32, :32]   # one tile replaced: a copy elsewhere, not here
    assert tiled_l2(img, noisy) < 0.1
    assert tiled_l2(img, edited) > 0.1


def test_uneven_sizes_use_near_equal_tiles():
    a = torch.zeros(10, 7, 3)
    b = a.clone()
    b[-1, -1] = 1.0        # last tile is rows 7..9 x cols 5..6: 6 pixels
    assert tiled_l2(a, b) == pytest.approx(math.sqrt(3 / (6 * 3)))


def test_matrix_shape_and_symmetry():
    x = torch.rand(3, 16, 16, 3)
    y = torch.rand(5, 16, 16, 3)
    m = tiled_l2_matrix(x, y)
    assert m.shape == (3, 5)
    assert torch.allclose(tiled_l2_matrix(y, x), m.T)


def test_size_mismatch_is_a_clear_error():
    with pytest.raises(NudgeInputError, match="does not match"):
        tiled_l2_matrix(torch.rand(1, 16, 16, 3), torch.rand(1, 32, 32, 3))


def test_chunking_gives_the_same_answer():
    from nudging_core.tiled_l2 import _pairwise_rms
    a, b = torch.rand(3, 50), torch.rand(7, 50)
    assert torch.allclose(_pairwise_rms(a, b, budget=150), _pairwise_rms(a, b))


def test_uint8_references_give_the_float_answer_in_chunks(monkeypatch):
    import importlib
    images = torch.rand(2, 16, 16, 3)
    refs = (torch.rand(9, 16, 16, 3) * 255).round().to(torch.uint8)
    want = tiled_l2_matrix(images, refs.float() / 255)
    # two references per chunk (the package re-exports a function of the module's name)
    monkeypatch.setattr(importlib.import_module("nudging_core.tiled_l2"), "_CHUNK_ELEMENTS", 2 * 16 * 16 * 3)
    got = tiled_l2_matrix(images, refs)
    assert torch.allclose(got, want, atol=1e-6)


def test_area_averaging_to_the_comparison_size_never_raises_a_distance():
    """Jensen: with tiles aligned to the averaged blocks, a tile's RMS difference can only shrink,
    so a copy the full-resolution test flags is still flagged at the comparison size."""
    from nudging_core.tiled_l2 import comparison_size, to_comparison
    torch.manual_seed(0)
    a, b = torch.rand(4, 128, 128, 3), torch.rand(4, 128, 128, 3)
    b[:2] = (a[:2] + 0.08 * torch.randn(2, 128, 128, 3)).clamp(0, 1)
    hw = comparison_size((128, 128), (128, 128), size=32)
    assert hw == (32, 32)
    full = tiled_l2_matrix(a, b)
    small = tiled_l2_matrix(to_comparison(a, hw), to_comparison(b, hw))
    assert (small <= full + 1e-6).all()
    assert comparison_size((64, 64), (512, 512)) == (64, 64) and comparison_size((16, 24), (512, 768)) == (16, 24)
