"""A guard index in the filter's verdicts (nudging_core/index_guard.py): flags, the matched items the
regenerate loop pushes from, the re-test against the whole index, item names and the open-once cache."""
import json
import math
import os

import pytest
import torch

from nudging_core.embedding_set import EmbeddingSet
from nudging_core.errors import NudgeInputError
from nudging_core.guard_index import MANIFEST, build_sharded_guard
from nudging_core.index_guard import NOTHING_WITHIN, IndexGuard, ItemNames, OpenedIndexes, add_index, combined
from nudging_core.memorization import check_pixels, format_report, merge_regenerated
from nudging_core.set_sizes import latents_for
from test_guard_index import smooth  # the same photo-like items as the index's own tests

T = 0.1



def as_images(items):
    return items.float() / 255.0


@pytest.fixture
def index_items():
    return smooth(40, 7)


@pytest.fixture
def guard(tmp_path, index_items):
    folder = str(tmp_path / "guard")
    build_sharded_guard(folder, index_items, shard_size=16)
    return IndexGuard.open(folder, "guard", backend="torch")


def test_an_index_match_flags_the_image_and_carries_just_the_matched_item(guard, index_items):
    images = torch.stack([as_images(index_items[23]) + 0.01, torch.rand(64, 64, 3)])
    verdict = add_index(None, images, guard, T)
    assert verdict.flagged == [True, False]
    assert verdict.distances[0] == pytest.approx(0.01, abs=2e-3)
    assert verdict.nearest[0] == "guard#23" and verdict.nearest[1] == NOTHING_WITHIN
    # The verdict's set is only the matched item, as its comparison copy, with no latents.
    assert len(verdict.guarded) == 1 and torch.equal(verdict.guarded.pixels[0], index_items[23])
    assert 0 in verdict.guarded.latent_shape
    matched = verdict.matched_set()
    assert matched.names == ["guard#23"] and matched.owners == [0]
    # Nothing within the threshold: the distance is unknown beyond it, reported as a lower bound.
    assert verdict.distances[1] == T and verdict.at_least(1) and not verdict.at_least(0)
    data = json.loads(json.dumps(verdict.as_json(), allow_nan=False))     # the canvas parses it
    assert data["images"][1]["at_least"] is True and data["guard_index"] == {"name": "guard", "items": 40}
    report = format_report(verdict)
    assert "guard index 'guard' (40 items)" in report and f"no guarded item within {T:g}" in report
    assert report.splitlines()[-1] == "1 of 2 flagged"


def test_the_index_gives_the_same_verdict_as_the_same_items_in_a_set(guard, index_items):
    as_set = EmbeddingSet(latents=torch.zeros(40, 4, 8, 8), names=[f"guard#{i}" for i in range(40)],
                          pixels=index_items)
    g = torch.Generator().manual_seed(1)
    images = torch.cat([as_images(index_items[:6]) + 0.05 * torch.randn(6, 64, 64, 3, generator=g),
                        torch.rand(3, 64, 64, 3, generator=g)]).clamp(0, 1)
    by_set, by_index = check_pixels(images, as_set, T), add_index(None, images, guard, T)
    assert by_index.flagged == by_set.flagged
    for b, hit in enumerate(by_set.flagged):
        if hit:
            assert by_index.nearest[b] == by_set.nearest[b]
            assert by_index.distances[b] == pytest.approx(by_set.distances[b], abs=1e-5)


def test_set_and_index_together(guard, index_items):
    own = smooth(5, 99)                                  # a small set, not in the index
    guarded = EmbeddingSet(latents=torch.randn(5, 4, 8, 8), names=[f"own_{i}" for i in range(5)], pixels=own)
    images = torch.stack([as_images(own[2]), as_images(index_items[30]) + 0.02, torch.rand(64, 64, 3)])
    verdict = add_index(check_pixels(images, guarded, T), images, guard, T)
    assert verdict.flagged == [True, True, False]
    assert verdict.nearest[:2] == ["own_2", "guard#30"]
    # The set's items first, then the index's matched item; each flagged image points at its own.
    assert verdict.guarded.names == [f"own_{i}" for i in range(5)] + ["guard#30"]
    assert verdict.nearest_index[:2] == [2, 5]
    assert verdict.matched_set().names == ["own_2", "guard#30"]
    # A passed image keeps the set's distance (known), not a lower bound.
    assert not verdict.at_least(2) and verdict.distances[2] > T
    # Without an index hit the verdict's set is the set itself (nothing copied).
    clean = add_index(check_pixels(images[2:], guarded, T), images[2:], guard, T)
    assert clean.guarded is guarded and clean.flagged == [False]


def test_a_set_at_another_size_is_combined_at_the_comparison_size(guard, index_items):
    big = smooth(3, 5, out=128)
    guarded = EmbeddingSet(latents=torch.randn(3, 4, 16, 16), names=["a", "b", "c"], pixels=big)
    pool = combined(guarded, guard.items([4, 9]))
    assert pool.pixels.shape == (5, 64, 64, 3) and pool.names == ["a", "b", "c", "guard#4", "guard#9"]
    images = torch.rand(4, 128, 128, 3)
    # Set items are averaged and rounded to uint8: distances move by at most 0.5/255.
    exact = check_pixels(images, guarded, 1.0).distances
    again = check_pixels(images, pool.subset([0, 1, 2]), 1.0).distances
    assert all(abs(x - y) <= 0.5 / 255 + 1e-6 for x, y in zip(exact, again))
    # Copies smaller than the index's size are compared at the set's size: the index items are averaged.
    small = EmbeddingSet(latents=torch.randn(1, 4, 4, 4), names=["s"], pixels=smooth(1, 6, out=32))
    assert combined(small, guard.items([1])).pixels.shape == (2, 32, 32, 3)


def test_the_retest_of_a_replacement_searches_the_whole_index(guard, index_items):
    """A replacement that left its matched item but copies another index item is still flagged."""
    original = as_images(index_items[3:4])
    verdict = add_index(None, original, guard, T)
    assert verdict.flagged == [True] and len(verdict.guarded) == 1
    moved_to_another = as_images(index_items[17:18])
    assert check_pixels(moved_to_another, verdict.guarded, T).flagged == [False]   # the matched item alone misses it
    merged = merge_regenerated(original, verdict, moved_to_another)
    assert merged.statuses == ["still flagged"] and merged.distances_after[0] < 1e-6
    fresh = torch.rand(1, 64, 64, 3)
    merged = merge_regenerated(original, verdict, fresh)
    assert merged.statuses == ["regenerated"] and math.isfinite(merged.distances_after[0])
    assert merged.distances_after[0] >= T


def test_matched_items_are_re_encoded_at_the_generation_size(guard, index_items):
    """They have no latents: the latent-space nodes get them from the graph's VAE (set_sizes)."""
    matched = add_index(None, as_images(index_items[5:7]), guard, T).matched_set()
    seen = []

    def encode(pixels):
        seen.append(tuple(pixels.shape))
        return torch.zeros(pixels.shape[0], 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

    latents = latents_for(matched, torch.zeros(2, 4, 16, 16), encode, "vae", 8, "guarded")
    assert latents.shape == (2, 4, 16, 16) and seen == [(2, 128, 128, 3)]


def test_threshold_zero_flags_nothing(guard, index_items):
    verdict = add_index(None, as_images(index_items[:2]), guard, 0.0)
    assert verdict.flagged == [False, False] and len(verdict.matched_set()) == 0


def test_images_smaller_than_the_index_size_are_refused_with_the_fix(guard):
    with pytest.raises(NudgeInputError, match="generate at least that size"):
        add_index(None, torch.rand(1, 32, 32, 3), guard, T)


def test_item_names_come_from_items_txt_when_it_lists_every_item(tmp_path, index_items):
    folder = str(tmp_path / "named")
    build_sharded_guard(folder, index_items[:4], shard_size=16)
    assert [ItemNames(folder, 4, "g")[i] for i in range(4)] == ["g#0", "g#1", "g#2", "g#3"]   # no list
    with open(os.path.join(folder, "items.txt"), "w", encoding="utf-8") as fh:
        fh.write("photos/a.png\nphotos/b\u00e9.png\nc.png\nd.png\n")
    names = ItemNames(folder, 4, "g")
    assert [names[i] for i in (3, 0, 1)] == ["d.png", "photos/a.png", "photos/b\u00e9.png"]
    with open(os.path.join(folder, "items.txt"), "w", encoding="utf-8") as fh:
        fh.write("a.png\nb.png\n")                   # an unfinished list: numbered names
    assert ItemNames(folder, 4, "g")[1] == "g#1"
    outside = tmp_path / "outside.txt"
    outside.write_text("w\nx\ny\nz\n")
    os.remove(os.path.join(folder, "items.txt"))
    os.symlink(outside, os.path.join(folder, "items.txt"))     # a link out of the folder is not read
    assert ItemNames(folder, 4, "g")[0] == "g#0"


def test_an_index_is_opened_once_per_build_and_at_most_keep_are_held(tmp_path, index_items):
    folders = []
    for k in range(3):
        folder = str(tmp_path / f"g{k}")
        build_sharded_guard(folder, index_items[k:k + 3], shard_size=16)
        folders.append(folder)
    opened = []

    def opener(folder, label):
        opened.append(folder)
        return IndexGuard.open(folder, label, backend="torch")

    cache = OpenedIndexes(keep=2)
    first = cache.get(folders[0], "g0", opener)
    assert cache.get(folders[0], "g0", opener) is first and opened == [folders[0]]
    assert cache.get(folders[0], "./g0", opener).index is first.index and len(opened) == 1   # another spelling
    # Rebuilt (a new guard.json): opened again.
    manifest = os.path.join(folders[0], MANIFEST)
    stat = os.stat(manifest)
    os.utime(manifest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache.get(folders[0], "g0", opener) is not first and len(opened) == 2
    cache.get(folders[1], "g1", opener)
    cache.get(folders[2], "g2", opener)                # the least recently used (g0) goes
    assert len(cache) == 2
    cache.get(folders[0], "g0", opener)
    assert opened[-1] == folders[0] and len(opened) == 5


def test_a_damaged_index_is_refused_and_not_kept(tmp_path, index_items):
    folder = str(tmp_path / "damaged")
    build_sharded_guard(folder, index_items[:20], shard_size=16)
    shard = os.path.join(folder, "shard_00001.safetensors")
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) - 100)
    cache = OpenedIndexes()
    with pytest.raises(NudgeInputError, match="shard_00001.safetensors"):
        cache.get(folder, "damaged")
    assert len(cache) == 0
