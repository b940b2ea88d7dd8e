"""ComfyUI registration: the pack's V3 extension. Node classes live in nodes_<family>.py."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import (nodes_conditional_regenerate, nodes_embedding_sets, nodes_guard_index, nodes_latent_nudge,
               nodes_memorization_filter, nodes_nudge_regenerate, nodes_sampling_guard)


class EmbeddingNudgingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*nodes_embedding_sets.NODES, *nodes_guard_index.NODES, *nodes_memorization_filter.NODES,
                *nodes_latent_nudge.NODES, *nodes_nudge_regenerate.NODES, *nodes_conditional_regenerate.NODES,
                *nodes_sampling_guard.NODES]


async def comfy_entrypoint() -> EmbeddingNudgingExtension:
    # Registered here, when ComfyUI loads the pack, rather than at import time.
    nodes_embedding_sets.register_set_folder()
    return EmbeddingNudgingExtension()
