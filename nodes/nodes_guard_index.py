"""Guard-index family: load a guard index (a folder of a million guarded images) by name.

An index lives in a subfolder of models/embedding_sets (any folder registered for embedding_sets)
that holds its guard.json; its name is that subfolder's path. Names are confined to those folders
by the rules set names follow (no '..', no absolute path, no link out of the folder).
"""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from ..nudging_core import embedding_set as sets
from ..nudging_core.errors import NudgeInputError
from ..nudging_core.guard_index import MANIFEST
from ..nudging_core.index_guard import OpenedIndexes
from .common import (CATEGORY, SET_FOLDER, GuardIndexType, NudgeNodeError, queue_time_check, set_folder_listing,
                     stat_fingerprint, user_input)

NODE_ID = "LoadGuardIndex"
BUILD_HINT = ("build one into a subfolder of models/embedding_sets: python -m guard_build --images DIR --out "
              "ComfyUI/models/embedding_sets/NAME (or nudging_core.guard_index.build_sharded_guard)")

# Opening an index reads 192 bytes an item; kept open across prompts and graphs, per folder and
# guard.json version, at most two at a time (a million items hold about 200 MB).
_opened = OpenedIndexes(keep=2)


def list_guard_names() -> list[str]:
    """The folders under the embedding_sets folders that hold a guard.json, by relative path."""
    _names, found = set_folder_listing(MANIFEST)
    return sorted(n for n in found if n)


def find_guard_folder(node_id: str, name: str) -> str:
    """The folder behind a guard index name, searched in every registered embedding_sets folder."""
    not_an_index = None
    with user_input(node_id, "guard_name"):
        for folder in folder_paths.get_folder_paths(SET_FOLDER):
            path = sets.resolve_set_path(folder, name, what="guard index")
            manifest = os.path.join(path, MANIFEST)
            if os.path.isdir(path) and os.path.isfile(manifest):
                if os.path.realpath(manifest) != manifest:
                    raise NudgeNodeError(f"{node_id}: input 'guard_name': the {MANIFEST} of '{name}' is a link; "
                                         "copy the real file into the folder")
                return path
            if os.path.exists(path) and not_an_index is None:
                not_an_index = path
    if not_an_index is not None and os.path.isfile(not_an_index):
        raise NudgeNodeError(f"{node_id}: input 'guard_name': '{name}' is a file, not a guard index folder; load a set "
                             "file with Load Embedding Set, or pick a guard index from the list")
    if not_an_index is not None:
        raise NudgeNodeError(f"{node_id}: input 'guard_name': '{name}' in {SET_FOLDER} is not a guard index (it holds "
                             f"no {MANIFEST}; a build that did not finish has none yet: run it again, it resumes); "
                             f"pick a guard index from the list or {BUILD_HINT}")
    raise NudgeNodeError(f"{node_id}: input 'guard_name': no guard index '{name}' in {SET_FOLDER}; refresh the list "
                         f"(press R) or {BUILD_HINT}")


class LoadGuardIndex(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_ID,
            display_name="Load Guard Index (Nudging)",
            category=CATEGORY,
            description="Opens a guard index: up to millions of guarded images in a folder of shards under "
                        "models/embedding_sets, checked exactly (Carlini's tiled L2) by Memorization Filter's "
                        "guard_index input without holding the images in memory. Build one with python -m "
                        "guard_build or build_sharded_guard.",
            inputs=[
                io.Combo.Input("guard_name", options=list_guard_names(),
                               tooltip="A guard index folder (one holding guard.json) in models/embedding_sets. "
                                       "Press R to refresh after building a new one."),
            ],
            outputs=[
                GuardIndexType.Output(display_name="guard_index",
                                      tooltip="The opened index, for Memorization Filter's guard_index input."),
                io.Int.Output(display_name="count", tooltip="How many items the index guards."),
            ],
        )

    @classmethod
    def validate_inputs(cls, guard_name):
        return queue_time_check(find_guard_folder, NODE_ID, guard_name)

    @classmethod
    def fingerprint_inputs(cls, guard_name):
        # Opened again when the index is rebuilt (a new guard.json), not only when the name changes.
        return stat_fingerprint(find_guard_folder, NODE_ID, guard_name, lambda folder: os.path.join(folder, MANIFEST))

    @classmethod
    def execute(cls, guard_name) -> io.NodeOutput:
        folder = find_guard_folder(NODE_ID, guard_name)
        with user_input(NODE_ID, "guard_name"):
            try:
                guard = _opened.get(folder, guard_name)   # a damaged manifest or shard: named, with the fix
            except OSError as exc:
                raise NudgeInputError(f"the guard index '{guard_name}' cannot be read ({exc.strerror or exc}); "
                                           "check the folder's permissions") from None
        return io.NodeOutput(guard, len(guard))


NODES = [LoadGuardIndex]
