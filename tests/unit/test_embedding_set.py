"""Set files: round trip, and refusal of anything that is not a well-formed set."""
import json
import os
import struct

import pytest
import torch

from nudging_core import embedding_set as sets
from nudging_core.errors import NudgeInputError


def make_set(n=3, with_extras=True):
    return sets.EmbeddingSet(
        latents=torch.randn(n, 4, 8, 8), names=[f"img{i}" for i in range(n)], encoder="TAESD/4ch/abc",
        clip_embeds=torch.randn(n, 16) if with_extras else None, clip_encoder="clip" if with_extras else None,
        pixels=torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8) if with_extras else None)


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    original = make_set()
    path = str(tmp_path / "s.safetensors")
    sets.save_set(original, path)
    loaded = sets.load_set(path)
    assert loaded.names == original.names
    assert loaded.encoder == "TAESD/4ch/abc"
    assert torch.allclose(loaded.latents, original.latents)
    assert torch.allclose(loaded.clip_embeds, original.clip_embeds)
    assert torch.equal(loaded.pixels, original.pixels)
    assert loaded.image_size == (64, 64)


def test_metadata_is_readable_json(tmp_path):
    path = str(tmp_path / "s.safetensors")
    sets.save_set(make_set(), path)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == sets.FORMAT_NAME and meta["format_version"] == "1"
    info = json.loads(meta["info"])
    assert info["items"] == ["img0", "img1", "img2"] and info["latent_shape"] == [4, 8, 8]


def test_missing_file(tmp_path):
    with pytest.raises(NudgeInputError, match="does not exist"):
        sets.load_set(str(tmp_path / "nope.safetensors"))


def test_truncated_file(tmp_path):
    path = str(tmp_path / "s.safetensors")
    sets.save_set(make_set(), path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(NudgeInputError, match="truncated"):
        sets.load_set(path)


def test_not_safetensors(tmp_path):
    path = str(tmp_path / "s.safetensors")
    open(path, "wb").write(b"\x80\x04\x95 this is a pickle, not a set" * 4)
    with pytest.raises(NudgeInputError):
        sets.load_set(path)


def test_hostile_header_huge_length(tmp_path):
    path = str(tmp_path / "s.safetensors")
    open(path, "wb").write(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(NudgeInputError, match="not a complete safetensors"):
        sets.load_set(path)


def test_hostile_header_offsets_outside_file(tmp_path):
    header = json.dumps({"__metadata__": {"format": sets.FORMAT_NAME, "format_version": "1"},
                         "latents": {"dtype": "F32", "shape": [1000, 4, 64, 64], "data_offsets": [0, 65536000]}}).encode()
    path = str(tmp_path / "s.safetensors")
    open(path, "wb").write(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(NudgeInputError, match="outside the file"):
        sets.load_set(path)


def test_foreign_tensors_are_refused(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "model.safetensors")
    save_file({"model.diffusion_model.weight": torch.zeros(2)}, path)
    with pytest.raises(NudgeInputError, match="unexpected tensor"):
        sets.load_set(path)


def test_safetensors_without_set_metadata(tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / "s.safetensors")
    save_file({"latents": torch.zeros(1, 4, 8, 8)}, path)
    with pytest.raises(NudgeInputError, match="not an embedding set"):
        sets.load_set(path)


@pytest.mark.parametrize("name", ["../evil.safetensors", "a/../../evil.safetensors", "/etc/passwd"])
def test_names_leaving_the_folder_are_refused(tmp_path, name):
    with pytest.raises(NudgeInputError, match="(no '..'|outside)"):
        sets.resolve_set_path(str(tmp_path), name)


def test_subfolder_names_are_fine(tmp_path):
    assert sets.resolve_set_path(str(tmp_path), "sub/x.safetensors") == os.path.join(os.path.realpath(tmp_path), "sub", "x.safetensors")


def test_free_path_never_overwrites(tmp_path):
    first = sets.free_set_path(str(tmp_path), "guard")
    open(first, "wb").write(b"user data")
    second = sets.free_set_path(str(tmp_path), "guard")
    assert first != second and second.endswith("guard_001.safetensors")


def test_latent_shape_and_channel_checks():
    s = make_set()
    sets.check_latent_compatible(s, torch.zeros(2, 4, 8, 8), "undesired")
    with pytest.raises(NudgeInputError, match="channels"):
        sets.check_latent_compatible(s, torch.zeros(2, 16, 8, 8), "undesired")
    with pytest.raises(NudgeInputError, match="latent size"):
        sets.check_latent_compatible(s, torch.zeros(2, 4, 16, 16), "undesired")
    empty = sets.EmbeddingSet(latents=torch.zeros(0, 4, 8, 8), names=[])
    with pytest.raises(NudgeInputError, match="empty"):
        sets.check_latent_compatible(empty, torch.zeros(1, 4, 8, 8), "undesired")
