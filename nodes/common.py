"""What every node family shares: the pack's custom types, its category, and user-facing errors."""
from __future__ import annotations

import contextlib

import torch
from comfy_api.latest import io

from ..nudging_core.errors import NudgeInputError

CATEGORY = "embedding nudging"
SET_FOLDER = "embedding_sets"

EmbeddingSetType = io.Custom("EMBEDDING_SET")
VerdictType = io.Custom("MEMORIZATION_VERDICT")


class NudgeNodeError(ValueError):
    """Shown to the user as is: it names the node, the input and the fix."""


@contextlib.contextmanager
def user_input(node_id: str, input_name: str):
    """Turn a core NudgeInputError into a message naming the node and the input."""
    try:
        yield
    except NudgeInputError as exc:
        raise NudgeNodeError(f"{node_id}: input '{input_name}': {exc}") from None


def desired_prompt_inputs(effect: str, strength_tooltip: str) -> list:
    """The two inputs every escaping node shares: the desired prompt and how far to move toward it."""
    return [
        io.Conditioning.Input("desired_positive", optional=True,
                              tooltip="Recommended: the prompt re-worded without what makes the image a copy (a "
                                      "title, a name), from a CLIPTextEncode. " + effect),
        io.Float.Input("desired_strength", default=0.75, min=0.0, max=1.0, step=0.05, optional=True,
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
