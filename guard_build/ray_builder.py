"""A guard index of millions of image files, built on Ray Data (local processes or a cluster).

What it writes: the folder `nudging_core.guard_index.build_sharded_guard` writes for the same images,
byte for byte (its ShardWriter, comparison_copy and write_manifest do the work), plus `items.txt`:
line i names the source of item i (what a flagged index points back to). GuardIndex.open opens it.

Why Ray Data and not Spark: the work is Python through and through (Pillow decodes, torch averages),
and Ray runs it in Python workers with numpy batches in shared memory, where PySpark would send every
image through a JVM and a pickled Python worker; Ray is one pip install on every node (no JVM, no
Spark distribution to match), and `ray.init()` with no address is the same engine on one machine, so
the tests run the cluster code path.

How: the sources (a folder's image files sorted by path, or a manifest's lines in its order) go to
Ray Data in blocks of `batch`; `map_batches` reads each file with Pillow on a worker, makes it RGB
and area-averages it to the comparison copy (12 KB at 64 x 64, all that travels back). The driver
takes the blocks back in source order (preserve_order) and writes the shards one after another.

Deterministic: item i is the i-th readable source; the bytes do not depend on the batch, the number
of workers or their timing (each copy is made alone; `comparison_copy` gives the same bytes alone or
batched). Across machines, the nodes need the same Pillow (JPEG decoders differ between versions).

Resumable: after each finished shard its items' sources are appended to items.txt. On a rerun, a
shard listed there whose file is complete (guard_index.existing_shard) is kept and its images are not
read again; a listed shard that is missing or damaged is rebuilt from the sources items.txt gives for
it; the build goes on after the last listed source. The manifest is written last.

Bad files (unreadable, not an image, smaller than the comparison size): the build stops with an error
naming the file; finished shards are kept, so removing or fixing the file and running again resumes.
With skip_bad the file is left out and reported, and item numbers follow the readable files
(items.txt says which they are).
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from nudging_core.errors import NudgeInputError
from nudging_core.guard_index import (DEFAULT_SHARD_SIZE, MANIFEST, ShardWriter, check_build_args, comparison_copy,
                                      existing_shard, shard_path, write_manifest)
from nudging_core.tiled_l2 import COMPARISON_SIZE

ITEMS = "items.txt"
DEFAULT_BATCH = 256
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RAY_MISSING = "the distributed guard builder needs Ray Data: pip install 'ray[data]'"
_WIDE_GREY = ("I", "I;16", "I;16L", "I;16B", "I;16N")


class RayMissingError(NudgeInputError):
    """Ray is not installed: the message says what to install (never installed at run time)."""


def import_ray():
    """ray, imported only when a build runs: the pack and its small-set tools never need it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise RayMissingError(RAY_MISSING) from None
    return ray


def start_ray(address: str = "local", num_cpus: int | None = None, **init_kwargs):
    """Start Ray on this machine (address 'local') or join a running cluster ('auto', 'ray://...').

    nudging_core and guard_build are shipped to the workers (runtime_env py_modules), so a cluster's
    nodes need only Ray, torch, numpy and Pillow installed, not this pack."""
    ray = import_ray()
    here = os.path.dirname(os.path.abspath(__file__))
    core = os.path.join(os.path.dirname(here), "nudging_core")
    kwargs = {"runtime_env": {"py_modules": [core, here]}, **init_kwargs}
    if address == "local":
        return ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    if num_cpus is not None:
        raise NudgeInputError("num_cpus is for a local Ray only: a cluster brings its own")
    return ray.init(address=address, **kwargs)


# ---------------------------------------------------------------- sources

def _no_line_breaks(sources: list[str]) -> None:
    for source in sources:
        if "\n" in source or "\r" in source:
            raise NudgeInputError(f"the file name {source!r} holds a line break; {ITEMS} lists one source a line: "
                                  "rename it")


def folder_sources(folder: str) -> list[str]:
    """Image files under `folder`, recursively, as '/'-separated paths relative to it, sorted by code
    point (the same order on every machine and file system)."""
    if not os.path.isdir(folder):
        raise NudgeInputError(f"'{folder}' is not a folder")
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    if not found:
        raise NudgeInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under '{folder}'")
    found.sort()
    _no_line_breaks(found)
    return found


def manifest_sources(path: str) -> list[str]:
    """A manifest's paths, one a line (UTF-8; blank lines ignored), in its order. Relative paths are
    taken from the manifest's folder (pass it as `root`)."""
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            text = fh.read()
    except OSError as exc:
        raise NudgeInputError(f"the manifest '{path}' cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise NudgeInputError(f"the manifest '{path}' is not UTF-8 text") from None
    sources = [line.removesuffix("\r") for line in text.split("\n")]
    sources = [s for s in sources if s.strip()]
    if not sources:
        raise NudgeInputError(f"the manifest '{path}' lists no files")
    _no_line_breaks(sources)
    return sources


def read_rgb(path: str) -> np.ndarray:
    """uint8 [H, W, 3] of an image file as ComfyUI's LoadImage sees it (EXIF rotation applied, first
    frame, alpha and palette resolved by Pillow's RGB conversion), except 16- and 32-bit greyscale:
    scaled to 8 bits (v / 257, clipped to 16 bits) where the plain conversion clips it to white."""
    from PIL import Image, ImageOps
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in _WIDE_GREY:
            wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
            grey = ((wide + 128) // 257).astype(np.uint8)
            return np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
        return np.array(image.convert("RGB"), dtype=np.uint8)        # a writable array, as torch wants


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, NudgeInputError) else f"{type(exc).__name__}: {text}"


def copies_of_files(batch: dict, size: int) -> dict:
    """map_batches on the workers: each file's comparison copy, or why the file cannot be one (a bad
    file is that item's result, reported by the driver, not a failure of the batch)."""
    paths = batch["path"]
    copies = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    errors = []
    for i, path in enumerate(paths):
        try:
            copies[i] = comparison_copy(read_rgb(str(path)), size, label="the image").numpy()
            errors.append("")
        except Exception as exc:    # any decoder's failure means this file is bad: it is named, not raised
            errors.append(_reason(exc)[:500])
    return {"pos": batch["pos"], "copies": copies, "error": np.array(errors, dtype=object)}


# ---------------------------------------------------------------- resuming

def _read_items(folder: str) -> list[str]:
    """items.txt's complete lines (a line cut by an interruption is dropped)."""
    path = os.path.join(folder, ITEMS)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", newline="") as fh:
        lines = fh.read().split("\n")
    return lines[:-1]                   # the part after the last line break is empty or cut


def _write_items(folder: str, lines: list[str]) -> None:
    partial = os.path.join(folder, ITEMS + ".partial")
    with open(partial, "w", encoding="utf-8", newline="") as fh:
        fh.write("".join(line + "\n" for line in lines))
    os.replace(partial, os.path.join(folder, ITEMS))


def _append_items(folder: str, lines: list[str]) -> None:
    with open(os.path.join(folder, ITEMS), "a", encoding="utf-8", newline="") as fh:
        fh.write("".join(line + "\n" for line in lines))
        fh.flush()
        os.fsync(fh.fileno())


def _locate(recorded: list[str], sources: list[str]) -> np.ndarray:
    """Positions in `sources` of the recorded items, which are the readable sources in order: walked
    in step (the earliest match is the right one, as a file readable once is readable again)."""
    positions, at = np.empty(len(recorded), dtype=np.int64), 0
    for k, line in enumerate(recorded):
        while at < len(sources) and sources[at] != line:
            at += 1
        if at == len(sources):
            raise NudgeInputError(f"the folder's {ITEMS} lists '{line}', which is not among these sources in that "
                                  "order: it was built from other images; build into an empty folder")
        positions[k], at = at, at + 1
    return positions


# ---------------------------------------------------------------- building

@dataclass
class BuildReport:
    """What a build did: the manifest, shards kept from an earlier run and written in this one, files
    read in this run, and the files left out (skip_bad) with why."""

    manifest: dict
    kept_shards: int
    written_shards: int
    read: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)


class _ShardSink:
    """The driver's side: copies arrive in source order and fill the shards in turn, those to rebuild
    first (their sources are known), then new ones from `full` on. A new shard's sources go into
    items.txt only once its file is in place, so items.txt never lists an unfinished shard."""

    def __init__(self, folder: str, size: int, shard_size: int, full: int, redo: list[int]):
        self.folder, self.size, self.shard_size, self.full = folder, size, shard_size, full
        self.order = itertools.chain(redo, itertools.count(full))
        self.index = next(self.order)
        self.counts = {k: shard_size for k in range(full)}
        self.writer, self.lines, self.written = None, [], 0

    def room(self) -> int:
        return self.shard_size - (self.writer.count if self.writer is not None else 0)

    def add(self, copies: torch.Tensor, sources: list[str]) -> ShardWriter | None:
        """Add up to room() items; the shard they finished, if they did."""
        if self.writer is None:
            self.writer = ShardWriter(shard_path(self.folder, self.index), self.size, self.index)
        self.writer.add(copies)
        self.lines.extend(sources)
        return self.close() if self.writer.count == self.shard_size else None

    def close(self) -> ShardWriter | None:
        """Finish the shard being written (the last one may be partial); the next items go to the next."""
        writer, self.writer = self.writer, None
        if writer is None:
            return None
        writer.finish()
        if self.index >= self.full:
            _append_items(self.folder, self.lines)
        self.counts[self.index], self.lines, self.written = writer.count, [], self.written + 1
        self.index = next(self.order)
        return writer

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _blocks(positions: np.ndarray, paths: list[str], batch: int) -> list:
    """Ray Data's input: one Arrow table (one block, one task) per `batch` sources."""
    import pyarrow as pa
    return [pa.table({"pos": positions[i:i + batch], "path": [paths[p] for p in positions[i:i + batch]]})
            for i in range(0, len(positions), batch)]


def _plan(folder: str, sources: list[str], shard_size: int, size: int):
    """From items.txt and the shard files: the shards kept, those to rebuild, the positions of the
    sources to read (those of the shards to rebuild, then all after the last listed one), and how many
    shards items.txt lists in full."""
    recorded = _read_items(folder)
    full = len(recorded) // shard_size
    positions = _locate(recorded[:full * shard_size], sources)
    kept, redo = [], []
    for k in range(full):
        (kept if existing_shard(shard_path(folder, k), size, shard_size) is not None else redo).append(k)
    tail = np.arange(int(positions[-1]) + 1 if full else 0, len(sources), dtype=np.int64)
    todo = np.concatenate([positions[k * shard_size:(k + 1) * shard_size] for k in redo] + [tail])
    if len(recorded) != full * shard_size:
        _write_items(folder, recorded[:full * shard_size])    # an unfinished shard's lines: it is written again
    return kept, redo, todo, full


def build_guard_on_ray(folder: str, sources: list[str], root: str = "", shard_size: int = DEFAULT_SHARD_SIZE,
                       size: int = COMPARISON_SIZE, batch: int = DEFAULT_BATCH, skip_bad: bool = False,
                       progress=_stderr) -> BuildReport:
    """Write a guard index of the image files `sources` (paths, relative ones taken from `root`) into
    `folder`, reading them on Ray Data; see the module docstring. Uses the running Ray (start_ray), or
    lets Ray Data start a local one. `progress(line)` gets a line per finished shard."""
    ray = import_ray()
    check_build_args(shard_size, size)
    if type(batch) is not int or batch < 1:
        raise NudgeInputError(f"batch {batch!r} must be a positive integer")
    if not sources:
        raise NudgeInputError("no images to guard")
    _no_line_breaks(sources)
    os.makedirs(folder, exist_ok=True)
    kept, redo, todo, full = _plan(folder, sources, shard_size, size)
    if todo.size and os.path.exists(os.path.join(folder, MANIFEST)):
        os.remove(os.path.join(folder, MANIFEST))   # an interrupted rebuild must not open as finished
    progress(f"{len(sources):,} sources: {len(kept)} shards kept, {len(redo)} to rebuild; reading {todo.size:,} "
             "files on Ray")
    sink, skipped, read, consumed = _ShardSink(folder, size, shard_size, full, redo), [], 0, 0
    start = time.perf_counter()

    def report(finished: ShardWriter | None) -> None:
        if finished is not None:
            done = len(sources) - todo.size + consumed          # the sources not read in this run are done
            progress(f"{os.path.basename(finished.path)} written ({finished.count:,} items): {done:,} of "
                     f"{len(sources):,} sources done, {read / max(time.perf_counter() - start, 1e-9):,.0f} images/s")

    def bad(source: str, why: str) -> None:
        if sink.index < full:
            raise NudgeInputError(f"'{source}' was read when {os.path.basename(shard_path(folder, sink.index))} "
                                  f"was built and cannot be read now ({why}); build into an empty folder")
        if not skip_bad:
            raise NudgeInputError(f"'{source}' cannot be guarded: {why}. Remove or replace it and run again "
                                  "(finished shards are kept), or leave such files out with --skip-bad")
        skipped.append((source, why))
        progress(f"skipped '{source}': {why}")

    paths = [os.path.join(root, s) for s in sources]
    context = ray.data.DataContext.get_current()
    saved = (context.execution_options.preserve_order, context.enable_progress_bars)
    context.execution_options.preserve_order = True     # blocks come back in source order
    context.enable_progress_bars = False                # a line per shard instead
    try:
        if todo.size:
            dataset = ray.data.from_arrow(_blocks(todo, paths, batch)).map_batches(
                copies_of_files, batch_size=batch, batch_format="numpy", fn_kwargs={"size": size})
            for block in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                pos, copies, errors = block["pos"], block["copies"], block["error"]
                read += len(pos)
                i = 0
                while i < len(pos):
                    if errors[i]:
                        bad(sources[int(pos[i])], str(errors[i]))
                        i, consumed = i + 1, consumed + 1
                        continue
                    j = i + 1                                   # a run of readable items that fits the shard
                    while j < len(pos) and not errors[j] and j - i < sink.room():
                        j += 1
                    finished = sink.add(torch.from_numpy(copies[i:j].copy()),    # Ray's blocks are read-only
                                        [sources[int(p)] for p in pos[i:j]])
                    i, consumed = j, consumed + j - i
                    report(finished)
        report(sink.close())                                    # the last, partial shard
    except BaseException:
        sink.abort()
        raise
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
    shards = [{"file": os.path.basename(shard_path(folder, k)), "count": n} for k, n in sorted(sink.counts.items())]
    manifest = write_manifest(folder, shards, size, shard_size)
    return BuildReport(manifest, len(kept), sink.written, read, time.perf_counter() - start, skipped)
