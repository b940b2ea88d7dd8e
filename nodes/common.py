"""What every node family shares: the pack's custom types, its category, and user-facing errors."""
from __future__ import annotations

import contextlib

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
