"""What every node family shares: the pack's custom types, its category, and user-facing errors."""
from __future__ import annotations

import contextlib
import math
import os

import torch
import folder_paths
from comfy_api.latest import io

from ..nudging_core.embedding_set import EmbeddingSet, check_latent_compatible, encoder_identity
from ..nudging_core.errors import NudgeInputError
from ..nudging_core.index_guard import IndexGuard
from ..nudging_core.memorization import Verdict
from ..nudging_core.set_sizes import latents_for

CATEGORY = "embedding nudging"
SET_FOLDER = "embedding_sets"

EmbeddingSetType = io.Custom("EMBEDDING_SET")
VerdictType = io.Custom("MEMORIZATION_VERDICT")
GuardIndexType = io.Custom("NUDGE_GUARD_INDEX")


class NudgeNodeError(ValueError):
    """Shown to the user as is: it names the node, the input and the fix."""


@contextlib.contextmanager
def user_input(node_id: str, input_name: str):
    """Turn a core NudgeInputError into a message naming the node and the input."""
    try:
        yield
    except NudgeInputError as exc:
        raise NudgeNodeError(f"{node_id}: input '{input_name}': {exc}") from None


def set_folder_listing(manifest_name: str) -> tuple[list[str], set[str]]:
    """Every file under the embedding_sets folders (relative names, ComfyUI's cached listing) and the
    folders among them that hold a guard index (a `manifest_name` file; "" for a top-level one)."""
    try:
        names = folder_paths.get_filename_list(SET_FOLDER)
    except KeyError:
        return [], set()
    return names, {os.path.dirname(n) for n in names if os.path.basename(n) == manifest_name}


def queue_time_check(find, node_id: str, value) -> bool | str:
    """validate_inputs' answer for a name that find(node_id, value) resolves to a file or folder: True, or
    the message naming the node, the input and the fix. Naming the input in validate_inputs makes ComfyUI
    skip its own combo check ("Value not in list"), so a missing one is refused with this message at
    queue time. A value fed by a link is None there: it is only known when the graph runs."""
    if value is None:
        return True
    try:
        find(node_id, value)
    except NudgeNodeError as exc:
        return str(exc)
    return True


def stat_fingerprint(find, node_id: str, value, file_in=lambda found: found) -> str:
    """fingerprint_inputs for a name resolved by find: changes when the file (file_in(what find found))
    is rewritten, not only when the name changes; the name itself where it does not resolve."""
    try:
        path = file_in(find(node_id, value))
        stat = os.stat(path)
    except (NudgeNodeError, OSError):
        return value
    return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"


def desired_prompt_inputs(effect: str, strength_tooltip: str) -> list:
    """The two inputs every escaping node shares: the desired prompt and how far to move toward it."""
    return [
        io.Conditioning.Input("desired_positive", optional=True,
                              tooltip="Recommended: the prompt re-worded without what makes the image a copy (a "
                                      "title, a name), from a CLIPTextEncode. " + effect),
        io.Float.Input("desired_strength", default=0.9, min=0.0, max=1.0, step=0.05, optional=True,
                       tooltip=strength_tooltip),
    ]


def desired_tensor(node_id: str, conditioning) -> torch.Tensor:
    """The embedding of a CONDITIONING input (its first entry), with a node-named error otherwise."""
    try:
        tensor = conditioning[0][0]
        if not torch.is_tensor(tensor) or tensor.ndim != 3:
            raise TypeError
    except (TypeError, IndexError, KeyError):
        raise NudgeNodeError(f"{node_id}: input 'desired_positive': expected a CONDITIONING from CLIPTextEncode; "
                             "connect the desired prompt's text encoder") from None
    return tensor


def set_latents_for(node_id: str, input_name: str, embedding_set, latent: torch.Tensor, vae, role: str) -> torch.Tensor:
    """The set's latents at the latent's size: with the graph's VAE, a set built at another size is
    re-encoded from its pixel copies (once per set, size and VAE); without one it must match."""
    with user_input(node_id, input_name):
        if vae is None:
            check_latent_compatible(embedding_set, latent, role)
            return embedding_set.latents
        scale = vae.spacial_compression_encode() if hasattr(vae, "spacial_compression_encode") else 8
        return latents_for(embedding_set, latent, vae.encode, encoder_identity(vae), int(scale), role)


# What each socket type must hold. An API prompt can put a literal (5, "x", null) where a link belongs
# and ComfyUI hands it on as is; so can a custom node that returns the wrong thing.
_SOCKETS = {
    "LATENT": (lambda v: isinstance(v, dict) and torch.is_tensor(v.get("samples")), "a LATENT"),
    "IMAGE": (lambda v: torch.is_tensor(v) and v.ndim == 4, "an IMAGE batch [batch, height, width, channels]"),
    "CONDITIONING": (lambda v: isinstance(v, list) and len(v) > 0 and all(
        isinstance(c, (list, tuple)) and len(c) >= 2 and torch.is_tensor(c[0]) and isinstance(c[1], dict) for c in v),
        "a CONDITIONING"),
    "MODEL": (lambda v: hasattr(v, "get_model_object") and hasattr(v, "clone"), "a MODEL"),
    "VAE": (lambda v: hasattr(v, "decode") and hasattr(v, "encode"), "a VAE"),
    "CLIP_VISION": (lambda v: hasattr(v, "encode_image"), "a CLIP_VISION model"),
    "EMBEDDING_SET": (lambda v: isinstance(v, EmbeddingSet), "an EMBEDDING_SET"),
    "MEMORIZATION_VERDICT": (lambda v: isinstance(v, Verdict), "MemorizationFilter's verdicts"),
    "NUDGE_GUARD_INDEX": (lambda v: isinstance(v, IndexGuard), "a guard index from LoadGuardIndex"),
}


def check_inputs(node: type[io.ComfyNode], values: dict) -> None:
    """Refuse, naming the node and the input, what ComfyUI's own validation lets through to execute:
    NaN floats (NaN passes its min/max test), V3 combo values 0.3.75 does not check, and literals
    or wrong objects where a link belongs. Missing optional and unevaluated lazy inputs are None."""
    schema = node.define_schema()
    for spec in schema.inputs:
        name, kind, value = spec.id, spec.get_io_type(), values.get(spec.id)
        where = f"{schema.node_id}: input '{name}'"
        if value is None:
            if spec.optional or spec.lazy:
                continue
            raise NudgeNodeError(f"{where}: no value; connect it (or give it a value)")
        if kind == "FLOAT":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise NudgeNodeError(f"{where}: {value!r} is not a finite number; give a number")
        elif kind == "INT":
            if isinstance(value, bool) or not isinstance(value, int):
                raise NudgeNodeError(f"{where}: {value!r} is not a whole number; give a whole number")
        elif kind == "COMBO":
            if not isinstance(value, str) or value not in spec.options:
                raise NudgeNodeError(f"{where}: {str(value)[:80]!r} is not one of {list(spec.options)[:12]}; pick one")
        elif kind in _SOCKETS:
            ok, what = _SOCKETS[kind]
            if not ok(value):
                raise NudgeNodeError(f"{where}: expected {what}, got {type(value).__name__}; link a node's {kind} "
                                     "output to it (an API prompt must link this input, not give it a value)")
