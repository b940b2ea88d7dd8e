"""A set built at one size gives latents at another: resized copies, encoded once per size and encoder."""
import pytest
import torch

from nudging_core.embedding_set import EmbeddingSet, pixels_to_uint8
from nudging_core.errors import NudgeInputError
from nudging_core.set_sizes import latents_for, resized_pixels


def block_encoder(calls):
    """A stand-in VAE encoder with a known answer: 8x8 block means of RGB plus their mean, 4 channels."""
    def encode(images):
        calls.append(tuple(images.shape))
        x = torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2), 8)
        return torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1)
    return encode


def make_set(n=3, size=32, pixels=True):
    images = torch.rand(n, size, size, 3)
    return EmbeddingSet(latents=torch.randn(n, 4, size // 8, size // 8), names=[f"g{i}" for i in range(n)],
                        pixels=pixels_to_uint8(images) if pixels else None)


def test_matching_size_returns_the_sets_own_latents_without_encoding():
    calls = []
    s = make_set()
    assert latents_for(s, torch.zeros(1, 4, 4, 4), block_encoder(calls), "vae", 8, "guarded") is s.latents
    assert calls == []


def test_other_size_is_encoded_from_resized_copies_once_per_size_and_encoder():
    calls = []
    s = make_set(n=10)
    encode = block_encoder(calls)
    wide = latents_for(s, torch.zeros(2, 4, 6, 8), encode, "vae", 8, "guarded")
    assert wide.shape == (10, 4, 6, 8)
    want = encode(resized_pixels(s.pixels, (48, 64)))
    assert torch.allclose(wide, want)
    assert [c[1:3] for c in calls[:-1]] == [(48, 64)] * 2   # two chunks of at most 8 items
    n_calls = len(calls)
    assert latents_for(s, torch.zeros(1, 4, 6, 8), encode, "vae", 8, "guarded") is wide    # cached
    assert len(calls) == n_calls
    latents_for(s, torch.zeros(1, 4, 6, 8), encode, "other vae", 8, "guarded")             # another encoder
    assert len(calls) > n_calls


def test_resizing_keeps_a_flat_image_flat_both_ways():
    grey = torch.full((1, 16, 24, 3), 128, dtype=torch.uint8)
    for hw in ((8, 8), (40, 56)):
        out = resized_pixels(grey, hw)
        assert out.shape == (1, *hw, 3) and torch.allclose(out, torch.full_like(out, 128 / 255))


def test_without_pixel_copies_a_size_mismatch_names_the_fix():
    with pytest.raises(NudgeInputError, match="store_pixels"):
        latents_for(make_set(pixels=False), torch.zeros(1, 4, 8, 8), block_encoder([]), "vae", 8, "guarded")


def test_an_encoder_that_gives_other_latents_is_refused():
    def three_channels(images):
        return torch.zeros(images.shape[0], 3, images.shape[1] // 8, images.shape[2] // 8)
    with pytest.raises(NudgeInputError, match="connect the VAE of the graph"):
        latents_for(make_set(), torch.zeros(1, 4, 8, 8), three_channels, "vae", 8, "guarded")
