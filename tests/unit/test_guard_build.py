"""guard_build: the guard index of image files built on Ray Data (local mode here, the cluster's code
path): the same bytes as build_sharded_guard, resumable, manifests, bad files, the CLI, and no Ray
needed to import it."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from guard_build import build_guard_on_ray, folder_sources, manifest_sources, read_rgb
from guard_build.__main__ import main
from nudging_core.errors import NudgeInputError
from nudging_core.guard_index import MANIFEST, GuardIndex, build_sharded_guard, comparison_copy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = [(64, 64), (64, 64), (64, 64), (80, 96), (120, 200), (300, 65), (128, 128), (70, 70)]
MODES = ["RGB", "RGB", "RGBA", "L", "LA", "P", "I;16", "JPEG"]
QUIET = {"progress": lambda line: None}


def _smooth(rng, h, w, channels=3):
    low = rng.random((channels, 6, 6))
    big = torch.nn.functional.interpolate(torch.from_numpy(low)[None], size=(h, w), mode="bilinear",
                                          align_corners=False)[0]
    return big.permute(1, 2, 0).numpy()


def _save(path, mode, h, w, rng):
    """An image file of `mode` ('JPEG': an RGB JPEG) with photo-like content."""
    if mode == "I;16":
        Image.fromarray((_smooth(rng, h, w, 1)[..., 0] * 65535).astype(np.uint16)).save(path)
        return
    rgba = (_smooth(rng, h, w, 4) * 255).round().astype(np.uint8)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "P":
        image = image.convert("RGB").quantize(64)
    elif mode != "JPEG":
        image = image.convert(mode)
    if mode == "JPEG":
        image = image.convert("RGB")
    image.save(path)


@pytest.fixture(scope="module")
def ray_local():
    pytest.importorskip("ray.data")
    import ray
    from guard_build import start_ray
    start_ray("local", num_cpus=2, object_store_memory=200 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """128 images of mixed sizes and modes, some in a subfolder; names that sort unlike their numbers."""
    folder = str(tmp_path_factory.mktemp("images"))
    os.makedirs(os.path.join(folder, "b_sub"))
    rng = np.random.default_rng(7)
    for i in range(128):
        mode, (h, w) = MODES[i % len(MODES)], SIZES[(i // 3) % len(SIZES)]
        name = f"{'b_sub/' if i % 5 == 0 else ''}img_{(i * 37) % 128}.{'jpg' if mode == 'JPEG' else 'png'}"
        _save(os.path.join(folder, name), mode, h, w, rng)
    with open(os.path.join(folder, "notes.txt"), "w") as fh:      # not an image: not a source
        fh.write("captions")
    return folder


def _reference(tmp_path, root, sources, shard_size):
    folder = str(tmp_path / "reference")
    build_sharded_guard(folder, (read_rgb(os.path.join(root, s)) for s in sources), shard_size=shard_size)
    return folder


def _files(folder, skip=("items.txt",)):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name not in skip:
            with open(os.path.join(folder, name), "rb") as fh:
                out[name] = fh.read()
    return out


def _items(folder):
    with open(os.path.join(folder, "items.txt"), encoding="utf-8") as fh:
        return fh.read().split("\n")[:-1]


def test_a_folder_gives_the_bytes_build_sharded_guard_writes(ray_local, images, tmp_path):
    sources = folder_sources(images)
    assert len(sources) == 128 and sources == sorted(sources) and sources[0].startswith("b_sub/")
    out = str(tmp_path / "guard")
    lines = []
    report = build_guard_on_ray(out, sources, images, shard_size=32, batch=12, progress=lines.append)
    assert _files(out) == _files(_reference(tmp_path, images, sources, 32))
    assert sorted(_files(out)) == [MANIFEST] + [f"shard_0000{i}.safetensors" for i in range(4)]
    assert _items(out) == sources
    assert (report.read, report.written_shards, report.kept_shards, report.skipped) == (128, 4, 0, [])
    assert sum("written (32 items)" in line and "images/s" in line for line in lines) == 4
    assert "128 of 128 sources done" in lines[-1]
    # the guard opens, and finds an item again among the others
    guard = GuardIndex.open(out, backend="torch")
    query = torch.from_numpy(read_rgb(os.path.join(images, sources[77]))).float()[None] / 255
    assert int(guard.check(query, 0.1)[1][0]) == 77


def test_a_copy_made_alone_on_a_worker_is_the_copy_build_sharded_guard_makes_in_a_batch(tmp_path):
    """The workers make each copy alone; build_sharded_guard averages runs of same-sized items together."""
    rng = np.random.default_rng(4)
    items = [(rng.random(shape) * 255).astype(np.uint8) for shape in [(128, 192, 3)] * 9 + [(150, 97, 3)] * 9]
    build_sharded_guard(str(tmp_path), items, shard_size=64)
    alone = torch.stack([comparison_copy(item, 64) for item in items])
    assert torch.equal(GuardIndex.open(str(tmp_path), backend="torch").rows(range(18)), alone)


def test_modes_and_depths_become_rgb(tmp_path):
    rng = np.random.default_rng(1)
    grey16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    rgb = read_rgb(str(tmp_path / "g16.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    assert np.array_equal(rgb[..., 0], ((grey16.astype(np.int64) + 128) // 257).astype(np.uint8))   # not clipped
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    rgba = (rng.random((64, 64, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_rgb(str(tmp_path / "a.png")), rgba[..., :3])                      # alpha dropped
    Image.fromarray(rgba[..., 0], "L").save(tmp_path / "l.png")
    assert np.array_equal(read_rgb(str(tmp_path / "l.png")), np.repeat(rgba[..., :1], 3, axis=2))


def test_a_rerun_rebuilds_only_the_shards_that_are_missing_or_damaged(ray_local, images, tmp_path):
    sources = folder_sources(images)
    reference = _files(_reference(tmp_path, images, sources, 32))
    out = str(tmp_path / "guard")

    def interrupt_after_first_shard(line):
        if "shard_00000" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_guard_on_ray(out, sources, images, shard_size=32, batch=16, progress=interrupt_after_first_shard)
    assert sorted(os.listdir(out)) == ["items.txt", "shard_00000.safetensors"]      # no partial file, no manifest
    with pytest.raises(NudgeInputError, match="build did not finish"):
        GuardIndex.open(out)
    report = build_guard_on_ray(out, sources, images, shard_size=32, batch=16, **QUIET)
    assert (report.kept_shards, report.read) == (1, 96) and _files(out) == reference

    os.remove(os.path.join(out, "shard_00001.safetensors"))
    damaged = os.path.join(out, "shard_00002.safetensors")
    with open(damaged, "r+b") as fh:
        fh.truncate(os.path.getsize(damaged) - 100)
    untouched = {k: os.stat(os.path.join(out, f"shard_0000{k}.safetensors")).st_mtime_ns for k in (0, 3)}
    report = build_guard_on_ray(out, sources, images, shard_size=32, batch=16, **QUIET)
    assert (report.kept_shards, report.written_shards, report.read) == (2, 2, 64)
    assert _files(out) == reference and _items(out) == sources
    assert {k: os.stat(os.path.join(out, f"shard_0000{k}.safetensors")).st_mtime_ns for k in (0, 3)} == untouched
    assert build_guard_on_ray(out, sources, images, shard_size=32, **QUIET).read == 0     # nothing left to do
    with pytest.raises(NudgeInputError, match="built from other images"):
        build_guard_on_ray(out, sources[::-1], images, shard_size=32, **QUIET)


def test_a_manifest_keeps_its_order_and_takes_relative_paths_from_its_folder(ray_local, images, tmp_path):
    picked = folder_sources(images)[::-3]                       # 43 sources, not in sorted order
    lines = [os.path.join(images, s) if k % 2 else os.path.relpath(os.path.join(images, s), tmp_path)
             for k, s in enumerate(picked)]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\r\n".join(lines[:20]) + "\n\n" + "\n".join(lines[20:]) + "\n", encoding="utf-8")
    sources = manifest_sources(str(manifest))
    assert sources == lines
    out = str(tmp_path / "guard")
    build_guard_on_ray(out, sources, str(tmp_path), shard_size=16, batch=7, **QUIET)
    assert _files(out) == _files(_reference(tmp_path, str(tmp_path), sources, 16))
    assert _items(out) == lines


@pytest.fixture(scope="module")
def with_bad_files(images, tmp_path_factory):
    """40 of the images, a 32 x 32 image, a truncated PNG and a text file named .png among them."""
    folder = str(tmp_path_factory.mktemp("bad"))
    for s in folder_sources(images)[:40]:
        with open(os.path.join(images, s), "rb") as src, open(os.path.join(folder, s.replace("/", "_")), "wb") as dst:
            dst.write(src.read())
    good = os.path.join(folder, "b_sub_img_0.png")
    with open(good, "rb") as fh:
        data = fh.read()
    with open(os.path.join(folder, "c_truncated.png"), "wb") as fh:
        fh.write(data[:len(data) // 2])
    with open(os.path.join(folder, "d_text.png"), "w") as fh:
        fh.write("not an image")
    Image.new("RGB", (32, 32)).save(os.path.join(folder, "c_small.png"))
    return folder, ["c_small.png", "c_truncated.png", "d_text.png"]


def test_a_bad_file_stops_the_build_with_its_name_or_is_skipped(ray_local, with_bad_files, tmp_path):
    folder, bad = with_bad_files
    sources = folder_sources(folder)
    assert [sources.index(b) for b in bad] == [26, 27, 28] and len(sources) == 43
    out = str(tmp_path / "guard")
    with pytest.raises(NudgeInputError, match="(?s)'c_small.png' cannot be guarded: the image is 32x32, smaller "
                                              "than the comparison size 64x64.*--skip-bad"):
        build_guard_on_ray(out, sources, folder, shard_size=8, batch=4, **QUIET)
    assert sorted(os.listdir(out)) == ["items.txt"] + [f"shard_0000{i}.safetensors" for i in range(3)]
    for name, why in (("c_truncated.png", "truncated|broken"), ("d_text.png", "cannot identify image file")):
        with pytest.raises(NudgeInputError, match=f"(?s)'{name}' cannot be guarded: .*({why})"):
            build_guard_on_ray(str(tmp_path / name), [sources[0], name], folder, shard_size=8, **QUIET)

    report = build_guard_on_ray(out, sources, folder, shard_size=8, batch=5, skip_bad=True, **QUIET)
    assert (report.kept_shards, report.read) == (3, 43 - 24)      # the shards before the first bad file are kept
    assert [s for s, _ in report.skipped] == bad
    good = [s for s in sources if s not in bad]
    assert _items(out) == good and report.manifest["count"] == 40
    reference = _files(_reference(tmp_path, folder, good, 8))
    assert _files(out) == reference
    # resuming maps the shards back to their sources through items.txt, past the skipped files
    os.remove(os.path.join(out, "shard_00002.safetensors"))
    report = build_guard_on_ray(out, sources, folder, shard_size=8, skip_bad=True, **QUIET)
    assert (report.read, report.skipped) == (8, []) and _files(out) == reference


def test_the_command_line(ray_local, images, tmp_path, capsys):
    out = str(tmp_path / "guard")
    assert main(["--images", images, "--out", out, "--shard-size", "50", "--batch", "20"]) == 0
    captured = capsys.readouterr()
    assert "shard_00000.safetensors written (50 items)" in captured.err
    assert "guard_build: 128 items in 3 shards" in captured.out
    assert GuardIndex.open(out).count == 128
    assert main(["--images", str(tmp_path / "nowhere"), "--out", out]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_without_ray_it_imports_and_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)               # `import ray` now fails
    monkeypatch.setitem(sys.modules, "ray.data", None)
    assert main(["--images", ".", "--out", "x"]) == 2
    assert "pip install 'ray[data]'" in capsys.readouterr().err
    blocked = "import sys; sys.modules['ray'] = None; import guard_build, guard_build.__main__"
    subprocess.run([sys.executable, "-c", blocked], cwd=REPO, check=True)
