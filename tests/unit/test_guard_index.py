"""The guard index for large guarded sets: its bounds, its exactness against check_pixels, its
files (deterministic, resumable, refused when hostile)."""
import json
import os
import struct

import pytest
import torch

from nudging_core.embedding_set import EmbeddingSet
from nudging_core.errors import NudgeInputError
from nudging_core.guard_index import (MANIFEST, GuardIndex, build_sharded_guard, descriptors, tile_bound)
from nudging_core.memorization import check_pixels
from nudging_core.tiled_l2 import tiled_l2_matrix, to_comparison

T = 0.1


def smooth(n, seed, out=64, low=8):
    """uint8 [n, out, out, 3] photo-like items: random colours at low resolution, enlarged."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, low, low, generator=g)
    big = torch.nn.functional.interpolate(small, size=(out, out), mode="bilinear", align_corners=False)
    return (big * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def exact_pairs(a_float, b_uint8):
    """Tiled L2 of each a[i] against b[i], as check_pixels computes it."""
    return torch.stack([tiled_l2_matrix(a_float[i:i + 1], to_comparison(b_uint8[i:i + 1], (64, 64)))[0, 0]
                        for i in range(a_float.shape[0])])


def adversarial_pairs():
    """(items uint8, queries float): differences every bound must stay under, tight ones included."""
    torch.manual_seed(3)
    items = smooth(12, 1)
    base = items.float() / 255
    queries = [base[0] + 0.07,                                               # constant shift: every bound is tight
               base[1] + 0.05 * torch.randn(64, 64, 3),                      # noise
               torch.rand(64, 64, 3),                                        # unrelated
               base[3].clone(), base[4].clone(), base[5].clone(), base[6] * 0.8,
               base[7].flip(0), torch.rand(64, 64, 3) * 0.01, base[9], base[10] - 0.0999, base[11]]
    queries[3][:16, :16] += 0.3                                              # one tile shifted
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None]) % 2).float()[..., None] * 0.4 - 0.2
    queries[4] += checker                                                    # high frequency: means unchanged
    queries[5][20:24, 40:44, 1] = 1.0                                        # one small patch, one channel
    queries[11][:, :, 0] += torch.linspace(-0.3, 0.3, 64)[None]              # a gradient inside every tile
    return items, torch.stack(queries)


def test_the_bounds_never_exceed_the_exact_tiled_l2():
    items, queries = adversarial_pairs()
    exact = exact_pairs(queries, items)
    cells_q, tiles_q = descriptors(to_comparison(queries, (64, 64)))
    cells_i, tiles_i = descriptors(items)
    by_cells, by_tiles = tile_bound(cells_i, cells_q), tile_bound(tiles_i, tiles_q)
    by_sum = (tiles_i - tiles_q).flatten(1).norm(dim=1) / 48 ** 0.5
    slack = exact * (1 + 1e-5) + 1e-7             # float rounding only; the filters allow 1e-4 and 1e-6
    assert (by_cells <= slack).all() and (by_tiles <= by_cells + 1e-9).all() and (by_sum <= by_tiles + 1e-9).all()
    assert float(by_cells[0]) == pytest.approx(float(exact[0]), rel=1e-5)   # a constant shift is where they are tight
    assert by_cells[4] < 0.01 < exact[4]                                # what averaging cannot see
    # and on random pairs
    a, b = torch.rand(50, 64, 64, 3), smooth(50, 2)
    cells_a, _ = descriptors(a)
    assert (tile_bound(descriptors(b)[0], cells_a) <= exact_pairs(a, b) * (1 + 1e-5) + 1e-7).all()


@pytest.fixture(scope="module")
def guard_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("guard"))
    items = smooth(600, 5)
    build_sharded_guard(folder, iter(items), shard_size=256)
    return folder, items


def near_threshold_queries(items, seed=7):
    """Copies at tiled L2 from well under to just under (and just over) the threshold."""
    g = torch.Generator().manual_seed(seed)
    base = items.float() / 255
    picks = torch.randint(0, items.shape[0], (24,), generator=g)
    queries = []
    for k, i in enumerate(picks.tolist()):
        q = base[i].clone()
        if k % 3 == 0:
            q = q + 0.04 * torch.randn(q.shape, generator=g)
        else:                                    # one tile moved by (just about) the threshold
            r, c = (k // 4) % 4 * 16, k % 4 * 16
            q[r:r + 16, c:c + 16] += [T - 1e-5, T - 1e-3, T * 0.5, T + 1e-5][k % 4]
        queries.append(q)
    return torch.stack(queries)


def test_every_copy_under_the_threshold_is_found_as_check_pixels_finds_it(guard_folder):
    folder, items = guard_folder
    queries = near_threshold_queries(items)
    as_set = EmbeddingSet(latents=torch.zeros(len(items), 4, 1, 1), names=[str(i) for i in range(len(items))],
                          pixels=items)
    reference = check_pixels(queries, as_set, T)
    guard = GuardIndex.open(folder, backend="torch")
    distances, indices = guard.check(queries, T)
    for b, flagged in enumerate(reference.flagged):
        if flagged:
            assert int(indices[b]) == reference.nearest_index[b]
            assert float(distances[b]) == pytest.approx(reference.distances[b], abs=1e-7)
        else:
            assert indices[b] == -1 and distances[b] == float("inf")
    assert 6 < sum(reference.flagged) < len(queries)


@pytest.fixture(scope="module")
def at_threshold(guard_folder):
    """One tile of each of 100 items moved by the threshold less a few float32 steps, and the exact
    verdicts against the whole set."""
    items = guard_folder[1]
    queries = items[:100].float() / 255
    for k in range(100):
        r, c = (k // 4) % 4 * 16, k % 4 * 16
        queries[k, r:r + 16, c:c + 16] += T - (k % 25) * 2e-9
    return queries, tiled_l2_matrix(queries, to_comparison(items, (64, 64))).min(dim=1)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_copies_at_the_threshold_to_the_last_bit_are_found(guard_folder, at_threshold, backend, monkeypatch):
    """The bounds are tight for these copies, so only the rounding margins keep them (without the
    margins about 1 in 20 is lost)."""
    if backend == "faiss":
        pytest.importorskip("faiss")
    queries, exact = at_threshold
    flagged = exact.values < T
    guard = GuardIndex.open(guard_folder[0], backend=backend)
    distances, indices = guard.check(queries, T)
    assert flagged.sum() > 70 and torch.equal(indices >= 0, flagged)
    assert torch.equal(indices[flagged], exact.indices[flagged])
    import nudging_core.guard_index as module
    monkeypatch.setattr(module, "_loosen", lambda t, size, scale=1.0: t)
    monkeypatch.setattr(module, "_range_margin", lambda dims, x, q: 0.0 * q)
    monkeypatch.setattr(module, "_within", lambda items, query, loose:
                        (items - query).square().sum(dim=2).amax(dim=1) < items.shape[2] * loose * loose)
    assert (guard.check(queries, T)[1] >= 0).sum() < flagged.sum()


def test_other_sizes_and_aspects_compare_as_check_pixels_does(tmp_path, monkeypatch):
    import nudging_core.guard_index as module
    monkeypatch.setattr(module, "_FILTER_ROWS", 7)        # every item is a candidate here: in parts of 7 and 5
    monkeypatch.setattr(module, "_EXACT_ROWS", 5)
    items = smooth(40, 11, out=128)                       # stored as 64 x 64 copies
    build_sharded_guard(str(tmp_path), iter(items), shard_size=16)
    guard = GuardIndex.open(str(tmp_path), backend="torch")
    copies = guard.rows(range(40))
    assert torch.equal(copies, (to_comparison(items, (64, 64)) * 255).round().to(torch.uint8))
    wide = torch.nn.functional.interpolate(items[:6].permute(0, 3, 1, 2).float() / 255, size=(96, 160),
                                           mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    queries = torch.cat([wide, torch.rand(2, 96, 160, 3)])
    reference = tiled_l2_matrix(to_comparison(queries, (64, 64)), to_comparison(copies, (64, 64))).min(dim=1)
    distances, indices = guard.check(queries, 10.0)       # everything is under 10: the nearest is always found
    assert torch.equal(indices, reference.indices)
    assert torch.allclose(distances, reference.values, atol=1e-7)
    with pytest.raises(NudgeInputError, match="smaller than the guard's comparison size 64x64"):
        guard.check(torch.rand(1, 48, 96, 3), T)


def test_faiss_and_torch_give_the_same_verdicts(guard_folder):
    pytest.importorskip("faiss")
    folder, items = guard_folder
    queries = torch.cat([near_threshold_queries(items, seed=9), torch.rand(3, 64, 64, 3)])
    with_torch = GuardIndex.open(folder, backend="torch").search(queries, T)
    with_faiss = GuardIndex.open(folder, backend="faiss").search(queries, T)
    assert torch.equal(with_torch.indices, with_faiss.indices)
    assert torch.equal(with_torch.distances, with_faiss.distances)
    assert with_torch.tile_candidates == with_faiss.tile_candidates      # every later step sees the same items
    assert with_torch.cell_candidates == with_faiss.cell_candidates


def _files(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as fh:
            out[name] = fh.read()
    return out


def test_shards_are_plain_safetensors_files(guard_folder):
    from safetensors import safe_open
    folder, items = guard_folder
    with safe_open(os.path.join(folder, "shard_00001.safetensors"), framework="pt") as fh:
        assert torch.equal(fh.get_slice("pixels")[3:5], items[259:261])
        cells, tiles = descriptors(items[256:512])
        assert torch.allclose(fh.get_tensor("cells"), cells.reshape(256, 192).float())
        assert torch.allclose(fh.get_tensor("tiles"), tiles.reshape(256, 48).float())


def test_builds_are_deterministic_and_resume_after_an_interruption(tmp_path):
    items = smooth(70, 13)
    build_sharded_guard(str(tmp_path / "a"), iter(items), shard_size=32)
    build_sharded_guard(str(tmp_path / "b"), list(items), shard_size=32)
    fresh = _files(tmp_path / "a")
    assert fresh == _files(tmp_path / "b")
    assert sorted(fresh) == [MANIFEST] + [f"shard_0000{i}.safetensors" for i in range(3)]

    def interrupted():
        for i, item in enumerate(items):
            if i == 40:
                raise KeyboardInterrupt
            yield item

    folder = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        build_sharded_guard(str(folder), interrupted(), shard_size=32)
    with pytest.raises(NudgeInputError, match="build did not finish"):
        GuardIndex.open(str(folder))
    first = os.stat(folder / "shard_00000.safetensors").st_mtime_ns
    build_sharded_guard(str(folder), iter(items), shard_size=32)
    assert _files(folder) == fresh
    assert os.stat(folder / "shard_00000.safetensors").st_mtime_ns == first      # kept, not written again
    with pytest.raises(NudgeInputError, match="holds other items"):
        build_sharded_guard(str(folder), iter(smooth(70, 14)), shard_size=32)


def test_bad_items_are_refused(tmp_path):
    with pytest.raises(NudgeInputError, match="uint8"):
        build_sharded_guard(str(tmp_path), [torch.rand(64, 64, 3)])
    with pytest.raises(NudgeInputError, match="smaller than the comparison size"):
        build_sharded_guard(str(tmp_path), [torch.zeros(32, 64, 3, dtype=torch.uint8)])
    with pytest.raises(NudgeInputError, match="no items"):
        build_sharded_guard(str(tmp_path), [])


def _copy_guard(src, dst):
    os.makedirs(dst)
    for name, data in _files(src).items():
        with open(os.path.join(dst, name), "wb") as fh:
            fh.write(data)
    return dst


def _edit_manifest(folder, change):
    path = os.path.join(folder, MANIFEST)
    with open(path) as fh:
        manifest = json.load(fh)
    change(manifest)
    with open(path, "w") as fh:
        json.dump(manifest, fh)


def _rewrite_header(path, change):
    """Change a shard's header (same data) as a hostile file would."""
    with open(path, "rb") as fh:
        data = fh.read()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    change(header)
    text = json.dumps(header).encode().ljust(length, b" ")
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + data[8 + length:])


MANIFEST_CASES = [
    ("not json", lambda m: None, "is not JSON"),
    ("foreign", lambda m: m.update(format="something"), "manifest"),
    ("newer", lambda m: m.update(format_version=99), "guard.json is format 99, newer than this pack"),
    ("count", lambda m: m.update(count=601), "for a count of 601"),
    ("size", lambda m: m.update(size=60), "comparison size"),
    ("outside", lambda m: m["shards"][0].update(file="../shard_00000.safetensors"), "not a plain shard file name"),
    ("absolute", lambda m: m["shards"][0].update(file="/etc/passwd"), "not a plain shard file name"),
    ("missing", lambda m: m["shards"][0].update(file="shard_00009.safetensors"), "is missing"),
    ("twice", lambda m: m["shards"].__setitem__(1, dict(m["shards"][0])), "lists a shard twice"),
    ("shard count", lambda m: (m["shards"][0].update(count=255), m.update(count=599)),
     "holds 256 items but the manifest"),
    ("malformed", lambda m: m["shards"][0].update(count="256"), "malformed shard list"),
]


@pytest.mark.parametrize("case,change,message", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_hostile_manifests_are_refused(guard_folder, tmp_path, case, change, message):
    folder = _copy_guard(guard_folder[0], str(tmp_path / "g"))
    if case == "not json":
        with open(os.path.join(folder, MANIFEST), "w") as fh:
            fh.write("{nope")
    else:
        _edit_manifest(folder, change)
    with pytest.raises(NudgeInputError, match=message):
        GuardIndex.open(folder)


def _set_entry(key, **values):
    return lambda h: h[key].update(values)


SHARD_CASES = [
    ("dtype", _set_entry("pixels", dtype="F32"), "not U8"),
    ("shape", _set_entry("cells", shape=[256, 191]), "'cells' as F32 \\[256, 191\\]"),
    ("tensor", lambda h: h.update(extra=h.pop("tiles")), "other tensors"),
    ("offsets", _set_entry("tiles", data_offsets=[0, 256 * 48 * 4]), "overlaps|malformed offsets"),
    ("foreign", lambda h: h["__metadata__"].update(format="x"), "not a shard of a guard index"),
]


@pytest.mark.parametrize("case,change,message", SHARD_CASES, ids=[c[0] for c in SHARD_CASES])
def test_hostile_shards_are_refused(guard_folder, tmp_path, case, change, message):
    folder = _copy_guard(guard_folder[0], str(tmp_path / "g"))
    _rewrite_header(os.path.join(folder, "shard_00001.safetensors"), change)
    with pytest.raises(NudgeInputError, match=message):
        GuardIndex.open(folder)


def test_truncated_shards_and_links_out_of_the_folder_are_refused(guard_folder, tmp_path):
    folder = _copy_guard(guard_folder[0], str(tmp_path / "g"))
    path = os.path.join(folder, "shard_00002.safetensors")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) - 5)
    with pytest.raises(NudgeInputError, match="truncated"):
        GuardIndex.open(folder)
    outside = _copy_guard(guard_folder[0], str(tmp_path / "other"))
    os.remove(path)
    os.symlink(os.path.join(outside, "shard_00002.safetensors"), path)
    with pytest.raises(NudgeInputError, match="outside the guard folder"):
        GuardIndex.open(folder)


def test_bad_queries_are_refused(guard_folder):
    guard = GuardIndex.open(guard_folder[0], backend="torch")
    with pytest.raises(NudgeInputError, match="NaN"):
        guard.check(torch.full((1, 64, 64, 3), float("nan")), T)
    with pytest.raises(NudgeInputError, match="positive number"):
        guard.check(torch.rand(1, 64, 64, 3), float("nan"))
    with pytest.raises(NudgeInputError, match="ComfyUI IMAGE"):
        guard.check(torch.rand(64, 64, 3), T)
    with pytest.raises(NudgeInputError, match="out of range"):
        guard.rows([600])


# Found by the guard-index fuzzer (fuzz/fuzz_guard_index.py, issue #14): each raised a raw exception.

def _write_tile_mean(folder, value):
    from nudging_core.guard_index import _read_shard
    path = os.path.join(folder, "shard_00001.safetensors")
    with open(path, "r+b") as fh:
        fh.seek(_read_shard(path, 64).tiles + 4 * 7)
        fh.write(struct.pack("<f", value))


@pytest.mark.parametrize("value", [3e38, -1.0, 1.5, float("nan"), float("inf")])
def test_tile_means_outside_0_1_are_refused_when_opening(guard_folder, tmp_path, value):
    """A huge finite mean (3e38) opened, then made faiss's float32 radius overflow: a raw TypeError at
    the first check. Means of pixels lie in [0, 1]; anything else is a hostile or damaged shard."""
    folder = _copy_guard(guard_folder[0], str(tmp_path / "g"))
    _write_tile_mean(folder, value)
    for backend in ("torch", "auto"):
        with pytest.raises(NudgeInputError, match=r"guard shard 'shard_00001.safetensors' holds tile means outside "
                                                  r"\[0, 1\].*rebuild the guard"):
            GuardIndex.open(folder, backend=backend)


def test_huge_queries_and_thresholds_do_not_overflow_the_faiss_radius(guard_folder):
    """faiss takes the range search's radius as a float32: a query of huge (finite) values or a huge
    threshold gave a radius above float32's largest and a raw TypeError from faiss."""
    pytest.importorskip("faiss")
    folder, items = guard_folder
    guard = GuardIndex.open(folder, backend="faiss")
    distances, indices = guard.check(torch.full((1, 64, 64, 3), 1e30), T)
    assert indices.tolist() == [-1] and distances.tolist() == [float("inf")]
    assert guard.check(items[:1].float() / 255, 1e30)[1].tolist() == [0]
    assert GuardIndex.open(folder, backend="torch").check(torch.full((1, 64, 64, 3), 1e30), T)[1].tolist() == [-1]


@pytest.mark.parametrize("manifest", ["missing", "link loop"])
def test_the_node_cache_refuses_a_folder_whose_guard_json_is_gone(guard_folder, tmp_path, manifest):
    """OpenedIndexes (what LoadGuardIndex opens through) stat'ed guard.json before the opener could word
    the problem: a raw FileNotFoundError, or OSError for a link loop. Now the opener's message."""
    from nudging_core.index_guard import OpenedIndexes
    folder = _copy_guard(guard_folder[0], str(tmp_path / "g"))
    os.remove(os.path.join(folder, MANIFEST))
    if manifest == "link loop":
        os.symlink(MANIFEST, os.path.join(folder, MANIFEST))
    cache = OpenedIndexes()
    with pytest.raises(NudgeInputError, match="holds no guard.json"):
        cache.get(folder, "g")
    assert len(cache) == 0
