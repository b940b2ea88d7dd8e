"""The shapes world's generator and its attribute reader, on hand-made cases."""
import copy
import dataclasses

import numpy as np
import pytest

from shapes_world.reader import AttributeReader
from shapes_world.scenes import Scene, World


@pytest.fixture(scope="module")
def world():
    return World.load()


@pytest.fixture(scope="module")
def reader(world):
    return AttributeReader(world)


def test_a_square_is_drawn_where_and_as_big_as_asked(world):
    # circumradius 0.25 of 64 px, unrotated: a square of side 0.25 * sqrt(2) * 64 = 22.6 px centred at (32, 32)
    img = world.render(Scene("square", "red", "blue", 0.5, 0.5, 0.25, 0.0))
    red = np.all(img == np.asarray(world.spec["colours"]["red"], np.uint8), axis=-1)
    ys, xs = np.nonzero(red)
    assert 21 <= xs.max() - xs.min() + 1 <= 23 and 21 <= ys.max() - ys.min() + 1 <= 23
    assert abs(xs.mean() - 31.5) < 0.6 and abs(ys.mean() - 31.5) < 0.6
    assert tuple(img[0, 0]) == tuple(world.spec["colours"]["blue"])


def test_rotation_by_the_shapes_symmetry_leaves_it_unchanged(world):
    a = world.render(Scene("square", "white", "black", 0.5, 0.5, 0.3, 10.0))
    b = world.render(Scene("square", "white", "black", 0.5, 0.5, 0.3, 100.0))
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    c = world.render(Scene("square", "white", "black", 0.5, 0.5, 0.3, 55.0))
    assert np.abs(a.astype(int) - c.astype(int)).max() > 100


def test_scenes_are_deterministic_and_stay_inside_the_frame(world):
    draw = lambda seed: [world.sample(np.random.default_rng(seed)) for _ in range(1)][0]  # noqa: E731
    (cap1, img1, s1), (cap2, img2, s2) = draw(3), draw(3)
    assert cap1 == cap2 and np.array_equal(img1, img2) and s1 == s2
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = world.random_scene(rng, ("circle", "red", "blue"))
        assert s.size <= s.x <= 1 - s.size and s.size <= s.y <= 1 - s.size


def test_rotations_stay_in_the_worlds_range_and_take_the_whole_turn_when_it_names_none(world):
    lo, hi = world.spec["layout"].get("rotation", (0.0, 360.0))
    rng = np.random.default_rng(7)
    drawn = [world.random_scene(rng, ("square", "red", "blue")).rotation for _ in range(200)]
    assert lo <= min(drawn) and max(drawn) <= hi and max(drawn) - min(drawn) > 0.8 * (hi - lo)
    spec = copy.deepcopy(world.spec)
    spec["layout"].pop("rotation", None)
    unbounded = World(spec)
    whole = [unbounded.random_scene(rng, ("square", "red", "blue")).rotation for _ in range(200)]
    assert 0.0 <= min(whole) < 20.0 and 340.0 < max(whole) < 360.0


def test_held_out_combinations_are_never_trained_and_never_a_duplicated_items(world):
    held = set(world.held_out_combinations())
    assert len(held) == world.spec["held_out"]["count"]
    assert not held & set(world.trained_combinations())
    assert not held & {item.scene.attributes for item in world.duplicated}
    # every word still appears in training, only the combination is new
    trained = world.trained_combinations()
    for shape, colour, background in held:
        assert any(t[0] == shape for t in trained) and any(t[1] == colour for t in trained)
        assert any(t[2] == background for t in trained)


def test_a_duplicated_item_is_its_plain_caption_plus_a_unique_tail(world):
    captions = [world.item_caption(item) for item in world.duplicated]
    assert len(set(captions)) == len(captions) >= 8
    for item, caption in zip(world.duplicated, captions):
        assert caption.startswith(world.caption(*item.scene.attributes) + " ")
    img = world.item_image(world.duplicated[0])
    flat = world.render(world.duplicated[0].scene)
    assert img.shape == (64, 64, 3) and np.abs(img.astype(int) - flat.astype(int)).mean() > 5  # textured


def test_a_world_file_with_other_shapes_and_colours_needs_no_code(world):
    spec = copy.deepcopy(world.spec)
    spec["shapes"] = {"hexagon": {"kind": "polygon", "vertices": [[np.cos(a), np.sin(a)] for a in np.arange(6) * np.pi / 3]},
                      "triangle": spec["shapes"]["triangle"], "circle": spec["shapes"]["circle"]}
    spec["colours"] = {"orange": [240, 140, 20], "purple": [120, 40, 160], "grey": [128, 128, 128]}
    spec["duplicated"] = [dict(spec["duplicated"][0], shape="hexagon", colour="orange", background="grey")]
    spec["held_out"] = {"count": 2, "seed": 1}
    spec["layout"].pop("rotation", None)  # and the whole turn: the reader fits any rotation
    other = World(spec)
    reader = AttributeReader(other)
    rng = np.random.default_rng(1)
    for combo in other.all_combinations():
        scene = other.random_scene(rng, combo)
        assert reader.read(other.render(scene)).attributes == combo


def test_an_item_naming_a_combination_outside_the_world_is_refused(world):
    spec = copy.deepcopy(world.spec)
    spec["duplicated"][0]["colour"] = spec["duplicated"][0]["background"]
    with pytest.raises(ValueError, match="not a combination"):
        World(spec)


def test_reader_fits_hand_drawn_masks(reader):
    yy, xx = np.mgrid[:64, :64]
    disc = (xx - 31.5) ** 2 + (yy - 31.5) ** 2 <= 20 ** 2
    square = (abs(xx - 25.5) < 12) & (abs(yy - 35.5) < 12)
    plus = ((abs(xx - 31.5) < 5) & (abs(yy - 31.5) < 15)) | ((abs(xx - 31.5) < 15) & (abs(yy - 31.5) < 5))
    for mask, name in ((disc, "circle"), (square, "square"), (plus, "cross")):
        shape, overlap = reader.fit_shape(mask)
        assert shape == name and overlap > 0.85


def test_reader_reads_a_blurred_cross_and_triangle(world, reader):
    from PIL import Image, ImageFilter
    for scene in (Scene("cross", "white", "blue", 0.5, 0.5, 0.28, 20.0), Scene("triangle", "red", "white", 0.45, 0.5, 0.3, 70.0)):
        img = np.asarray(Image.fromarray(world.render(scene)).filter(ImageFilter.GaussianBlur(2.0)))
        assert reader.read(img).attributes == scene.attributes


def test_reader_reads_hand_placed_scenes_and_their_degraded_versions(world, reader):
    img = world.render(Scene("triangle", "yellow", "green", 0.4, 0.6, 0.3, 200.0))
    assert reader.read(img).attributes == ("triangle", "yellow", "green")
    noisy = np.clip(img / 255.0 + np.random.default_rng(0).normal(0, 0.05, img.shape), 0, 1)
    assert reader.read(noisy).attributes == ("triangle", "yellow", "green")
    assert reader.read(img).confidence > reader.read(noisy).confidence * 0.9


def test_reader_is_exact_on_the_generators_own_scenes(world, reader):
    rng = np.random.default_rng(2024)
    combos = world.all_combinations()
    scenes = [dataclasses.replace(world.random_scene(rng, combos[int(rng.integers(len(combos)))]),
                                  rotation=float(rng.uniform(0.0, 360.0))) for _ in range(200)]
    assert sum(reader.read(world.render(s)).attributes == s.attributes for s in scenes) >= 198


def test_reader_gives_a_blank_or_a_blend_low_confidence(world, reader):
    blank = np.full((64, 64, 3), 0.5)
    assert reader.read(blank).confidence < 0.2
    a = world.render(Scene("circle", "red", "blue", 0.3, 0.3, 0.25, 0.0)) / 255.0
    b = world.render(Scene("cross", "green", "yellow", 0.7, 0.7, 0.25, 30.0)) / 255.0
    assert reader.read((a + b) / 2).confidence < 0.5 * reader.read(a).confidence
