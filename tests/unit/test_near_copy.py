"""The bench's near-copy test on hand-made copies, degraded copies and new images."""
import numpy as np
import pytest
from PIL import Image, ImageFilter

from bench.near_copy import copied_tile_share, near_copy, structural_similarity
from shapes_world.scenes import World


@pytest.fixture(scope="module")
def world():
    return World.load()


def test_flat_tiles_are_not_counted_as_copied():
    guarded = np.zeros((64, 64, 3))
    guarded[:16, :16] = np.random.default_rng(0).random((16, 16, 3))   # one textured tile, 15 flat
    other = np.zeros((64, 64, 3))                                       # same flat colour, no texture
    assert copied_tile_share(other, guarded) == 0.0
    assert copied_tile_share(guarded, guarded) == 1.0


def test_structure_ignores_brightness_blur_and_inversion_but_not_new_layouts(world):
    item = world.item_image(world.duplicated[0])
    assert structural_similarity(item * 0.5, item) > 0.99
    assert structural_similarity(255 - item, item) > 0.99
    blurred = np.asarray(Image.fromarray(item).filter(ImageFilter.GaussianBlur(2)))
    assert structural_similarity(blurred, item) > 0.8
    rng = np.random.default_rng(3)
    new = [world.render(world.random_scene(rng, world.duplicated[0].scene.attributes)) for _ in range(10)]
    assert np.median([structural_similarity(n, item) for n in new]) < 0.3


def test_degraded_copies_are_near_copies_new_scenes_of_the_caption_are_not(world):
    rng = np.random.default_rng(0)
    degraded, new = [], []
    for item in world.duplicated:
        img = world.item_image(item)
        f = img / 255.0
        corner = f.copy()
        corner[:16, :16] = rng.random((16, 16, 3))
        degraded += [np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(2))) / 255.0, f * 0.6,
                     np.clip(f + rng.normal(0, 0.1, f.shape), 0, 1), corner]
        new += [world.render(world.random_scene(rng, item.scene.attributes)) for _ in range(10)]
        guarded = [img] * 4
        assert all(near_copy(d, g)["near_copy"] for d, g in zip(degraded[-4:], guarded)), item.name
    rate = np.mean([near_copy(n, world.item_image(world.duplicated[i // 10]))["near_copy"] for i, n in enumerate(new)])
    assert rate <= 0.05


def test_sizes_must_agree():
    with pytest.raises(ValueError, match="differ in size"):
        copied_tile_share(np.zeros((64, 64, 3)), np.zeros((32, 32, 3)))
