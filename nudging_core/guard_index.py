"""Guarded sets of millions of items: an exact memorization test that reads only candidates.

check_pixels compares a generated image with every guarded copy (49 KB of floats an item at
64 x 64): fine for thousands of items, not for a million. A guard index keeps the same test and
the same answer, and pays the full cost only for the few items that can still be within the
threshold.

What is stored (a folder; `build_sharded_guard` writes it, and guard_build writes the same bytes from
image files on Ray; `GuardIndex.open` reads it):
  guard.json                  manifest: format, version, item count, comparison size, shard list
  shard_00000.safetensors ... per shard of up to `shard_size` items (65536 by default):
      pixels  U8  [n, S, S, 3]  the items' comparison copies (S = 64: 12 KB an item)
      cells   F32 [n, 192]      each copy area-averaged to 8 x 8 x 3, tile by tile (16 tiles x 12)
      tiles   F32 [n, 48]       each copy averaged per tile of the 4 x 4 grid (16 tiles x 3)
Only `tiles` is held in memory (192 bytes an item: 192 MB at a million). `cells` and `pixels` rows
are read from the files for the candidates of each check, and nothing else.

Why the answer is exact (no approximate nearest-neighbour search is involved):
  The filter's distance is Carlini's tiled L2 at the comparison size: the maximum over the 16 tiles
  of the RMS difference over the tile's pixels and channels. Averaging over equal blocks that lie
  inside one tile never raises that tile's RMS difference (Jensen: the mean of a difference,
  squared, is at most the mean of its square). So for every tile
      RMS over its 3 tile means  <=  RMS over its 12 cell means  <=  its RMS  <=  tiled L2,
  and over all 48 tile means  ||tiles_a - tiles_b|| <= sqrt(48) * tiled L2.
  A check therefore runs three exact filters and the exact test:
    1. a range search over all items: ||tiles_a - tiles_b|| < sqrt(48) * t  (the one full scan);
    2. on those: every tile's RMS over its 3 tile means < t  (from memory);
    3. on those: every tile's RMS over its 12 cell means < t  (their cells rows read from the shards);
    4. on those: the tiled L2 itself on the copies' pixel rows (what check_pixels computes).
  Every item the exact test puts under the threshold passes 1, 2 and 3, so no copy is ever lost;
  the filters only decide how many items reach step 4. The bounds are taken with margins that
  cover float32 rounding (see `_loosen` and `_range_margin`), so rounding cannot lose one either.

Why an exact flat scan rather than IVF, HNSW or product quantization: those return the items
that are probably nearest, and a guard must never miss a copy; their recall is measured, not
guaranteed, and a copy they miss is a memorized image handed to the user. The flat scan's cost is
one pass over the in-memory tile means per check: 48 floats an item (192 MB at a million items),
memory-bound: 35 ms median, 71 ms at most per image at a million items on one core here
(bench/scale_million.py, whole check of a 512 x 512 image included). Step 1 scans 48 numbers an
item rather than the 192 cell means because the scan's cost is the bytes it reads: the scan alone
of 192 numbers an item measured 68-83 ms in torch and 160 ms or more in faiss at a million items on
one core here, too close to or over the 100 ms budget; steps 2 and 3 apply the bounds tile by tile,
which is stricter than any bound on their sum, to the items the scan lets through (a few at the
paper's threshold of 0.1; at looser thresholds many more, see the bench).

The range search runs in a faiss IndexFlatL2 when faiss-cpu is importable (backend 'auto' or
'faiss'), else in torch (a matrix-vector product against precomputed norms; backend 'torch'). Both
are exact and flat and give the same verdicts (tests/unit/test_guard_index.py); at a million items
on one core here they measured the same within this shared machine's noise (median 34-49 ms).

Distances: `check` gives, per image, the tiled L2 and index of its nearest item when that is
under the threshold, equal to check_pixels against a set whose pixels are the guard's copies
(same comparison size and tiles); when no item is under the threshold it gives inf and -1 (the
search never looks further). Items larger than S x S are stored as uint8 copies already averaged
to S x S, so distances to them differ from check_pixels on the full-size items by at most 0.5/255
(the rounding of the copy). Generated images smaller than S x S are refused.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
import torch

from .embedding_set import _is_text, _refuse_constant, _unique_keys, parse_header_json, read_raw_header
from .errors import NudgeInputError
from .tiled_l2 import COMPARISON_SIZE, DEFAULT_GRID, image_tiles, tiled_l2_from_tiles, to_comparison

FORMAT_NAME = "embedding-nudging-guard"
FORMAT_VERSION = 1
MANIFEST = "guard.json"
DEFAULT_SHARD_SIZE = 65536
CELLS = 2 * DEFAULT_GRID                    # 8 x 8 cell means: 2 x 2 cells in each of the 4 x 4 tiles
CELL_DIMS = CELLS * CELLS * 3               # 192
TILE_DIMS = DEFAULT_GRID * DEFAULT_GRID * 3  # 48
_DATA_START = 1024                          # shard header padded to this: the pixels stream in behind it
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_SHARD_NAME = re.compile(r"shard_[0-9]{5,9}\.safetensors")
_BATCH = 512                                # items converted at once while building
_RANGE_ROWS = 1 << 18                       # items per range-search block (bounds its temporary memory)
_FILTER_ROWS = 1 << 16                      # candidates per bound evaluation (bounded memory at any threshold)
_EXACT_ROWS = 2048                          # candidates per exact test (their float copies: 100 MB)
_HINT = "rebuild the guard with build_sharded_guard"
_U32 = 2.0 ** -24                           # float32 unit roundoff
_F32_MAX = float(np.finfo(np.float32).max)  # the range search's radius and norms are float32: capped there


def _loosen(threshold: float, size: int, scale: float = 1.0) -> float:
    """The threshold the filters use: a little above t, so that float32 rounding can never put an
    item the exact test flags outside them. The exact test's mean of n = (size/4)^2 * 3 squared
    differences is off by at most about (n + 4) u relative (u = 2^-24; 5e-5 at 64 x 64), taken four
    times over here; the means kept in float32 are off by at most u times their size (`scale`, the
    largest query value; 1 for images in [0, 1]), taken 16 times over (the 1e-6)."""
    tile_values = (size // DEFAULT_GRID) ** 2 * 3
    return threshold * (1 + max(1e-4, 4 * (tile_values + 4) * _U32)) + 1e-6 * max(1.0, scale)


def _within(item_means: torch.Tensor, query_means: torch.Tensor, loose: float) -> torch.Tensor:
    """[k] bool: every tile's RMS over its m means (items [k, 16, m], query [16, m], float32) under
    `loose`, in float32 (6x faster than float64 here): sums of m squares, off by at most (m + 3) u
    relative, compared with m * loose^2 widened by twice that."""
    m = item_means.shape[2]
    return (item_means - query_means).square_().sum(dim=2).amax(dim=1) < m * loose * loose * (1 + 2 * (m + 3) * _U32)


def _range_margin(dims: int, item_norm_sq: float, query_norm_sq: np.ndarray) -> np.ndarray:
    """Widening of a squared radius that covers float32 rounding of ||x||^2 - 2 x.q + ||q||^2
    (|error| <= gamma_d (||x||^2 + 2|x.q| + ||q||^2) + 3u (...) <= (d + 3) u 2 (||x||^2 + ||q||^2);
    twice that here). faiss's direct differences are more accurate: the same margin covers them."""
    return 4 * (dims + 3) * _U32 * (item_norm_sq + query_norm_sq) + 1e-12


def descriptors(images: torch.Tensor, size: int = COMPARISON_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell means [N, 16, 12] and tile means [N, 16, 3] (float64) of images at the comparison size.

    images: uint8 [N, S, S, 3] copies (exact integer sums) or floats [N, S, S, 3] in [0, 1].
    Tile-major: row t = ty * 4 + tx holds that tile's 2 x 2 cells, each R, G, B."""
    n, block = images.shape[0], size // CELLS
    # uint8: float32 sums of integers under 2^24 are exact. Rows of a cell first, then its columns.
    values = images.float() if images.dtype == torch.uint8 else images.double()
    sums = values.reshape(n, CELLS, block, size * 3).sum(dim=2).view(n, CELLS, CELLS, block, 3).sum(dim=3).double()
    cells = sums / (block * block * (255.0 if images.dtype == torch.uint8 else 1.0))
    cells = cells.view(n, DEFAULT_GRID, 2, DEFAULT_GRID, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(n, 16, 12)
    return cells, cells.view(n, 16, 4, 3).mean(dim=2)


def tile_bound(cells_a: torch.Tensor, cells_b: torch.Tensor) -> torch.Tensor:
    """[N] max over tiles of the RMS over the tile's 12 cell means: never above the tiled L2."""
    return (cells_a.double() - cells_b.double()).square().mean(dim=2).sqrt().amax(dim=1)


# ---------------------------------------------------------------- shard files (safetensors)

def _shard_header(count: int, size: int, index: int) -> bytes:
    pixel_bytes = count * size * size * 3
    cells_end = pixel_bytes + count * CELL_DIMS * 4
    entries = {
        "pixels": {"dtype": "U8", "shape": [count, size, size, 3], "data_offsets": [0, pixel_bytes]},
        "cells": {"dtype": "F32", "shape": [count, CELL_DIMS],
                  "data_offsets": [pixel_bytes, cells_end]},
        "tiles": {"dtype": "F32", "shape": [count, TILE_DIMS],
                  "data_offsets": [cells_end, cells_end + count * TILE_DIMS * 4]},
        "__metadata__": {"format": FORMAT_NAME + "-shard", "format_version": str(FORMAT_VERSION),
                         "shard": str(index), "size": str(size)},
    }
    text = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()
    # safetensors allows a header padded with spaces; a fixed length lets the pixels stream in first.
    return struct.pack("<Q", _DATA_START - 8) + text.ljust(_DATA_START - 8, b" ")


@dataclass
class _Shard:
    path: str
    count: int
    pixels: int      # byte offsets of each tensor in the file
    cells: int
    tiles: int


def _read_shard(path: str, size: int, expect: int | None = None) -> _Shard:
    """Check a shard's header against the layout this module writes, before any data is read."""
    name = os.path.basename(path)
    try:
        file_size, length, raw = read_raw_header(path, 1 << 20)
    except OSError as exc:
        raise NudgeInputError(f"guard shard '{name}' cannot be read ({exc.strerror or exc}); {_HINT}") from None
    if raw is None:
        raise NudgeInputError(f"guard shard '{name}' is empty, truncated or not a safetensors file; {_HINT}")
    try:
        header = parse_header_json(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise NudgeInputError(f"guard shard '{name}' has an unreadable header; {_HINT}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME + "-shard" or not all(
            _is_text(k) and _is_text(v) for k, v in meta.items()):
        raise NudgeInputError(f"guard shard '{name}' is not a shard of a guard index; {_HINT}")
    if set(header) != {"pixels", "cells", "tiles", "__metadata__"}:
        raise NudgeInputError(f"guard shard '{name}' holds other tensors than pixels, cells and tiles; {_HINT}")
    pixels = header["pixels"]
    count = pixels.get("shape", [None])[0] if isinstance(pixels, dict) and isinstance(pixels.get("shape"), list) \
        and pixels["shape"] else None
    if type(count) is not int or count < 1:
        raise NudgeInputError(f"guard shard '{name}' holds pixels as {_describe(pixels)}, not U8 [items, {size}, "
                              f"{size}, 3]; {_HINT}")
    want = {"pixels": ("U8", [count, size, size, 3], 1), "cells": ("F32", [count, CELL_DIMS], 4),
            "tiles": ("F32", [count, TILE_DIMS], 4)}
    spans = []
    for key, (dtype, shape, width) in want.items():
        entry = header[key]
        if not isinstance(entry, dict) or entry.get("dtype") != dtype or entry.get("shape") != shape:
            raise NudgeInputError(f"guard shard '{name}' holds '{key}' as {_describe(entry)}, not {dtype} "
                                  f"{shape}; {_HINT}")
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and offsets[1] - offsets[0] == math.prod(shape) * width):
            raise NudgeInputError(f"guard shard '{name}' has malformed offsets for '{key}'; {_HINT}")
        spans.append((offsets[0], offsets[1], key))
    covered, data = 0, file_size - 8 - length
    for begin, end, key in sorted(spans):
        if begin != covered:
            raise NudgeInputError(f"guard shard '{name}' is corrupt (tensor '{key}' overlaps another or leaves a "
                                  f"gap); {_HINT}")
        covered = end
    if covered != data:
        raise NudgeInputError(f"guard shard '{name}' is truncated or has trailing bytes ({data} data bytes, "
                              f"{covered} described); {_HINT}")
    if expect is not None and count != expect:
        raise NudgeInputError(f"guard shard '{name}' holds {count} items but the manifest says {expect}; {_HINT}")
    start = {key: 8 + length + begin for begin, _, key in spans}
    return _Shard(path, count, start["pixels"], start["cells"], start["tiles"])


def _describe(entry) -> str:
    if not isinstance(entry, dict):
        return "no tensor"
    return f"{str(entry.get('dtype'))[:8]} {str(entry.get('shape'))[:60]}"


class ShardWriter:
    """One shard written as its items arrive: pixel rows stream to disk behind a fixed-size header,
    the means (4 % of the bytes) are kept and appended at the end; then the file is renamed into place.
    Public so that builders elsewhere (guard_build) write the very same files; `add` takes comparison
    copies as `comparison_copy` makes them."""

    def __init__(self, path: str, size: int, index: int):
        self.path, self.size, self.index, self.count = path, size, index, 0
        self.partial = path + ".partial"
        self.fh = open(self.partial, "wb")
        self.fh.write(b"\0" * _DATA_START)
        self.cells, self.tiles = [], []

    def add(self, copies: torch.Tensor) -> None:
        cells, tiles = descriptors(copies, self.size)
        self.fh.write(copies.contiguous().numpy().tobytes())
        self.cells.append(cells.reshape(-1, CELL_DIMS).float())
        self.tiles.append(tiles.reshape(-1, TILE_DIMS).float())
        self.count += copies.shape[0]

    def finish(self) -> None:
        self.fh.write(torch.cat(self.cells).numpy().tobytes())
        self.fh.write(torch.cat(self.tiles).numpy().tobytes())
        self.fh.seek(0)
        self.fh.write(_shard_header(self.count, self.size, self.index))
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.partial, self.path)

    def abort(self) -> None:
        """Close and delete the unfinished file (an interrupted build leaves nothing half-written)."""
        if not self.fh.closed:
            self.fh.close()
        if os.path.exists(self.partial):
            os.remove(self.partial)


def _as_copy_batch(batch: list, size: int) -> torch.Tensor:
    """uint8 [n, S, S, 3] comparison copies of same-shaped uint8 [H, W, C>=3] items."""
    stacked = torch.stack(batch)[..., :3]
    if stacked.shape[1] == size and stacked.shape[2] == size:
        return stacked.contiguous()
    averaged = to_comparison(stacked, (size, size))
    return (averaged * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def _item(image, label: str, size: int) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(image)) if not isinstance(image, torch.Tensor) else image.detach().cpu()
    if tensor.dtype != torch.uint8 or tensor.ndim != 3 or tensor.shape[2] < 3:
        raise NudgeInputError(f"{label} is {tensor.dtype} {tuple(tensor.shape)}; items must be uint8 "
                              "[height, width, 3] images")
    if tensor.shape[0] < size or tensor.shape[1] < size:
        raise NudgeInputError(f"{label} is {tensor.shape[1]}x{tensor.shape[0]}, smaller than the "
                              f"comparison size {size}x{size}; build with a smaller size or leave it out")
    return tensor


def comparison_copy(image, size: int = COMPARISON_SIZE, label: str = "guard item") -> torch.Tensor:
    """uint8 [S, S, 3]: the copy build_sharded_guard stores for one item (uint8 [H, W, >=3]), the same
    bytes whether it is made alone or in a batch. Public so that builders elsewhere (guard_build, on Ray
    workers) make it; `label` names the item in the error for a wrong dtype or a too-small image."""
    return _as_copy_batch([_item(image, label, size)], size)[0]


def shard_path(folder: str, index: int) -> str:
    """Where build_sharded_guard puts shard `index` (the manifest lists it by this file name)."""
    return os.path.join(folder, f"shard_{index:05d}.safetensors")


def check_build_args(shard_size: int, size: int) -> None:
    """Refuse a comparison size or shard size the guard format cannot hold, before any work is done."""
    if size % CELLS or not CELLS <= size <= 1024:
        raise NudgeInputError(f"comparison size {size} must be a multiple of {CELLS} between {CELLS} and 1024")
    if type(shard_size) is not int or shard_size < 1:
        raise NudgeInputError(f"shard size {shard_size!r} must be a positive integer")


def write_manifest(folder: str, shards: list[dict], size: int, shard_size: int) -> dict:
    """Write guard.json for `shards` ([{"file", "count"}], in order), atomically: written last, it is
    what makes a build openable. Returns the manifest."""
    done = sum(s["count"] for s in shards)
    if done == 0:
        raise NudgeInputError("no items to guard; pass at least one image")
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "count": done, "size": size,
                "grid": DEFAULT_GRID, "shard_size": shard_size, "shards": shards}
    partial = os.path.join(folder, MANIFEST + ".partial")
    with open(partial, "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
    os.replace(partial, os.path.join(folder, MANIFEST))
    return manifest


def build_sharded_guard(folder: str, items, shard_size: int = DEFAULT_SHARD_SIZE, size: int = COMPARISON_SIZE,
                        progress=None) -> dict:
    """Write a guard index of `items` (uint8 [H, W, 3] images, tensors or arrays) into `folder`.

    Streaming: holds one batch of items and one shard's means, never the set. Deterministic: the
    same items give the same bytes. Resumable: a shard already in the folder with `shard_size`
    items is kept (its items are read past, and its first one compared with the item it should
    hold); an interrupted shard is written again. The manifest is written last, so an interrupted
    build cannot be opened. `progress(done)` is called after each shard. Returns the manifest.
    """
    check_build_args(shard_size, size)
    os.makedirs(folder, exist_ok=True)
    iterator, shards, done, index = iter(items), [], 0, 0
    while True:
        path = shard_path(folder, index)
        kept = existing_shard(path, size, shard_size)
        if kept is not None:
            first = next(iterator, None)
            if first is None:
                break
            stored = torch.from_numpy(_read_rows(kept, "pixels", np.array([0]), (size, size, 3), np.uint8))
            if not torch.equal(_as_copy_batch([_item(first, f"guard item {done}", size)], size), stored):
                raise NudgeInputError(f"'{os.path.basename(path)}' in the guard folder holds other items than these; "
                                      "build into an empty folder")
            skipped = 1 + sum(1 for _ in zip(range(shard_size - 1), iterator))
            if skipped != shard_size:
                raise NudgeInputError(f"the items end inside '{os.path.basename(path)}', which holds {shard_size}; "
                                      "build into an empty folder")
            count = shard_size
        else:
            count = _write_shard(path, iterator, shard_size, size, index, done)
            if count == 0:
                break
        shards.append({"file": os.path.basename(path), "count": count})
        done, index = done + count, index + 1
        if progress is not None:
            progress(done)
        if count < shard_size:
            break
    return write_manifest(folder, shards, size, shard_size)


def existing_shard(path: str, size: int, shard_size: int) -> _Shard | None:
    """The finished shard at `path` when it holds `shard_size` items of this layout, else None (missing,
    interrupted, truncated or foreign: to be written again). What makes a build resumable."""
    if not os.path.isfile(path):
        return None
    try:
        shard = _read_shard(path, size)
    except NudgeInputError:
        return None                  # not a finished shard of this layout: written again
    return shard if shard.count == shard_size else None


def _write_shard(path: str, iterator, shard_size: int, size: int, index: int, first: int) -> int:
    writer, batch, shape = None, [], None
    try:
        for k in range(shard_size):
            image = next(iterator, None)
            if image is None:
                break
            item = _item(image, f"guard item {first + k}", size)
            if batch and (item.shape != shape or len(batch) == _BATCH):
                writer = writer or ShardWriter(path, size, index)
                writer.add(_as_copy_batch(batch, size))
                batch = []
            batch.append(item)
            shape = item.shape
        if batch:
            writer = writer or ShardWriter(path, size, index)
            writer.add(_as_copy_batch(batch, size))
        if writer is None:
            return 0
        writer.finish()
        return writer.count
    except BaseException:
        if writer is not None and not writer.fh.closed:
            writer.fh.close()
        raise


def _keep(ids: np.ndarray, chunk: int, test) -> np.ndarray:
    """The ids for which test(ids part) is true, a part at a time."""
    if not ids.size:
        return ids
    return np.concatenate([ids[k:k + chunk][test(ids[k:k + chunk]).numpy()] for k in range(0, ids.size, chunk)])


def _read_rows(shard: _Shard, key: str, rows: np.ndarray, shape: tuple, dtype) -> np.ndarray:
    """Rows `rows` (sorted) of one tensor of a shard, read with pread: nothing else is loaded or mapped."""
    width = int(np.prod(shape)) * np.dtype(dtype).itemsize
    base = getattr(shard, key)
    out = np.empty((len(rows),) + tuple(shape), dtype=dtype)
    flat = out.reshape(len(rows), -1).view(np.uint8)
    fd = os.open(shard.path, os.O_RDONLY)
    try:
        k = 0
        while k < len(rows):                       # consecutive rows in one read
            run = 1
            while k + run < len(rows) and rows[k + run] == rows[k] + run:
                run += 1
            data = os.pread(fd, width * run, base + int(rows[k]) * width)
            if len(data) != width * run:
                raise NudgeInputError(f"guard shard '{os.path.basename(shard.path)}' is truncated; {_HINT}")
            flat[k:k + run] = np.frombuffer(data, dtype=np.uint8).reshape(run, width)
            k += run
    finally:
        os.close(fd)
    return out


# ---------------------------------------------------------------- opening and checking

@dataclass
class GuardSearch:
    """One check's result: per image the nearest item under the threshold (inf and -1 when none),
    and how many items each step let through: the range search, the per-tile bound from the tile
    means, the per-tile bound from the cell means, and the exact test (the items under the threshold)."""

    distances: torch.Tensor
    indices: torch.Tensor
    range_candidates: list[int]
    tile_candidates: list[int]
    cell_candidates: list[int]
    matches: list[int]


def _manifest_error(detail: str) -> NudgeInputError:
    return NudgeInputError(f"the guard's {MANIFEST} {detail}; {_HINT}")


def _read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise NudgeInputError(f"'{folder}' holds no {MANIFEST}: it is not a guard index, or its build did not "
                              "finish (run build_sharded_guard again: it resumes)")
    try:
        too_large = os.path.getsize(path) > _MAX_MANIFEST_BYTES
    except OSError:
        too_large = False                  # reported by the read below
    if too_large:
        raise _manifest_error("is too large")
    try:
        with open(path, "rb") as fh:
            manifest = json.loads(fh.read().decode("utf-8"), object_pairs_hook=_unique_keys,
                                  parse_constant=_refuse_constant)
    except OSError as exc:
        raise NudgeInputError(f"the guard's {MANIFEST} cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _manifest_error("is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise _manifest_error(f"is not a '{FORMAT_NAME}' manifest")
    version, count, size = manifest.get("format_version"), manifest.get("count"), manifest.get("size")
    if type(version) is not int or version < 1:
        raise _manifest_error("has no format version")
    if version > FORMAT_VERSION:
        raise NudgeInputError(f"the guard's {MANIFEST} is format {version}, newer than this pack's {FORMAT_VERSION}; "
                              "update the pack")
    if type(count) is not int or count < 1:
        raise _manifest_error("has no item count")
    if type(size) is not int or size % CELLS or not CELLS <= size <= 1024 or manifest.get("grid") != DEFAULT_GRID:
        raise _manifest_error(f"has a comparison size or grid this pack does not use ({str(size)[:20]}, "
                              f"{str(manifest.get('grid'))[:20]})")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards or not all(
            isinstance(s, dict) and set(s) == {"file", "count"} and _is_text(s["file"]) and type(s["count"]) is int
            and s["count"] >= 1 for s in shards):
        raise _manifest_error("has a malformed shard list")
    if sum(s["count"] for s in shards) != count:
        raise _manifest_error(f"lists shards of {sum(s['count'] for s in shards)} items for a count of {count}")
    if len({s["file"] for s in shards}) != len(shards):
        raise _manifest_error("lists a shard twice")
    return manifest


def _shard_file(folder: str, name: str) -> str:
    """A shard's path; a name that is not a plain shard name inside the folder is refused."""
    if not _SHARD_NAME.fullmatch(name):
        raise _manifest_error(f"names a shard '{name[:80]}' that is not a plain shard file name")
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.dirname(path) != root:
        raise _manifest_error(f"names a shard '{name}' that lies outside the guard folder")
    if not os.path.isfile(path):
        raise NudgeInputError(f"the guard's shard '{name}' is missing; copy the whole guard folder or {_HINT}")
    return path


class GuardIndex:
    """An opened guard: the tile means in memory, the rest read per candidate. See the module docstring."""

    def __init__(self, folder: str, size: int, shards: list[_Shard], backend: str):
        self.folder, self.size, self.shards, self.backend = folder, size, shards, backend
        self._starts = np.cumsum([0] + [s.count for s in shards])
        self.count = int(self._starts[-1])
        self._norm_sq_max = 0.0
        if backend == "faiss":
            import faiss
            self._faiss = faiss.IndexFlatL2(TILE_DIMS)
        else:
            self._tiles = torch.empty(self.count, TILE_DIMS)
            self._norms = torch.empty(self.count)
        for shard, start in zip(shards, self._starts):
            tiles = self._read_tiles(shard)
            norms = np.einsum("ij,ij->i", tiles, tiles, dtype=np.float64)
            self._norm_sq_max = max(self._norm_sq_max, float(norms.max()))
            if backend == "faiss":
                self._faiss.add(tiles)
            else:
                self._tiles[start:start + shard.count] = torch.from_numpy(tiles)
                self._norms[start:start + shard.count] = torch.from_numpy(norms)

    @staticmethod
    def _read_tiles(shard: _Shard) -> np.ndarray:
        """A shard's tile means, read (not mapped: mapped pages would count as this process's memory)."""
        tiles = np.empty((shard.count, TILE_DIMS), dtype=np.float32)
        with open(shard.path, "rb") as fh:
            fh.seek(shard.tiles)
            if fh.readinto(memoryview(tiles).cast("B")) != tiles.nbytes:
                raise NudgeInputError(f"guard shard '{os.path.basename(shard.path)}' is truncated; {_HINT}")
        # Means of pixels in [0, 1] (the writer's float32 rounding keeps them there). Refused otherwise, NaN
        # included: a huge mean would overflow the float32 radius faiss takes and the norms the scan uses.
        if not ((tiles >= 0) & (tiles <= 1)).all():
            raise NudgeInputError(f"guard shard '{os.path.basename(shard.path)}' holds tile means outside [0, 1] (NaN, "
                                  f"infinite or out of range); {_HINT}")
        return tiles

    @classmethod
    def open(cls, folder: str, backend: str = "auto") -> "GuardIndex":
        """Open a guard folder. backend: 'torch', 'faiss', or 'auto' (faiss when importable).
        Every shard header is checked against the manifest before any data is read."""
        if backend not in ("auto", "torch", "faiss"):
            raise NudgeInputError(f"unknown guard backend '{backend}'; use auto, torch or faiss")
        if backend != "torch":
            try:
                import faiss  # noqa: F401
                backend = "faiss"
            except ImportError:
                if backend == "faiss":
                    raise NudgeInputError("the faiss backend needs faiss-cpu (pip install faiss-cpu)") from None
                backend = "torch"
        manifest = _read_manifest(folder)
        size = manifest["size"]
        shards = [_read_shard(_shard_file(folder, s["file"]), size, s["count"]) for s in manifest["shards"]]
        return cls(folder, size, shards, backend)

    def __len__(self) -> int:
        return self.count

    def rows(self, indices) -> torch.Tensor:
        """The comparison copies (uint8 [k, S, S, 3]) of items `indices`, in that order."""
        return self._gather("pixels", np.asarray(indices, dtype=np.int64).reshape(-1), (self.size, self.size, 3),
                            np.uint8)

    def _gather(self, key: str, indices: np.ndarray, shape: tuple, dtype) -> torch.Tensor:
        if indices.size and (indices.min() < 0 or indices.max() >= self.count):
            raise NudgeInputError(f"item index out of range for a guard of {self.count} items")
        order = np.argsort(indices, kind="stable")
        ordered = indices[order]
        which = np.searchsorted(self._starts, ordered, side="right") - 1
        out = np.empty((len(indices),) + tuple(shape), dtype=dtype)
        for s in np.unique(which):
            pick = which == s
            out[order[pick]] = _read_rows(self.shards[s], key, ordered[pick] - self._starts[s], shape, dtype)
        return torch.from_numpy(out)

    def _tile_means(self, ids: np.ndarray) -> torch.Tensor:
        if self.backend == "faiss":
            return torch.from_numpy(self._faiss.reconstruct_batch(ids))
        return self._tiles[torch.from_numpy(ids)]

    def _range(self, queries: np.ndarray, radius_sq: np.ndarray) -> list[np.ndarray]:
        """Per query, the items whose tile means lie within its squared radius (a superset: see margins)."""
        # Both backends compare in float32: a radius past its largest value (a query of huge values, a huge
        # threshold) is capped there, which faiss needs (it refuses the larger float) and which only widens.
        radius_sq = np.minimum(radius_sq, _F32_MAX)
        if self.backend == "faiss":
            found = []
            for q, r in zip(queries, radius_sq):      # faiss takes one radius per call
                lims, _, ids = self._faiss.range_search(q[None], float(r))
                found.append(np.sort(ids[lims[0]:lims[1]]).astype(np.int64))
            return found
        q = torch.from_numpy(queries)
        q_norms = torch.from_numpy(np.minimum(np.einsum("ij,ij->i", queries, queries, dtype=np.float64),
                                              _F32_MAX).astype(np.float32))
        limit = torch.from_numpy(radius_sq.astype(np.float32))
        hits = [[] for _ in range(len(queries))]
        for i in range(0, self.count, _RANGE_ROWS):
            block, norms = self._tiles[i:i + _RANGE_ROWS], self._norms[i:i + _RANGE_ROWS]
            for k in range(len(queries)):              # matrix-vector products: memory-bound, one pass each
                dist = torch.mv(block, q[k]).mul_(-2).add_(norms).add_(q_norms[k])
                hits[k].append((torch.nonzero(dist < limit[k]).view(-1) + i).numpy())
        return [np.concatenate(h).astype(np.int64) for h in hits]

    def search(self, images: torch.Tensor, threshold: float) -> GuardSearch:
        """The exact tiled-L2 test of each image against every item, through the filters."""
        if isinstance(threshold, bool) or not (isinstance(threshold, (int, float)) and math.isfinite(threshold)
                                               and threshold > 0):
            raise NudgeInputError(f"threshold {threshold!r} must be a positive number")
        if images.ndim != 4 or images.shape[-1] < 3:
            raise NudgeInputError(f"images must be [batch, height, width, 3] (ComfyUI IMAGE), got "
                                  f"{tuple(images.shape)}")
        if images.shape[1] < self.size or images.shape[2] < self.size:
            raise NudgeInputError(f"images of {images.shape[2]}x{images.shape[1]} are smaller than the guard's "
                                  f"comparison size {self.size}x{self.size}; generate at least that size")
        if not torch.isfinite(images).all():
            raise NudgeInputError("the images contain NaN or infinite values; check the VAE decode before this node")
        hw = (self.size, self.size)
        comp = to_comparison(images.detach().cpu(), hw)                    # what check_pixels compares
        cells, tiles = descriptors(comp, self.size)
        loose = _loosen(float(threshold), self.size, float(comp.abs().max()))
        q_tiles = np.ascontiguousarray(tiles.reshape(-1, TILE_DIMS).float().numpy())
        q_norms = np.einsum("ij,ij->i", q_tiles, q_tiles, dtype=np.float64)
        found = self._range(q_tiles, TILE_DIMS * loose * loose + _range_margin(TILE_DIMS, self._norm_sq_max, q_norms))
        distances = torch.full((images.shape[0],), math.inf)
        indices = torch.full((images.shape[0],), -1, dtype=torch.long)
        after_tiles, after_cells, matches = [], [], []
        q_cells = cells.float()
        for b, ids in enumerate(found):
            # each tile's own bound from its 3 means (in memory), then from its 12 cells (read from the shards)
            ids = _keep(ids, _FILTER_ROWS, lambda part: _within(self._tile_means(part).view(-1, 16, 3),
                                                               tiles[b].float(), loose))
            after_tiles.append(int(ids.size))
            ids = _keep(ids, _FILTER_ROWS, lambda part: _within(
                self._gather("cells", part, (CELL_DIMS,), np.float32).view(-1, 16, 12), q_cells[b], loose))
            after_cells.append(int(ids.size))
            query_tiles, under = image_tiles(comp[b:b + 1], DEFAULT_GRID), []
            for k in range(0, ids.size, _EXACT_ROWS):
                part = ids[k:k + _EXACT_ROWS]
                copies = image_tiles(to_comparison(self.rows(part), hw), DEFAULT_GRID)
                exact = tiled_l2_from_tiles(query_tiles, copies)[0]
                hit = exact < threshold
                under += list(zip(exact[hit].tolist(), part[hit.numpy()].tolist()))
            matches.append(len(under))
            if under:
                distances[b], indices[b] = min(under)       # the nearest; the lowest index among equals
        return GuardSearch(distances, indices, [int(f.size) for f in found], after_tiles, after_cells, matches)

    def check(self, images: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances, indices): per image the tiled L2 to its nearest item and that item's index when
        it is under `threshold` (as check_pixels computes it), else inf and -1."""
        result = self.search(images, threshold)
        return result.distances, result.indices
