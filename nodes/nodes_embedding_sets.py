"""Embedding-set family: build a set from images, save it, load it by name."""
from __future__ import annotations

import os

import folder_paths
import torch
from safetensors import SafetensorError
from comfy_api.latest import io, ui

from ..nudging_core import embedding_set as sets
from ..nudging_core.guard_index import MANIFEST
from .common import (CATEGORY, SET_FOLDER, EmbeddingSetType, NudgeNodeError, check_inputs, queue_time_check,
                     set_folder_listing, stat_fingerprint, user_input)


def register_set_folder() -> None:
    """Register models/embedding_sets with folder_paths (extra_model_paths.yaml can add more)."""
    folder_paths.add_model_folder_path(SET_FOLDER, os.path.join(folder_paths.models_dir, SET_FOLDER), is_default=True)


def list_set_names() -> list[str]:
    # A guard index's shards are safetensors files too, but not sets: Load Guard Index lists their folder.
    names, guard_folders = set_folder_listing(MANIFEST)
    return [n for n in names if n.endswith(sets.EXTENSION) and os.path.dirname(n) not in guard_folders]


def find_set_file(node_id: str, name: str) -> str:
    """The file behind a set name, searched in every registered embedding_sets folder."""
    with user_input(node_id, "set_name"):
        for folder in folder_paths.get_folder_paths(SET_FOLDER):
            path = sets.resolve_set_path(folder, name)
            if os.path.isfile(path):
                return path
    raise NudgeNodeError(f"{node_id}: input 'set_name': no set '{name}' in {SET_FOLDER}; "
                         "refresh the list (press R) or build the set with SaveEmbeddingSet")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class LoadEmbeddingSet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LoadEmbeddingSet",
            display_name="Load Embedding Set (Nudging)",
            category=CATEGORY,
            description="Loads a saved embedding set (a safetensors file in models/embedding_sets) to guard "
                        "against or to pull toward.",
            inputs=[
                io.Combo.Input("set_name", options=list_set_names(),
                               tooltip="A set file in models/embedding_sets (or a folder added for embedding_sets "
                                       "in extra_model_paths.yaml). Press R to refresh after saving a new set."),
            ],
            outputs=[
                EmbeddingSetType.Output(display_name="embedding_set", tooltip="The loaded set."),
                io.Int.Output(display_name="count", tooltip="How many items the set holds."),
            ],
        )

    @classmethod
    def validate_inputs(cls, set_name):
        return queue_time_check(find_set_file, "LoadEmbeddingSet", set_name)

    @classmethod
    def fingerprint_inputs(cls, set_name):
        # Reload when the file changes on disk, not only when the name changes.
        return stat_fingerprint(find_set_file, "LoadEmbeddingSet", set_name)

    @classmethod
    def execute(cls, set_name) -> io.NodeOutput:
        path = find_set_file("LoadEmbeddingSet", set_name)
        with user_input("LoadEmbeddingSet", "set_name"):
            loaded = sets.load_set(path)      # refuses a set without items, naming the file
        return io.NodeOutput(loaded, len(loaded))


class BuildEmbeddingSet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BuildEmbeddingSet",
            display_name="Build Embedding Set (Nudging)",
            category=CATEGORY,
            description="Encodes an image batch into an embedding set: latents from the graph's VAE, optional CLIP "
                        "image embeddings and small pixel copies for the memorization test.",
            inputs=[
                io.Image.Input("images", tooltip="The images the set stands for (e.g. training images to guard)."),
                io.Vae.Input("vae", tooltip="The VAE of the graph the set will be used in; latents must match it."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional: also store CLIP image embeddings for the CLIP-space check."),
                io.Boolean.Input("store_pixels", default=True,
                                 tooltip="Keep uint8 pixel copies; MemorizationFilter needs them for tiled L2."),
                io.String.Input("item_names", default="", multiline=True,
                                tooltip="Optional names, one per line or comma-separated; empty gives item_0, item_1..."),
            ],
            outputs=[EmbeddingSetType.Output(display_name="embedding_set", tooltip="The new set (not yet saved).")],
        )

    @classmethod
    def execute(cls, images, vae, store_pixels, item_names, clip_vision=None) -> io.NodeOutput:
        check_inputs(cls, locals())
        count = images.shape[0]
        names = [n.strip() for n in item_names.replace(",", "\n").splitlines() if n.strip()]
        if names and len(names) != count:
            raise NudgeNodeError(f"BuildEmbeddingSet: input 'item_names': {len(names)} names for {count} images; "
                                 "give one name per image or leave it empty")
        if not all(_encodable(n) for n in names):
            # A lone surrogate (possible in JSON) would be saved, and the set then refused by the loader.
            raise NudgeNodeError("BuildEmbeddingSet: input 'item_names': a name holds characters that are not text "
                                 "(a lone surrogate); use plain text names")
        scale = int(vae.spacial_compression_encode()) if hasattr(vae, "spacial_compression_encode") else 8
        if min(images.shape[1:3]) < scale:
            raise NudgeNodeError(f"BuildEmbeddingSet: input 'images': {images.shape[2]}x{images.shape[1]} images are "
                                 f"smaller than the VAE's {scale}-pixel latent cell; use images of at least "
                                 f"{scale}x{scale} (the generation size)")
        names = names or [f"item_{i}" for i in range(count)]
        latents = vae.encode(images[:, :, :, :3])
        if not torch.isfinite(latents).all():
            raise NudgeNodeError("BuildEmbeddingSet: input 'vae': the VAE encoded the images to NaN or infinite "
                                 "latents; a set built from them could guard nothing. Check the VAE (fp16 overflow: "
                                 "try --force-fp32)")
        clip_embeds, clip_name = None, None
        if clip_vision is not None:
            clip_embeds = clip_vision.encode_image(images).image_embeds.float().cpu()
            clip_name = type(getattr(clip_vision, "model", clip_vision)).__name__
        with user_input("BuildEmbeddingSet", "images"):
            built = sets.EmbeddingSet(
                latents=latents.float().cpu(), names=names, encoder=sets.encoder_identity(vae),
                clip_embeds=clip_embeds, clip_encoder=clip_name,
                pixels=sets.pixels_to_uint8(images) if store_pixels else None)
        return io.NodeOutput(built)


MAX_SUBFOLDERS = 16


class SaveEmbeddingSet(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SaveEmbeddingSet",
            display_name="Save Embedding Set (Nudging)",
            category=CATEGORY,
            description="Saves an embedding set as one safetensors file in models/embedding_sets. An existing file "
                        "is never overwritten: a numbered name is used instead.",
            inputs=[
                EmbeddingSetType.Input("embedding_set", tooltip="The set to save."),
                io.String.Input("set_name", default="guarded_images",
                                tooltip="File name inside models/embedding_sets (subfolders allowed, no '..')."),
            ],
            outputs=[io.String.Output(display_name="saved_name", tooltip="The name the set was saved under.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, embedding_set, set_name) -> io.NodeOutput:
        check_inputs(cls, locals())
        if len(embedding_set) == 0:
            raise NudgeNodeError("SaveEmbeddingSet: input 'embedding_set': the set holds no items (nothing was "
                                 "flagged?); LoadEmbeddingSet would refuse the file, so nothing is saved")
        if 0 in embedding_set.latent_shape:
            raise NudgeNodeError("SaveEmbeddingSet: input 'embedding_set': the set holds no latents (its items came "
                                 "from a guard index, which keeps only small comparison copies); LoadEmbeddingSet would "
                                 "refuse the file, so nothing is saved. Build a set from the images themselves with "
                                 "Build Embedding Set")
        name = set_name.strip()
        parts = name.replace("\\", "/").split("/")
        if not name or len(parts) > MAX_SUBFOLDERS or max(len(p.encode("utf-8", "replace")) for p in parts) > 200:
            # Checked before anything is created: os.makedirs recurses once per folder level.
            raise NudgeNodeError("SaveEmbeddingSet: input 'set_name': give a file name (at most 200 bytes per "
                                 f"part, {MAX_SUBFOLDERS - 1} subfolders), e.g. guarded_images")
        folder = folder_paths.get_folder_paths(SET_FOLDER)[0]
        with user_input("SaveEmbeddingSet", "set_name"):
            path = sets.free_set_path(folder, name)
        if os.path.lexists(path):
            # A link that resolves nowhere (a loop): exists() says no, but the write would replace the link.
            raise NudgeNodeError(f"SaveEmbeddingSet: input 'set_name': '{os.path.relpath(path, folder)[:120]}' is "
                                 "taken by a broken link; pick another name")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            sets.save_set(embedding_set, path)
        except (OSError, SafetensorError) as exc:     # a name too long for the file system, a full disk...
            raise NudgeNodeError(f"SaveEmbeddingSet: input 'set_name': cannot write "
                                 f"'{os.path.relpath(path, folder)[:120]}' ({exc}); pick a shorter, plain name or "
                                 "check the folder") from None
        saved = os.path.relpath(path, folder)
        return io.NodeOutput(saved, ui=ui.PreviewText(f"saved {len(embedding_set)} items as {saved}"))


NODES = [LoadEmbeddingSet, BuildEmbeddingSet, SaveEmbeddingSet]
