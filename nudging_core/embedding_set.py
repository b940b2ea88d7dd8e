"""Embedding sets: the shareable file format and its safe loading.

A set is ONE safetensors file (never pickle) holding, for N items:
  latents       [N, C, h, w]  the items as the graph's VAE encodes them (ComfyUI LATENT space)
  clip_embeds   [N, D]        optional CLIP image embeddings
  pixels        [N, H, W, 3]  optional uint8 copies, for the tiled-L2 memorization test
and string metadata: format name and version, plus a JSON "info" entry with the encoder
identity, latent shape, item names and image size. Files are checked before any tensor is
read: a truncated, foreign or hostile file is refused with a message that says what to do.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field, replace

import torch

from .errors import NudgeInputError

FORMAT_NAME = "embedding-nudging-set"
FORMAT_VERSION = 1
EXTENSION = ".safetensors"
MAX_HEADER_BYTES = 16 * 1024 * 1024
_ALLOWED_TENSORS = {"latents": ("F16", "F32", "BF16"), "clip_embeds": ("F16", "F32", "BF16"), "pixels": ("U8",)}
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "U8": 1}


@dataclass
class EmbeddingSet:
    """A set of images as latents (always), CLIP embeddings and pixel copies (optional).

    `owners` is set only on sets made by the filter: owners[i] is the batch index of the
    generated image that item i was matched to, so the nudge pushes each image from its own
    match instead of from every match in the batch.
    """

    latents: torch.Tensor
    names: list[str]
    encoder: str = "unknown"
    clip_embeds: torch.Tensor | None = None
    clip_encoder: str | None = None
    pixels: torch.Tensor | None = None
    owners: list[int] | None = field(default=None)
    # Made from the set on first use and kept with it: its copies at a comparison size (per size, grid
    # and device) and its latents at another generation size (per size and VAE). See set_sizes.
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.latents.ndim != 4:
            raise NudgeInputError(f"set latents must be [items, channels, height, width], got {tuple(self.latents.shape)}")
        if len(self.names) != self.latents.shape[0]:
            raise NudgeInputError(f"set has {self.latents.shape[0]} latents but {len(self.names)} names")
        for label, extra in (("clip_embeds", self.clip_embeds), ("pixels", self.pixels)):
            if extra is not None and extra.shape[0] != len(self.names):
                raise NudgeInputError(f"set {label} has {extra.shape[0]} rows for {len(self.names)} items")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    @property
    def image_size(self) -> tuple[int, int] | None:
        return None if self.pixels is None else (int(self.pixels.shape[1]), int(self.pixels.shape[2]))

    def pixels_float(self) -> torch.Tensor:
        """Pixel copies as floats in [0, 1], [N, H, W, 3]."""
        if self.pixels is None:
            raise NudgeInputError("this set holds no pixel copies; rebuild it with store_pixels on")
        return self.pixels.float() / 255.0

    def comparison_tiles(self, hw: tuple[int, int], grid: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """The pixel copies at comparison size hw, cut into tiles, on `device` (made once: see tiled_l2)."""
        from .tiled_l2 import comparison_tiles
        if self.pixels is None:
            raise NudgeInputError("this set holds no pixel copies; rebuild it with store_pixels on")
        key = (int(hw[0]), int(hw[1]), int(grid), str(device))
        if key not in self._derived:
            self._derived[key] = comparison_tiles(self.pixels, hw, grid, device)
        return self._derived[key]

    def subset(self, indices: list[int], owners: list[int] | None = None) -> "EmbeddingSet":
        idx = torch.tensor(indices, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return replace(self, latents=self.latents[idx], names=[self.names[i] for i in indices],
                       clip_embeds=pick(self.clip_embeds), pixels=pick(self.pixels), owners=owners)

    def info(self) -> dict:
        return {
            "encoder": self.encoder,
            "latent_shape": list(self.latent_shape),
            "items": list(self.names),
            "clip_encoder": self.clip_encoder if self.clip_embeds is not None else None,
            "image_size": list(self.image_size) if self.image_size else None,
        }


def pixels_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE floats [N, H, W, C] in [0, 1] -> uint8 RGB copies."""
    return (images[..., :3].clamp(0, 1) * 255.0).round().to(torch.uint8).cpu()


def encoder_identity(vae) -> str:
    """A short, stable name for a ComfyUI VAE: model class, latent channels, hash of its first weights."""
    model = getattr(vae, "first_stage_model", None)
    name = type(model).__name__ if model is not None else type(vae).__name__
    digest = "unknown"
    if model is not None:
        first = next(iter(model.state_dict().values()), None)
        if first is not None:
            digest = hashlib.sha256(first.detach().float().cpu().numpy().tobytes()).hexdigest()[:12]
    return f"{name}/{getattr(vae, 'latent_channels', '?')}ch/{digest}"


def save_set(embedding_set: EmbeddingSet, path: str) -> None:
    from safetensors.torch import save_file

    tensors = {"latents": embedding_set.latents.detach().float().cpu().contiguous()}
    if embedding_set.clip_embeds is not None:
        tensors["clip_embeds"] = embedding_set.clip_embeds.detach().float().cpu().contiguous()
    if embedding_set.pixels is not None:
        tensors["pixels"] = embedding_set.pixels.cpu().contiguous()
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                "info": json.dumps(embedding_set.info())}
    save_file(tensors, path, metadata=metadata)


_HINT = "pick a set saved by SaveEmbeddingSet or the build_embedding_set command"
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def _unique_keys(pairs: list) -> dict:
    """json object hook: Python keeps the last of duplicate keys, safetensors refuses them."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _refuse_constant(constant: str):
    raise ValueError(f"{constant} is not JSON")


def _natural(literal: str) -> int:
    """json int hook: safetensors reads sizes as unsigned, so '-0' (an int 0 to Python) is refused too."""
    if literal.startswith("-"):
        raise ValueError("negative size")
    return int(literal)


def _is_text(value) -> bool:
    """A str that is valid Unicode: JSON escapes can smuggle in lone surrogates, which safetensors
    refuses in the header and which no file name, report or saved set can hold."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_raw_header(path: str, max_bytes: int) -> tuple[int, int | None, bytes | None]:
    """(file size, header length, header bytes) of a safetensors file, trusting nothing: the length
    is None when the file is shorter than its 8-byte prefix, the bytes None when the length is over
    max_bytes or past the end of the file. OSError is the caller's to word."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        raw = f.read(length) if length is not None and length <= max_bytes and 8 + length <= size else None
    return size, length, raw


def parse_header_json(raw: bytes):
    """The header's JSON as safetensors' own parser reads it (duplicate keys, NaN, '-0' and lone
    surrogates refused): raises UnicodeDecodeError, ValueError or RecursionError otherwise."""
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_refuse_constant,
                      parse_int=_natural)


def _read_header(path: str) -> dict:
    """Parse and check the safetensors header without trusting it.

    It refuses everything safetensors' own parser refuses, so that no raw SafetensorError reaches
    the user: duplicate keys, NaN/Infinity, '-0', lone surrogates, element counts that overflow 64 bits,
    and data offsets that do not tile the data section exactly (sorted by offset, each tensor must
    start where the previous one ends and the last must end at the end of the file).
    """
    name = os.path.basename(path)
    try:
        size, length, raw = read_raw_header(path, MAX_HEADER_BYTES)
    except OSError as exc:
        raise NudgeInputError(f"'{name}' cannot be read ({exc.strerror or exc}); check the file's permissions") from None
    if length is None:
        raise NudgeInputError(f"'{name}' is empty or truncated; {_HINT}")
    if raw is None:
        raise NudgeInputError(
            f"'{name}' is not a complete safetensors file (header of {length} bytes "
            f"in a {size}-byte file): it is truncated or another format; {_HINT}")
    try:
        header = parse_header_json(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise NudgeInputError(f"'{name}' is not a safetensors file (unreadable header); {_HINT}") from None
    if not isinstance(header, dict):
        raise NudgeInputError(f"'{name}' has a malformed safetensors header; {_HINT}")
    data_size = size - 8 - length
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(_is_text(k) and _is_text(v) for k, v in entry.items()):
                raise NudgeInputError(f"'{name}' has malformed metadata; {_HINT}")
            continue
        if key not in _ALLOWED_TENSORS:
            raise NudgeInputError(f"'{name}' holds an unexpected tensor {key[:40]!r}; it is not an embedding set; {_HINT}")
        ok = (isinstance(entry, dict) and set(entry) == _ENTRY_KEYS and entry["dtype"] in _ALLOWED_TENSORS[key]
              and isinstance(entry["shape"], list) and all(type(d) is int and 0 <= d < 2**31 for d in entry["shape"])
              and isinstance(entry["data_offsets"], list) and len(entry["data_offsets"]) == 2
              and all(type(o) is int for o in entry["data_offsets"]))
        count = 1
        for d in entry["shape"] if ok else ():
            count *= d
            ok = ok and count < 2**64 // 8      # safetensors multiplies in 64 bits: overflow before a 0 fails
        if not ok:
            raise NudgeInputError(f"'{name}' has a malformed entry for '{key}'; {_HINT}")
        begin, end = entry["data_offsets"]
        if not (0 <= begin <= end <= data_size) or end - begin != count * _DTYPE_BYTES[entry["dtype"]]:
            raise NudgeInputError(f"'{name}' is truncated or corrupt (tensor '{key}' lies outside the file); {_HINT}")
        spans.append((begin, end, key))
    covered = 0
    for begin, end, key in sorted(spans):
        if begin != covered:
            raise NudgeInputError(f"'{name}' is corrupt (tensor '{key}' overlaps another or leaves a gap); {_HINT}")
        covered = end
    if covered != data_size:
        raise NudgeInputError(
            f"'{name}' is corrupt ({data_size - covered} bytes after the last tensor belong to none); {_HINT}")
    return header


def _shape_text(shape: list) -> str:
    return str(shape) if len(shape) <= 6 else f"[{', '.join(map(str, shape[:6]))}, ...]"


def _item_count(name: str, header: dict) -> int:
    """The number of items, once the header's shapes make a set: [N, C, h, w] latents with N >= 1,
    and [N, D] CLIP embeddings and [N, H, W, 3] pixels for the same N, no dimension empty."""
    latents = header["latents"]["shape"]
    if len(latents) != 4 or 0 in latents[1:]:
        raise NudgeInputError(f"'{name}' holds latents of shape {_shape_text(latents)}, not [items, channels, "
                              "height, width]; rebuild the set")
    count = latents[0]
    if count == 0:
        raise NudgeInputError(f"'{name}' holds no items; rebuild it from at least one image")
    for key, layout in (("clip_embeds", "[items, dims]"), ("pixels", "[items, height, width, 3]")):
        shape = header.get(key, {}).get("shape")
        if shape is None:
            continue
        if len(shape) != layout.count(",") + 1 or 0 in shape or (key == "pixels" and shape[3] != 3):
            raise NudgeInputError(f"'{name}' holds {key} of shape {_shape_text(shape)}, not {layout}; rebuild the set")
        if shape[0] != count:
            raise NudgeInputError(f"'{name}' holds {shape[0]} {key} rows for {count} items; rebuild the set")
    return count


def _set_info(name: str, info, count: int) -> tuple[list[str], str, str | None]:
    """Item names, encoder and CLIP encoder from the 'info' metadata. Missing entries get defaults;
    entries of the wrong type are refused rather than carried into reports and saved sets."""
    items = info.get("items") if isinstance(info, dict) else None
    if items is None:
        items = [f"item_{i}" for i in range(count)]
    encoder = info.get("encoder", "unknown") if isinstance(info, dict) else None
    clip_encoder = info.get("clip_encoder") if isinstance(info, dict) else None
    if not isinstance(info, dict) or not _is_text(encoder) or not (clip_encoder is None or _is_text(clip_encoder)):
        raise NudgeInputError(f"'{name}' has malformed set metadata (its 'info' entry is not a set description); "
                              "rebuild the set")
    if not isinstance(items, list) or len(items) != count or not all(_is_text(i) for i in items):
        raise NudgeInputError(f"'{name}' has malformed set metadata (the item names are not {count} strings); "
                              "rebuild the set")
    return items, encoder, clip_encoder


def load_set(path: str) -> EmbeddingSet:
    """Load a set file, refusing anything that is not a well-formed set of a known version.

    Everything is checked from the header before a tensor is read (a hostile file costs no memory),
    so the set handed on is consistent; a refusal by safetensors itself that the checks missed is
    still turned into a message here, never passed on raw. NaN latents load: the nodes that use
    them refuse them, naming themselves.
    """
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise NudgeInputError(f"set file '{name}' does not exist; refresh the list (press R) or rebuild the set")
    header = _read_header(path)
    meta = header.get("__metadata__", {})
    if meta.get("format") != FORMAT_NAME:
        raise NudgeInputError(f"'{name}' is a safetensors file but not an embedding set (no '{FORMAT_NAME}' metadata)")
    try:
        version = int(meta.get("format_version", "0"))
        info = json.loads(meta.get("info", "{}"))
    except (ValueError, RecursionError):
        raise NudgeInputError(f"'{name}' has unreadable set metadata; rebuild the set") from None
    if version > FORMAT_VERSION:
        raise NudgeInputError(f"'{name}' uses set format {version}, newer than this pack's {FORMAT_VERSION}; update the pack")
    if "latents" not in header:
        raise NudgeInputError(f"'{name}' holds no latents; rebuild the set")
    items, encoder, clip_encoder = _set_info(name, info, _item_count(name, header))
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as exc:  # noqa: BLE001 - only the load: whatever safetensors refuses is a bad file
        raise NudgeInputError(f"'{name}' could not be read by safetensors ({type(exc).__name__}: {exc}); "
                              f"{_HINT}") from exc
    return EmbeddingSet(
        latents=tensors["latents"].float(), names=items, encoder=encoder,
        clip_embeds=tensors["clip_embeds"].float() if "clip_embeds" in tensors else None,
        clip_encoder=clip_encoder, pixels=tensors.get("pixels"),
    )


def resolve_set_path(folder: str, name: str, what: str = "set") -> str:
    """The path of set `name` inside `folder`; names that would leave the folder are refused.

    Names come from workflow JSON: NUL bytes and lone surrogates, which the OS cannot take, are
    refused here rather than left to fail as a ValueError inside os.path.realpath. `what` names the
    kind of thing in the messages (a guard index's folder is resolved by the same rules).
    """
    if not isinstance(name, str) or not name.strip():
        raise NudgeInputError(f"no {what} name given; pick a {what} from the list")
    try:
        os.fsencode(name)               # a lone surrogate does not encode
        bad_chars = "\0" in name
    except UnicodeEncodeError:
        bad_chars = True
    if bad_chars:
        raise NudgeInputError(f"{what} name {name[:80]!r} holds characters no file name can have; pick a {what} from "
                              "the list")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
        raise NudgeInputError(f"{what} name '{name}' must be a plain name inside the embedding_sets folder (no '..', "
                              "no absolute path)")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise NudgeInputError(f"{what} name '{name}' points outside the embedding_sets folder")
    if path == root:
        raise NudgeInputError(f"{what} name '{name}' names the embedding_sets folder itself; pick a {what} from the list")
    return path


def free_set_path(folder: str, name: str) -> str:
    """A path for saving `name` that never overwrites: name.safetensors, else name_001..."""
    stem = name[: -len(EXTENSION)] if name.endswith(EXTENSION) else name
    candidate = resolve_set_path(folder, stem + EXTENSION)
    counter = 1
    while os.path.lexists(candidate):   # a dangling or looping link is taken too
        candidate = resolve_set_path(folder, f"{stem}_{counter:03d}{EXTENSION}")
        counter += 1
    return candidate


def check_latent_compatible(embedding_set: EmbeddingSet, latent: torch.Tensor, role: str) -> None:
    """Raise when the set's latents cannot be compared with the graph's latent."""
    if latent.ndim != 4:
        raise NudgeInputError(f"the latent must be [batch, channels, height, width], got {tuple(latent.shape)}")
    if len(embedding_set) == 0:
        raise NudgeInputError(f"the {role} set is empty; build it from at least one image")
    want, have = tuple(latent.shape[1:]), embedding_set.latent_shape
    if want[0] != have[0]:
        raise NudgeInputError(
            f"the {role} set has {have[0]}-channel latents (encoder '{embedding_set.encoder}') but the graph's "
            f"latent has {want[0]} channels; connect the node's vae input (a set with pixel copies is re-encoded "
            "by it) or rebuild the set with this graph's VAE")
    if want != have:
        raise NudgeInputError(
            f"the {role} set was built at latent size {have[1]}x{have[2]} but the graph's latent is "
            f"{want[1]}x{want[2]}; connect the node's vae input (a set with pixel copies is then re-encoded at "
            "this size, once) or rebuild the set from images of the generation size")
