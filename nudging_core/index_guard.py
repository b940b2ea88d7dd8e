"""A guard index (guard_index.GuardIndex) as the filter and the regenerate loop use it.

MemorizationFilter can check images against a guarded set, a guard index, or both. The nodes after
it (NudgeRegenerate, ConditionalRegenerate, the canvas) only know a Verdict whose `guarded` set
holds what a flag points to. A guard index of a million items cannot be that set, so a verdict
that the index flagged carries, as its `guarded` set, the set (when one was connected) plus just
the matched index items, built from their comparison copies (`GuardIndex.rows`). Those copies have
no latents: the latent-space nodes re-encode them at the generation's size through the graph's VAE
(set_sizes.latents_for), as they do for any set built at another size. The verdict also keeps the
index itself, so that the re-test of every replacement (Verdict.recheck, which merge_regenerated
uses) covers all of its items, not only those matched the first time.
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from .embedding_set import EmbeddingSet
from .errors import NudgeInputError
from .guard_index import MANIFEST, GuardIndex
from .memorization import Verdict
from .tiled_l2 import to_comparison

ITEMS = "items.txt"                  # line i names item i (guard_build writes it); optional
NO_LATENTS = "guard index comparison copies (no latents: re-encoded by the graph's VAE where needed)"
NOTHING_WITHIN = "(nothing within the threshold)"
_MAX_NAME = 200                      # characters of an item name carried into reports
_SCAN = 1 << 20                      # bytes of items.txt read at a time while indexing its lines


def _no_latents(count: int) -> torch.Tensor:
    """[count, 0, 0, 0]: a latent shape no graph has, so every latent-space use re-encodes the pixels."""
    return torch.zeros(count, 0, 0, 0)


class ItemNames:
    """Item i's name: line i of the folder's items.txt when it lists exactly one line per item, else
    '<label>#i'. Only the line offsets are kept (8 bytes an item), made on the first look-up: a
    million names as Python strings would cost more memory than the index's own tile means."""

    def __init__(self, folder: str, count: int, label: str):
        self.folder, self.count, self.label = folder, count, label
        self._offsets: np.ndarray | None = None
        self._path: str | None = None
        self._indexed = False

    def _index(self) -> None:
        self._indexed = True
        root = os.path.realpath(self.folder)
        path = os.path.realpath(os.path.join(root, ITEMS))
        if os.path.dirname(path) != root or not os.path.isfile(path):
            return                           # none, or a link out of the folder: numbered names
        ends, position, lines = [], 0, 0
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(_SCAN):
                    found = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
                    ends.append(found.astype(np.int64) + position)
                    position, lines = position + len(chunk), lines + len(found)
                    if lines > self.count:
                        return               # more lines than items: not this index's list
        except OSError:
            return
        line_ends = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
        if len(line_ends) != self.count:
            return                           # fewer lines (an unfinished list): numbered names
        self._offsets = np.concatenate([[0], line_ends + 1])
        self._path = path

    def __getitem__(self, i: int) -> str:
        if not self._indexed:
            self._index()
        if self._offsets is None:
            return f"{self.label}#{i}"
        begin, end = int(self._offsets[i]), int(self._offsets[i + 1]) - 1
        try:
            with open(self._path, "rb") as fh:
                fh.seek(begin)
                raw = fh.read(min(end - begin, 4 * _MAX_NAME))
        except OSError:
            return f"{self.label}#{i}"
        name = raw.decode("utf-8", errors="replace").rstrip("\r")[:_MAX_NAME]
        return name or f"{self.label}#{i}"


@dataclass
class IndexGuard:
    """An opened guard index with the name the user picked it by and its items' names."""

    index: GuardIndex = field(repr=False)
    label: str
    names: ItemNames = field(repr=False)

    @classmethod
    def open(cls, folder: str, label: str, backend: str = "auto") -> "IndexGuard":
        index = GuardIndex.open(folder, backend=backend)
        return cls(index, label, ItemNames(folder, len(index), label))

    def __len__(self) -> int:
        return len(self.index)

    @property
    def size(self) -> int:
        return self.index.size

    def check(self, images: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, the tiled L2 to its nearest item and that item's index when it is under the
        threshold, else inf and -1. A threshold of 0 flags nothing (no distance is below it)."""
        if not threshold > 0:
            return torch.full((images.shape[0],), math.inf), torch.full((images.shape[0],), -1, dtype=torch.long)
        return self.index.check(images, threshold)

    def items(self, indices: list[int]) -> EmbeddingSet:
        """Items `indices` as a set: their comparison copies as pixels, no latents."""
        return EmbeddingSet(latents=_no_latents(len(indices)), names=[self.names[i] for i in indices],
                            encoder=NO_LATENTS, pixels=self.index.rows(indices))

    def empty(self) -> EmbeddingSet:
        return self.items([])


def _copies_at(embedding_set: EmbeddingSet, hw: tuple[int, int]) -> torch.Tensor:
    """The set's pixel copies as uint8 at hw (area-averaged, rounded as the index rounds its own),
    made once per set and size."""
    key = ("uint8 copies", hw)
    if key not in embedding_set._derived:
        if tuple(embedding_set.pixels.shape[1:3]) == hw:
            embedding_set._derived[key] = embedding_set.pixels[..., :3]
        else:
            averaged = to_comparison(embedding_set.pixels, hw)
            embedding_set._derived[key] = (averaged * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return embedding_set._derived[key]


def combined(guarded: EmbeddingSet, matched: EmbeddingSet) -> EmbeddingSet:
    """The set followed by matched index items, as one set of uint8 copies (no latents) at the size
    the filter compares them at: at most the index's size, never above the set's. Set copies larger
    than that are averaged and rounded, so their distances move by at most 0.5/255 (what the
    index's own copies differ by); smaller sides are compared at the set's size, which never
    raises a distance (averaging), so the re-test stays at least as strict as the filter."""
    if guarded.pixels is None:
        raise NudgeInputError("the guarded set holds no pixel copies; rebuild it with store_pixels on")
    size = matched.image_size
    hw = (min(size[0], guarded.image_size[0]), min(size[1], guarded.image_size[1]))
    extra = matched.pixels if size == hw else _copies_at(matched, hw)
    return EmbeddingSet(latents=_no_latents(len(guarded) + len(matched)), names=guarded.names + matched.names,
                        encoder=NO_LATENTS, pixels=torch.cat([_copies_at(guarded, hw), extra]))


def add_index(verdict: Verdict | None, images: torch.Tensor, guard: IndexGuard, threshold: float) -> Verdict:
    """The verdict of `verdict`'s set (None: no set connected) and the guard index together.

    An image is flagged when either flags it; its distance and nearest item are the nearer of the
    two. Where nothing is flagged and no set was connected the distance is not known (the index
    looks only within the threshold): it is given as the threshold, a lower bound, and marked so.
    """
    distances, indices = guard.check(images, threshold)
    found = sorted({int(i) for i in indices if i >= 0})
    if found:
        matched = guard.items(found)
        pool = matched if verdict is None else combined(verdict.guarded, matched)
    else:
        pool = guard.empty() if verdict is None else verdict.guarded
    offset = 0 if verdict is None else len(verdict.guarded)
    flagged, dist, nearest, nearest_index, at_least = [], [], [], [], []
    for b in range(images.shape[0]):
        if verdict is not None:
            entry = [verdict.flagged[b], verdict.distances[b], verdict.nearest[b], verdict.nearest_index[b], False]
        else:
            entry = [False, float(threshold), NOTHING_WITHIN, -1, True]
        item = int(indices[b])
        if item >= 0 and (verdict is None or float(distances[b]) < verdict.distances[b]):   # the set wins ties
            entry = [True, float(distances[b]), pool.names[offset + found.index(item)], offset + found.index(item),
                     False]
        for column, value in zip((flagged, dist, nearest, nearest_index, at_least), entry):
            column.append(value)
    return Verdict(flagged=flagged, distances=dist, nearest=nearest, nearest_index=nearest_index,
                   threshold=threshold, guarded=pool,
                   clip_cosines=None if verdict is None else verdict.clip_cosines,
                   clip_threshold=None if verdict is None else verdict.clip_threshold,
                   index=guard, distance_at_least=at_least if any(at_least) else None)


class OpenedIndexes:
    """Guard indexes opened so far, under their folder and their manifest's modification time and
    size: opening reads 192 bytes an item (192 MB at a million), so it happens once per build of an
    index, not once per prompt. At most `keep` are held; the least recently used goes first, and a
    stale one (its guard.json rewritten) is dropped before the new build is opened."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._open: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, folder: str, label: str, opener=IndexGuard.open) -> IndexGuard:
        try:
            stat = os.stat(os.path.join(folder, MANIFEST))
        except OSError:            # no guard.json (gone since the name was checked, a link loop): the opener
            return opener(folder, label)      # refuses it with the message that names the fix; nothing kept
        key = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            held = self._open.get(folder)
            if held is not None and held[0] == key:
                self._open.move_to_end(folder)
                if held[1].label == label:
                    return held[1]
                # The same folder picked by another spelling: the opened index, under that name.
                return IndexGuard(held[1].index, label, ItemNames(folder, len(held[1]), label))
            self._open.pop(folder, None)
        opened = opener(folder, label)           # raises NudgeInputError for a damaged index: nothing kept
        with self._lock:
            self._open[folder] = (key, opened)
            while len(self._open) > self.keep:
                self._open.popitem(last=False)
        return opened

    def __len__(self) -> int:
        return len(self._open)
