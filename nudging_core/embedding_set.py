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


def _read_header(path: str) -> dict:
    """Parse and check the safetensors header without trusting it."""
    hint = "pick a set saved by SaveEmbeddingSet or the build_embedding_set command"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise NudgeInputError(f"'{os.path.basename(path)}' is empty or truncated; {hint}")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise NudgeInputError(
                f"'{os.path.basename(path)}' is not a complete safetensors file (header of {length} bytes "
                f"in a {size}-byte file): it is truncated or another format; {hint}")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise NudgeInputError(f"'{os.path.basename(path)}' is not a safetensors file (unreadable header); {hint}") from None
    if not isinstance(header, dict):
        raise NudgeInputError(f"'{os.path.basename(path)}' has a malformed safetensors header; {hint}")
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise NudgeInputError(f"'{os.path.basename(path)}' has malformed metadata; {hint}")
            continue
        if name not in _ALLOWED_TENSORS:
            raise NudgeInputError(f"'{os.path.basename(path)}' holds an unexpected tensor '{name[:40]}'; it is not an embedding set; {hint}")
        ok = (isinstance(entry, dict) and entry.get("dtype") in _ALLOWED_TENSORS[name]
              and isinstance(entry.get("shape"), list) and all(isinstance(d, int) and 0 <= d < 2**31 for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(isinstance(o, int) for o in entry["data_offsets"]))
        if not ok:
            raise NudgeInputError(f"'{os.path.basename(path)}' has a malformed entry for '{name}'; {hint}")
        begin, end = entry["data_offsets"]
        count = 1
        for d in entry["shape"]:
            count *= d
        if not (0 <= begin <= end <= data_size) or end - begin != count * _DTYPE_BYTES[entry["dtype"]]:
            raise NudgeInputError(f"'{os.path.basename(path)}' is truncated or corrupt (tensor '{name}' lies outside the file); {hint}")
    return header


def load_set(path: str) -> EmbeddingSet:
    """Load a set file, refusing anything that is not a well-formed set of a known version."""
    if not os.path.isfile(path):
        raise NudgeInputError(f"set file '{os.path.basename(path)}' does not exist; refresh the list (press R) or rebuild the set")
    header = _read_header(path)
    meta = header.get("__metadata__", {})
    name = os.path.basename(path)
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
    from safetensors.torch import load_file

    tensors = load_file(path)
    items = info.get("items") if isinstance(info, dict) else None
    count = tensors["latents"].shape[0]
    if not isinstance(items, list) or len(items) != count or not all(isinstance(i, str) for i in items):
        items = [f"item_{i}" for i in range(count)]
    return EmbeddingSet(
        latents=tensors["latents"].float(), names=items,
        encoder=str(info.get("encoder", "unknown")) if isinstance(info, dict) else "unknown",
        clip_embeds=tensors["clip_embeds"].float() if "clip_embeds" in tensors else None,
        clip_encoder=info.get("clip_encoder") if isinstance(info, dict) else None,
        pixels=tensors.get("pixels"),
    )


def resolve_set_path(folder: str, name: str) -> str:
    """The path of set `name` inside `folder`; names that would leave the folder are refused."""
    if not isinstance(name, str) or not name.strip():
        raise NudgeInputError("no set name given; pick a set from the list")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
        raise NudgeInputError(f"set name '{name}' must be a plain name inside the embedding_sets folder (no '..', no absolute path)")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise NudgeInputError(f"set name '{name}' points outside the embedding_sets folder")
    return path


def free_set_path(folder: str, name: str) -> str:
    """A path for saving `name` that never overwrites: name.safetensors, else name_001..."""
    stem = name[: -len(EXTENSION)] if name.endswith(EXTENSION) else name
    candidate = resolve_set_path(folder, stem + EXTENSION)
    counter = 1
    while os.path.exists(candidate):
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
            f"latent has {want[0]} channels; rebuild the set with this graph's VAE")
    if want != have:
        raise NudgeInputError(
            f"the {role} set was built at latent size {have[1]}x{have[2]} but the graph's latent is "
            f"{want[1]}x{want[2]}; rebuild the set from images of the generation size "
            f"({want[2] * 8}x{want[1] * 8} for SD 1.x) or change the generation size")
