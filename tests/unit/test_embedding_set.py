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


# ---- regressions: each a cause the set-loader fuzzer (fuzz/fuzz_set_loader.py) found ----------
# Before, each ended in a raw exception, a message without the file's name or an inconsistent set.

def write_raw(tmp_path, header, data: bytes) -> str:
    """A file with this header (a dict, or JSON text written as it is) and data section."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path = str(tmp_path / "bad.safetensors")
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data)
    return path


def write_set_tensors(tmp_path, tensors: dict, info=None) -> str:
    """A well-formed safetensors file with set metadata holding these tensors."""
    from safetensors.torch import save_file
    path = str(tmp_path / "bad.safetensors")
    info = info if info is not None else {"items": [f"img{i}" for i in range(len(tensors["latents"]))]}
    save_file(tensors, path, metadata={"format": sets.FORMAT_NAME, "format_version": "1", "info": json.dumps(info)})
    return path


def refused(path: str, match: str) -> None:
    with pytest.raises(NudgeInputError, match=match) as err:
        sets.load_set(path)
    assert "'bad.safetensors'" in str(err.value)


META = {"format": sets.FORMAT_NAME, "format_version": "1"}
LATENTS = {"dtype": "F32", "shape": [1, 4, 1, 1], "data_offsets": [0, 16]}


def test_bytes_no_tensor_covers_are_refused(tmp_path):
    # safetensors: "incomplete metadata, file not fully covered" (5 % of the probe)
    refused(write_raw(tmp_path, {"__metadata__": META, "latents": LATENTS}, b"\0" * 24), "belong to none")


def test_a_gap_between_tensors_is_refused(tmp_path):
    clip = {"dtype": "F32", "shape": [1, 4], "data_offsets": [20, 36]}
    refused(write_raw(tmp_path, {"__metadata__": META, "latents": LATENTS, "clip_embeds": clip}, b"\0" * 36),
            "overlaps another or leaves a gap")


def test_overlapping_tensors_are_refused(tmp_path):
    # safetensors: "invalid offset for tensor"
    clip = {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]}
    refused(write_raw(tmp_path, {"__metadata__": META, "latents": LATENTS, "clip_embeds": clip}, b"\0" * 16),
            "overlaps another or leaves a gap")


def test_duplicate_keys_in_the_header_are_refused(tmp_path):
    # Python's json keeps the last of two keys; safetensors: "duplicate field"
    text = json.dumps({"__metadata__": META, "latents": LATENTS}).replace('"dtype"', '"dtype": "F16", "dtype"')
    refused(write_raw(tmp_path, text, b"\0" * 16), "unreadable header")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-0"])
def test_numbers_only_python_reads_are_refused(tmp_path, literal):
    # Python's json reads NaN, Infinity and -0 (an int 0); safetensors refuses them
    text = json.dumps({"__metadata__": META, "latents": LATENTS}).replace("[0, 16]", f"[{literal}, 16]")
    refused(write_raw(tmp_path, text, b"\0" * 16), "unreadable header")


def test_extra_fields_in_a_tensor_entry_are_refused(tmp_path):
    # a field nested deeper than safetensors' JSON recursion limit (128): "recursion limit exceeded"
    entry = dict(LATENTS, extra=json.loads("[" * 200 + "]" * 200))
    refused(write_raw(tmp_path, {"__metadata__": META, "latents": entry}, b"\0" * 16), "malformed entry for 'latents'")


def test_lone_surrogates_in_the_metadata_are_refused(tmp_path):
    # safetensors: "unexpected end of hex escape"; Python's json reads "\ud800" as a lone surrogate
    text = json.dumps({"__metadata__": dict(META, info="\ud800"), "latents": LATENTS})
    refused(write_raw(tmp_path, text, b"\0" * 16), "malformed metadata")


def test_an_element_count_past_64_bits_is_refused(tmp_path):
    # [2^31-1, 2^31-1, 2^31-1, 0] holds 0 elements for Python, overflows for safetensors
    entry = {"dtype": "F32", "shape": [2**31 - 1] * 3 + [0], "data_offsets": [0, 0]}
    refused(write_raw(tmp_path, {"__metadata__": META, "latents": entry}, b""), "malformed entry for 'latents'")


@pytest.mark.parametrize("key, tensor", [("clip_embeds", torch.zeros(())), ("pixels", torch.zeros((), dtype=torch.uint8))])
def test_scalar_extra_tensors_are_refused(tmp_path, key, tensor):
    # EmbeddingSet.__post_init__ read shape[0] of a 0-d tensor: IndexError
    refused(write_set_tensors(tmp_path, {"latents": torch.zeros(1, 4, 2, 2), key: tensor}), f"holds {key} of shape")


@pytest.mark.parametrize("tensors, match", [
    ({"latents": torch.zeros(2, 4, 2)}, "holds latents of shape"),
    ({"latents": torch.zeros(2, 4, 2, 2, 1)}, "holds latents of shape"),
    ({"latents": torch.zeros(2, 4, 2, 2), "clip_embeds": torch.zeros(3, 8)}, "3 clip_embeds rows for 2 items"),
    ({"latents": torch.zeros(2, 4, 2, 2), "pixels": torch.zeros(1, 8, 8, 3, dtype=torch.uint8)}, "1 pixels rows for 2 items"),
])
def test_shape_mismatches_name_the_file(tmp_path, tensors, match):
    # EmbeddingSet.__post_init__ refused these, but its message did not say which file
    refused(write_set_tensors(tmp_path, tensors, info={}), match)


@pytest.mark.parametrize("tensors, match", [
    ({"latents": torch.zeros(2, 4, 2, 2), "pixels": torch.zeros(2, 8, 8, 4, dtype=torch.uint8)}, "holds pixels of shape"),
    ({"latents": torch.zeros(2, 4, 2, 2), "clip_embeds": torch.zeros(2, 8, 1)}, "holds clip_embeds of shape"),
    ({"latents": torch.zeros(2, 0, 2, 2)}, "holds latents of shape"),
    ({"latents": torch.zeros(0, 4, 2, 2)}, "holds no items"),
])
def test_inconsistent_layouts_are_refused(tmp_path, tensors, match):
    # these loaded before: RGBA or 3-D extras, empty latents, no items
    refused(write_set_tensors(tmp_path, tensors, info={}), match)


@pytest.mark.parametrize("info", [[], {"encoder": {"a": 1}}, {"clip_encoder": [1]}, {"items": 5}, {"items": ["a"]},
                                  {"items": [1, 2]}])
def test_set_metadata_of_the_wrong_types_is_refused(tmp_path, info):
    # a dict encoder or list clip_encoder was carried into reports; wrong items became item_N silently
    refused(write_set_tensors(tmp_path, {"latents": torch.zeros(2, 4, 2, 2)}, info=info), "malformed set metadata")


def test_a_refusal_by_safetensors_itself_becomes_a_message(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    import safetensors.torch

    def refuse(path, *args, **kwargs):
        raise SafetensorError("Error while deserializing header: something new")
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    path = write_set_tensors(tmp_path, {"latents": torch.zeros(1, 4, 2, 2)})
    with pytest.raises(NudgeInputError, match="could not be read by safetensors.*something new") as err:
        sets.load_set(path)
    assert "'bad.safetensors'" in str(err.value) and isinstance(err.value.__cause__, SafetensorError)


@pytest.mark.parametrize("name", ["a\0b.safetensors", "\ud800.safetensors"])
def test_set_names_no_file_can_have_are_refused(tmp_path, name):
    # os.path.realpath raised ValueError (NUL) or UnicodeEncodeError (lone surrogate)
    with pytest.raises(NudgeInputError, match="characters no file name can have") as err:
        sets.resolve_set_path(str(tmp_path), name)
    assert repr(name)[1:-1] in str(err.value)


def test_a_name_for_the_folder_itself_is_refused(tmp_path):
    with pytest.raises(NudgeInputError, match="folder itself") as err:
        sets.resolve_set_path(str(tmp_path), "./")
    assert "'./'" in str(err.value)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "sets").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "sets" / "link")
    with pytest.raises(NudgeInputError, match="outside") as err:
        sets.resolve_set_path(str(tmp_path / "sets"), "link/secret.safetensors")
    assert "link/secret.safetensors" in str(err.value)
