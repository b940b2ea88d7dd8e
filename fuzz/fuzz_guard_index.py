"""Coverage-guided fuzzing of opening a guard index and checking images against it (issue #14).

A guard index is a folder (guard.json plus safetensors shards, nudging_core/guard_index.py) that
people copy and share, and LoadGuardIndex picks one by a name from a workflow JSON: both are hostile
input. The rule checked here: every folder either opens (as the node opens it: OpenedIndexes and
IndexGuard.open) to an index that agrees with its guard.json, and the filter's check against it
(index_guard.add_index, the report, the verdict's JSON, its re-test) runs and gives a well-formed
verdict; or it is refused with NudgeInputError, whose message names guard.json, the shard or the
folder. Every name either resolves (nodes_guard_index.find_guard_folder) to a guard folder inside
the embedding_sets folders, or is refused with the node's message. Anything else (a KeyError, a
ValueError from a NUL byte, an OSError, a json error, a verdict whose distance is not its copy's, a
case taking over HANG_SECONDS of CPU) is a failure: its input and traceback are saved under
OUT/failures/ and the run goes on.

The well-formed verdict is checked against a brute-force tiled L2 of the images against every stored
copy: a flagged image's distance must be its copy's, and a copy under the threshold may be missed
only when the shard's stored means disagree with its pixels (a hostile shard can hide items that way,
as it could by holding other pixels; such cases are counted, not failed).

Engines, mutators and failure records are fuzz_set_loader's (atheris when installed, else its seeded
random loop guided by the lines reached); the shard mutators are its safetensors-layout ones plus a
few that know the shard layout, and the folder mutators below edit guard.json (fields removed,
retyped, huge, negative, NaN; shard lists with duplicates, path-like names, counts that disagree),
drop, swap, copy, link and truncate files, and rewrite guard.json to match the shards as they are
(so that swapped, resized and transplanted shards open and the check runs on them).

Input layout: byte 0 picks the target (mod 3), the rest is its input:
  0  a guard folder: a selector byte (images, threshold, backend, with or without a guarded set
     checked too), then entries of
     kind (file, link, folder, sparse file), name length, name, u32 data length, data
  1  a guard name in UTF-8, given to LoadGuardIndex's resolver, validate_inputs and execute
  2  a guard name in UTF-16-LE (lone surrogates kept), likewise
The name targets need ComfyUI (the host's, see host/comfy_env.py); without it they are counted, not run.

    python -m fuzz.fuzz_guard_index --runs 20000 [--seconds S] [--out out/fuzz-guard] [--engine random] [--seed N]
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import random
import shutil
import struct
import sys
import tempfile

import numpy as np
import torch

from fuzz.fuzz_set_loader import (INTERESTING, NAME_PARTS, REPO, TARGET_NAME_UTF8, TARGET_NAME_UTF16, LineCoverage,
                                  Recorder, command_line, decode_name, encode_name, import_pack_modules, on_header,
                                  op_dtype, op_flip_bits, op_header_text, op_length_field, op_name_parts, op_offsets,
                                  op_poison_data, op_relayout, op_shape, op_splice, op_truncate, pack, print_summary,
                                  replace_a_number, run_engine, spans, split, tensor_set_op)

GUARD_FILE = os.path.join(REPO, "nudging_core", "guard_index.py")
INDEX_GUARD_FILE = os.path.join(REPO, "nudging_core", "index_guard.py")
NODE_FILE = os.path.join(REPO, "nodes", "nodes_guard_index.py")
READER_FUNCTIONS = ("_read_shard", "_describe", "_keep", "_read_rows", "_manifest_error", "_read_manifest",
                    "_shard_file", "descriptors", "_loosen", "_within", "_range_margin", "GuardIndex.__init__",
                    "GuardIndex._read_tiles", "GuardIndex.open", "GuardIndex.__len__", "GuardIndex.rows",
                    "GuardIndex._gather", "GuardIndex._tile_means", "GuardIndex._range", "GuardIndex.search",
                    "GuardIndex.search.<locals>.<lambda>", "GuardIndex.check")
NAME_FUNCTIONS = ("find_guard_folder", "LoadGuardIndex.validate_inputs", "LoadGuardIndex.fingerprint_inputs",
                  "LoadGuardIndex.execute")
PACK = "nudging_pack"                 # the name the pack is imported under for its node module
TARGET_FOLDER = 0
MAX_LEN = 1 << 16
FILE, LINK, DIR, SPARSE = range(4)
MANIFEST, ITEMS = "guard.json", "items.txt"
# (comparison size, items, shard size, with items.txt): every build has two shards or more
SEED_BUILDS = ((16, 5, 2, True), (8, 3, 1, False), (64, 2, 1, True))
THRESHOLDS = (0.1, 0.02, 0.5, 10.0, 0.0, 1e-7)    # 10: every item is a candidate; 0: nothing is flagged
VALID_SHARDS: list[bytes] = []        # the seed builds' shards, for op_transplant (filled by seed_corpus)


def guard_items(n: int, seed: int = 5) -> torch.Tensor:
    """uint8 [n, 64, 64, 3] photo-like items (random colours at 8 x 8, enlarged): the seed builds'
    items, and the images the checks look for."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 8, 8, generator=g)
    big = torch.nn.functional.interpolate(small, size=(64, 64), mode="bilinear", align_corners=False)
    return (big * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# ---- a folder as bytes ------------------------------------------------------------------------

def encode_folder(selector: int, entries: list[tuple[int, str, bytes]]) -> bytes:
    out = bytearray([TARGET_FOLDER, selector % 256])
    for kind, name, data in entries:
        raw = encode_name(name, TARGET_NAME_UTF8)[:255]
        out += bytes([kind, len(raw)]) + raw + struct.pack("<I", len(data)) + data
    return bytes(out)


def decode_folder(payload: bytes) -> tuple[int, list[tuple[int, str, bytes]]]:
    """(selector, entries) of a folder input; an entry cut short keeps what is there, what follows
    a damaged length is dropped (libFuzzer's byte mutations break the framing now and then)."""
    entries, i = [], 1
    while i + 2 <= len(payload):
        kind, end = payload[i] % 4, i + 2 + payload[i + 1]
        if end + 4 > len(payload):
            break
        (size,) = struct.unpack("<I", payload[end:end + 4])
        entries.append((kind, decode_name(payload[i + 2:end], TARGET_NAME_UTF8), payload[end + 4:end + 4 + size]))
        i = end + 4 + size
    return (payload[0] if payload else 0), entries


def plain_name(name: str) -> bool:
    """A name the harness can create in the folder (the folder's own entries, not what guard.json says)."""
    try:
        raw = os.fsencode(name)
    except UnicodeEncodeError:
        return False
    return name not in ("", ".", "..") and b"/" not in raw and b"\0" not in raw and len(raw) <= 255


def write_folder(folder: str, entries: list[tuple[int, str, bytes]]) -> None:
    """Lay the entries out in a fresh `folder`: files, links (data: the target), folders, and sparse
    files (data: u32 size in KiB, at most 64 MiB, then the first bytes). The first of a name wins."""
    shutil.rmtree(folder, ignore_errors=True)
    os.mkdir(folder)
    for kind, name, data in entries:
        path = os.path.join(folder, name)
        if not plain_name(name) or os.path.lexists(path):
            continue
        try:
            if kind == LINK:
                os.symlink(data.decode("utf-8", "surrogateescape"), path)
            elif kind == DIR:
                os.mkdir(path)
            else:
                with open(path, "wb") as fh:
                    fh.write(data[4:] if kind == SPARSE else data)
                    if kind == SPARSE:
                        fh.truncate(max(len(data) - 4, struct.unpack("<I", data[:4].ljust(4, b"\0"))[0] % (1 << 16)
                                        * 1024))
        except (OSError, ValueError):
            pass                      # a name or link target this file system refuses: not the loader's


# ---- mutation operators: shard files ----------------------------------------------------------

op_shard_tensors = tensor_set_op(["pixels", "cells", "tiles"])


@on_header
def op_shard_metadata(header, data, rng):
    """Wrong format, version, index or size in a shard's metadata, or metadata of the wrong type."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or rng.random() < 0.1:
        header["__metadata__"] = rng.choice([{}, None, [], "x", {"format": 1}, {"format": "embedding-nudging-guard"}])
        return None
    meta[rng.choice(["format", "format_version", "shard", "size", "extra"])] = rng.choice(
        ["embedding-nudging-guard-shard", "embedding-nudging-guard", "embedding-nudging-set", "1", "2", "-1", "64",
         "\ud800", "9" * 5000, "", 1, None, [], {}])


@on_header
def op_poison_means(header, data, rng):
    """NaN, infinity, huge or negative values in the cell or tile means (the pixels take any byte)."""
    layout = {name: (begin, end) for name, begin, end in spans(header)}
    begin, end = layout.get(rng.choice(["cells", "tiles"]), (0, 0))
    if end - begin < 4 or end > len(data):
        return None
    i = begin + rng.randrange((end - begin) // 4) * 4
    value = struct.pack("<f", rng.choice([math.nan, math.inf, -math.inf, 3e38, -3e38, 1e-45, -1.0, 1e6]))
    return pack(json.dumps(header), data[:i] + value + data[i + 4:])


@on_header
def op_reshard(header, data, rng):
    """A well-formed shard of other items: some of this shard's rows dropped or repeated (random rows
    where it has none), its means recomputed from them. It passes the shard checks, so what is tested
    is guard.json's counts against it or, once op_resync_manifest has run, the check on its items."""
    from nudging_core.guard_index import _shard_header, descriptors

    shape = header.get("pixels", {}).get("shape") if isinstance(header.get("pixels"), dict) else None
    size = shape[1] if isinstance(shape, list) and len(shape) == 4 and shape[1] in (8, 16, 32, 64) else 16
    width = size * size * 3
    layout = {name: (begin, end) for name, begin, end in spans(header)}
    begin, end = layout.get("pixels", (0, 0))
    rows = np.frombuffer(data[begin:min(end, len(data))][:(min(end, len(data)) - begin) // width * width],
                         dtype=np.uint8).reshape(-1, size, size, 3)
    if not len(rows):
        rows = np.frombuffer(rng.randbytes(width), dtype=np.uint8).reshape(1, size, size, 3)
    copies = torch.from_numpy(rows[[rng.randrange(len(rows)) for _ in range(rng.choice([1, 1, 2, 3, 4]))]].copy())
    cells, tiles = descriptors(copies, size)
    return (_shard_header(len(copies), size, rng.randrange(4)) + copies.numpy().tobytes()
            + cells.reshape(len(copies), -1).float().numpy().tobytes()
            + tiles.reshape(len(copies), -1).float().numpy().tobytes())


SHARD_OPS = [op_truncate, op_flip_bits, op_splice, op_length_field, op_shape, op_dtype, op_offsets, op_relayout,
             op_poison_data, op_header_text, op_header_text, op_shard_tensors, op_shard_metadata, op_poison_means,
             op_reshard, op_reshard]


# ---- mutation operators: guard.json -------------------------------------------------------------

MANIFEST_KEYS = ["format", "format_version", "count", "size", "grid", "shard_size", "shards", "extra"]
ODD_VALUES = INTERESTING + [-5, 10**30, 2**63 - 1, 1e308, 16.0, "16", 4, 8, 24, 64, 1024, 2048, 7,
                            "embedding-nudging-guard", "embedding-nudging-set", "\ud800"]
SHARD_NAMES = ["../shard_00000.safetensors", "/etc/passwd", "shard_00000.safetensors\0", "sub/shard_00000.safetensors",
               "shard_" + "0" * 5000 + ".safetensors", "a" * 300, "shard_00000.safetensors/..",
               "./shard_00000.safetensors",
               "shard_\u0660\u0660\u0660\u0660\u0660.safetensors", "\ud800", "shard_00000.safetensors\n",
               "shard_99999.safetensors", "shard_000000000.safetensors", "SHARD_00000.safetensors", MANIFEST, ITEMS,
               "", ".", "..", "shard_00007.safetensors", "shard_00000.safetensors ", "shard_00000.safetensors\\..",
               "shard_00001.safetensors", "shard_00002.safetensors", "shard_00000.safetensors.partial"]


def on_manifest(change):
    """An operator that edits the parsed guard.json (a text edit where it does not parse)."""
    def op(entries, rng):
        i = _find(entries, MANIFEST)
        if i is None:
            return op_resync_manifest(entries, rng)
        try:
            manifest = json.loads(entries[i][2])
            if not isinstance(manifest, dict):
                return op_manifest_text(entries, rng)
            change(manifest, rng)
            return _replace(entries, i, json.dumps(manifest, indent=1).encode())
        except (ValueError, RecursionError):
            return op_manifest_text(entries, rng)
    op.__name__ = change.__name__
    return op


@on_manifest
def op_manifest_field(m, rng):
    """A field removed, retyped, made huge, negative or off by one."""
    key = rng.choice(MANIFEST_KEYS)
    if key in m and rng.random() < 0.3:
        del m[key]
    elif type(m.get(key)) is int and rng.random() < 0.5:
        m[key] = rng.choice([m[key] + 1, m[key] - 1, -m[key], m[key] * 2**32, 0])
    else:
        m[key] = rng.choice(ODD_VALUES)


@on_manifest
def op_manifest_shards(m, rng):
    """The shard list: entries duplicated, dropped, swapped, renamed (path-like, NUL, very long),
    recounted, retyped; then now and then the item count made to agree, so the checks after it run."""
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards or rng.random() < 0.05:
        m["shards"] = rng.choice([[], None, {}, "shard_00000.safetensors", [[]], [{"file": "shard_00000.safetensors"}],
                                  [{"file": "shard_00000.safetensors", "count": 1}] * 3000])
        return
    k, kind = rng.randrange(len(shards)), rng.randrange(8)
    entry = shards[k] if isinstance(shards[k], dict) else {}
    if kind == 0:
        shards.insert(rng.randrange(len(shards) + 1), dict(entry))
    elif kind == 1:
        del shards[k]
    elif kind == 2:
        j = rng.randrange(len(shards))
        shards[k], shards[j] = shards[j], shards[k]
    elif kind == 3:
        entry["file"] = rng.choice(SHARD_NAMES)
    elif kind == 4:
        entry["count"] = rng.choice(ODD_VALUES)
    elif kind == 5 and rng.random() < 0.5:
        entry.pop(rng.choice(["file", "count"]), None)
    elif kind == 5:
        entry["extra"] = 1
    elif kind == 6:
        shards[k] = rng.choice(INTERESTING)
    else:
        shards.append({"file": f"shard_{rng.randrange(8):05d}.safetensors", "count": rng.choice([1, 2, 3])})
    if rng.random() < 0.3:
        m["count"] = sum(s.get("count") for s in shards if isinstance(s, dict) and type(s.get("count")) is int)


MANIFEST_TEXT_EDITS = [
    lambda t, rng: replace_a_number(t, rng, ["NaN", "Infinity", "-Infinity", "-1", "-0", "1e400", "1.0", "9" * 5000,
                                             "0" * 30, "true", "2e0"]),
    lambda t, rng: t.replace('"count"', '"count": 1, "count"', 1),                      # duplicate key
    lambda t, rng: t.replace('"file"', '"file": "shard_00000.safetensors", "file"', 1),
    lambda t, rng: rng.choice(["\ufeff", " ", "\n"]) + t,
    lambda t, rng: t[:rng.randrange(len(t) + 1)],
    lambda t, rng: t.replace('"shards"', '"x": ' + "[" * 3000 + "]" * 3000 + ', "shards"', 1),  # deep nesting
    lambda t, rng: t + rng.choice(["x", "}", "\0", "{}", "\udcff"]),                    # trailing garbage, a bad byte
    lambda t, rng: rng.choice(["", "[]", "null", "1", '"x"', "{}", "\udcff\udcfe"]),
    lambda t, rng: t.replace('"shard_', '"\\ud800shard_', 1),                            # a lone surrogate
    lambda t, rng: t.replace('"file"', '"\\u0066ile"', 1),                  # an escape json.dumps never writes
]


def op_manifest_text(entries, rng):
    """Edit guard.json as text: what json.dumps never writes (NaN, duplicate keys, bad UTF-8, a BOM...)."""
    i = _find(entries, MANIFEST)
    if i is None:
        return op_resync_manifest(entries, rng)
    edited = rng.choice(MANIFEST_TEXT_EDITS)(entries[i][2].decode("utf-8", "surrogateescape"), rng)
    return _replace(entries, i, encode_name(edited, TARGET_NAME_UTF8))


def op_resync_manifest(entries, rng):
    """guard.json rewritten to list the shard files as they now are (their names, in order or not, and
    the item counts and size their headers give): swapped, dropped, resized and transplanted shards
    then open, and the check runs on them."""
    listed, size = [], None
    for kind, name, data in entries:
        parsed = split(data) if kind == FILE and name.startswith("shard_") else None
        pixels = parsed[0].get("pixels") if parsed else None
        shape = pixels.get("shape") if isinstance(pixels, dict) else None
        if isinstance(shape, list) and len(shape) == 4 and all(type(d) is int for d in shape) and shape[0] > 0:
            listed.append({"file": name, "count": shape[0]})
            size = size or shape[1]
    if not listed:
        return entries
    if rng.random() < 0.3:
        rng.shuffle(listed)
    manifest = {"format": "embedding-nudging-guard", "format_version": 1, "count": sum(s["count"] for s in listed),
                "size": size, "grid": 4, "shard_size": max(s["count"] for s in listed), "shards": listed}
    i = _find(entries, MANIFEST)
    data = json.dumps(manifest, indent=1).encode()
    return entries + [(FILE, MANIFEST, data)] if i is None else _replace(entries, i, data)


# ---- mutation operators: the folder -----------------------------------------------------------

LINK_TARGETS = ["../outside/shard_00000.safetensors", "../outside", "../outside/guard.json", "shard_00000.safetensors",
                MANIFEST, None, "/nonexistent/shard", ".", "..", "shard_00001.safetensors"]     # None: itself, a loop
ITEMS_EDITS = [
    lambda t, rng: t[:t.rfind(b"\n", 0, max(0, len(t) - 1)) + 1],                        # a line short
    lambda t, rng: t + b"extra.png\n",                                                   # a line too many
    lambda t, rng: t.replace(b"\n", b"\r\n"),
    lambda t, rng: t.rstrip(b"\n"),
    lambda t, rng: t.replace(b"item", rng.choice([b"\0", b"\xff\xfe", b"x" * 5000, b"\xed\xa0\x80", b""]), 1),
    lambda t, rng: b"\n" * t.count(b"\n"),                                               # empty names
    lambda t, rng: b"",
]


def _find(entries, name: str) -> int | None:
    return next((i for i, e in enumerate(entries) if e[1] == name), None)


def _replace(entries, i: int, data: bytes, kind: int | None = None, name: str | None = None) -> list:
    old = entries[i]
    return entries[:i] + [(old[0] if kind is None else kind, old[1] if name is None else name, data)] + entries[i + 1:]


def _files(entries) -> list[int]:
    """Indices of the shard files (any file but guard.json and items.txt)."""
    return [i for i, (kind, name, _) in enumerate(entries) if kind == FILE and name not in (MANIFEST, ITEMS)]


def op_shard_file(entries, rng):
    """A shard file mutated by a safetensors-layout operator or a shard-layout one."""
    shards = _files(entries)
    if not shards:
        return op_transplant(entries, rng)
    i = rng.choice(shards)
    return _replace(entries, i, rng.choice(SHARD_OPS)(entries[i][2], rng))


def op_drop_entry(entries, rng):
    """A shard, guard.json or items.txt missing."""
    if not entries:
        return entries
    i = rng.randrange(len(entries))
    return entries[:i] + entries[i + 1:]


def op_swap_shards(entries, rng):
    """Two files' contents swapped (the names stay)."""
    shards = _files(entries)
    if len(shards) < 2:
        return entries
    i, j = rng.sample(shards, 2)
    return _replace(_replace(entries, i, entries[j][2]), j, entries[i][2])


def op_copy_or_rename(entries, rng):
    """A file copied or moved to another name (a shard name, or one of the odd names)."""
    if not entries:
        return entries
    i = rng.randrange(len(entries))
    name = rng.choice([f"shard_{rng.randrange(6):05d}.safetensors", rng.choice(SHARD_NAMES)])
    if rng.random() < 0.5:
        return [e for e in entries if e[1] != name] + [(entries[i][0], name, entries[i][2])]
    return _replace(entries, i, entries[i][2], name=name)


def op_special_entry(entries, rng):
    """A shard, guard.json or items.txt made a link (out of the folder, to another shard, a loop),
    a folder, or a sparse file (large: past guard.json's limit; or short)."""
    names = [e[1] for e in entries] + [MANIFEST, ITEMS, "shard_00003.safetensors"]
    name = rng.choice(names)
    kind = rng.choice([LINK, LINK, DIR, SPARSE])
    if kind == LINK:
        data = encode_name(rng.choice(LINK_TARGETS) or name, TARGET_NAME_UTF8)
    elif kind == SPARSE:
        i = _find(entries, name)
        data = struct.pack("<I", rng.choice([17 * 1024, 2048, 1, 0])) + (entries[i][2][:64] if i is not None else b"")
    else:
        data = b""
    return [e for e in entries if e[1] != name] + [(kind, name, data)]


def op_transplant(entries, rng):
    """A shard of another seed build (another size or item count) in place of one, or added."""
    if not VALID_SHARDS:
        return entries
    shard = rng.choice(VALID_SHARDS)
    shards = _files(entries)
    if shards and rng.random() < 0.7:
        return _replace(entries, rng.choice(shards), shard)
    return entries + [(FILE, f"shard_{rng.randrange(3, 6):05d}.safetensors", shard)]


def op_items_list(entries, rng):
    """items.txt a line short or long, with CRLF, NUL, bad UTF-8, very long or empty names."""
    i = _find(entries, ITEMS)
    if i is None:
        shards = sum(1 for _ in _files(entries))
        return entries + [(FILE, ITEMS, b"".join(b"item_%d.png\n" % k for k in range(rng.randint(0, 2 * shards + 2))))]
    return _replace(entries, i, rng.choice(ITEMS_EDITS)(entries[i][2], rng))


FOLDER_OPS = [op_manifest_field, op_manifest_field, op_manifest_shards, op_manifest_shards, op_manifest_shards,
              op_manifest_text, op_manifest_text, op_shard_file, op_shard_file, op_shard_file, op_shard_file,
              op_shard_file, op_resync_manifest, op_resync_manifest, op_drop_entry, op_swap_shards, op_copy_or_rename,
              op_special_entry, op_transplant, op_items_list]

GUARD_NAME_PARTS = NAME_PARTS + ["g", "g2", "g3", "empty", "manifest_link", "damaged", "alias", "more_only",
                                 MANIFEST, "shard_00000.safetensors", "file.safetensors"]


def mutate(data: bytes, rng: random.Random, max_size: int = MAX_LEN) -> bytes:
    """Apply 1-3 operators to the input's folder or name, keeping its target byte."""
    target = data[0] % 3 if data else TARGET_FOLDER
    if rng.random() < 0.02:
        target = rng.randrange(3)
    if target != TARGET_FOLDER:
        payload = data[1:]
        for _ in range(rng.choice((1, 1, 2))):
            payload = (op_name_parts(payload, rng, target, GUARD_NAME_PARTS) if rng.random() < 0.6
                       else rng.choice([op_flip_bits, op_splice, op_truncate])(payload, rng))
        return (bytes([target]) + payload)[:max_size]
    selector, entries = decode_folder(data[1:])
    if rng.random() < 0.15:
        selector = rng.randrange(256)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        entries = rng.choice(FOLDER_OPS)(entries, rng)
    return encode_folder(selector, entries)[:max_size]


# ---- the seed corpus --------------------------------------------------------------------------

GUARD_NAMES = ["g", "sub/g2", "more_only", "link", "alias", "manifest_link", "empty", "damaged", "file.safetensors",
               "g/guard.json", "g/shard_00000.safetensors", "../g", "/etc", "g\0", ".", "sub/..", "loop", "\ud800",
               "g/", "./g", "sub//g2", "", " ", "g/.."]


def build_folders(guard_index, items: torch.Tensor) -> list[list[tuple[int, str, bytes]]]:
    """The seed builds' folders as entries, written by the project's own build_sharded_guard."""
    folders = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (size, n, shard_size, named) in enumerate(SEED_BUILDS):
            folder = os.path.join(tmp, str(k))
            guard_index.build_sharded_guard(folder, iter(items[:n]), shard_size=shard_size, size=size)
            if named:
                with open(os.path.join(folder, ITEMS), "w") as fh:
                    fh.write("".join(f"item_{i}.png\n" for i in range(n)))
            entries = []
            for name in sorted(os.listdir(folder)):
                with open(os.path.join(folder, name), "rb") as fh:
                    entries.append((FILE, name, fh.read()))
            folders.append(entries)
    return folders


def seed_corpus(guard_index, names: bool) -> list[bytes]:
    """The valid builds with a few selectors each, hostile variants made by every folder operator, and
    guard names, hostile and not (where the name targets run)."""
    folders = build_folders(guard_index, guard_items(max(n for _, n, _, _ in SEED_BUILDS)))
    VALID_SHARDS[:] = [data for entries in folders for _, name, data in entries if name.startswith("shard_")]
    valid = [encode_folder(selector, entries) for entries in folders for selector in (0, 19, 2, 3 + 36, 13 + 72, 4, 5)]
    rng = random.Random(0)
    hostile = [encode_folder(17, op(entries, rng)) for entries in folders for op in FOLDER_OPS]
    hostile += [encode_folder(0, [e if e[1] != MANIFEST else (SPARSE, MANIFEST, struct.pack("<I", 17 * 1024) + e[2])
                                  for e in folders[0]])]                                   # past guard.json's limit
    hostile += [encode_folder(13, _replace(entries, 1, op(entries[1][2], rng)))
                for entries in folders for op in SHARD_OPS]
    if not names:
        return valid + hostile
    return valid + hostile + [bytes([t]) + encode_name(n, t) for n in GUARD_NAMES
                              for t in (TARGET_NAME_UTF8, TARGET_NAME_UTF16)]


# ---- the outcome rule -------------------------------------------------------------------------

class GuardHarness(Recorder):
    """Runs one input against its target and keeps the tallies and the failures."""

    def __init__(self, modules: dict, out_dir: str, work_dir: str):
        super().__init__(out_dir, ("opened", "refused", "checks", "checks refused", "flagged",
                                   "missed behind hostile means", "names resolved", "names refused",
                                   "names not run (no ComfyUI)"))
        self.gi, self.ig, self.memorization, self.node = (modules[k] for k in ("guard_index", "index_guard",
                                                                               "memorization", "node"))
        self.error = self.gi.NudgeInputError
        self.folder = os.path.join(work_dir, "case")
        outside = os.path.join(work_dir, "outside")
        items = guard_items(5)
        self.gi.build_sharded_guard(outside, iter(items), shard_size=2, size=16)
        g = torch.Generator().manual_seed(1)
        wide = torch.nn.functional.interpolate(items[2:3].permute(0, 3, 1, 2).float() / 255, size=(96, 160),
                                               mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        self.queries = [items[0:1].float() / 255,
                        torch.stack([(items[1].float() / 255 + 0.02 * torch.randn(64, 64, 3, generator=g)).clamp(0, 1),
                                     torch.rand(64, 64, 3, generator=g)]),
                        wide.contiguous(), torch.rand(1, 64, 64, 3, generator=g),
                        items[3:4, :32, :32].float() / 255,                  # smaller than a guard at 64: refused
                        torch.full((1, 64, 64, 3), math.nan)]                # refused
        # A guarded set checked with the index (the filter given both): items 1 and 4, and another image.
        self.guarded = modules["embedding_set"].EmbeddingSet(
            latents=torch.zeros(3, 4, 8, 8), names=["set_a", "set_b", "set_c"],
            pixels=torch.cat([items[1:2], items[4:5], torch.randint(0, 256, (1, 64, 64, 3), generator=g,
                                                                    dtype=torch.uint8)]))
        self.roots = []
        if self.node is not None:
            self.roots = self._name_folders(work_dir, outside, items)

    def _name_folders(self, work_dir: str, outside: str, items: torch.Tensor) -> list[str]:
        """Two embedding_sets folders holding guard indexes, and what a name must not reach: a link
        out, a linked guard.json, a loop, a folder without guard.json, a damaged one, a set file."""
        import folder_paths

        sets, more = os.path.join(work_dir, "sets"), os.path.join(work_dir, "more")
        for folder, n in ((os.path.join(sets, "g"), 4), (os.path.join(sets, "sub", "g2"), 2),
                          (os.path.join(more, "more_only"), 3), (os.path.join(sets, "manifest_link"), 2)):
            self.gi.build_sharded_guard(folder, iter(items[:n]), shard_size=2, size=16)
        os.remove(os.path.join(sets, "manifest_link", MANIFEST))
        os.symlink(os.path.join(outside, MANIFEST), os.path.join(sets, "manifest_link", MANIFEST))
        os.makedirs(os.path.join(sets, "empty"))
        shutil.copytree(os.path.join(sets, "g"), os.path.join(sets, "damaged"))
        with open(os.path.join(sets, "damaged", MANIFEST), "w") as fh:
            fh.write("{nope")
        with open(os.path.join(sets, "file.safetensors"), "wb") as fh:
            fh.write(b"\0" * 16)
        for link, to in (("link", outside), ("loop", "loop"), ("alias", "g")):
            os.symlink(to, os.path.join(sets, link))
        for folder in (sets, more):
            folder_paths.add_model_folder_path("embedding_sets", folder)
        return [os.path.realpath(sets), os.path.realpath(more)]

    def outcome(self, data: bytes) -> str | None:
        target = data[0] % 3 if data else TARGET_FOLDER
        if target == TARGET_FOLDER:
            return self.folder_outcome(data[1:])
        if self.node is None:
            self.tally["names not run (no ComfyUI)"] += 1
            return None
        return self.name_outcome(decode_name(data[1:], target))

    def folder_outcome(self, payload: bytes) -> str | None:
        selector, entries = decode_folder(payload)
        write_folder(self.folder, entries)
        images, threshold = self.queries[selector % 6], THRESHOLDS[selector // 6 % len(THRESHOLDS)]
        backend, with_set = ("torch" if selector // 36 % 2 else "auto"), selector // 72 % 2 == 1
        try:               # as LoadGuardIndex opens it: through the cache, which stats guard.json first
            guard = self.ig.OpenedIndexes(keep=1).get(
                self.folder, "case", opener=lambda folder, label: self.ig.IndexGuard.open(folder, label, backend))
        except self.error as exc:
            self.tally["refused"] += 1
            message = str(exc)
            named = MANIFEST in message or "shard '" in message or self.folder in message
            return None if named else f"the message names neither {MANIFEST}, a shard nor the folder: {exc}"
        self.tally["opened"] += 1
        return self.inconsistency(guard, images, threshold, with_set)

    def inconsistency(self, guard, images: torch.Tensor, threshold: float, with_set: bool) -> str | None:
        """Why an opened index or its verdict breaks the contract, or None."""
        from nudging_core.tiled_l2 import tiled_l2_matrix, to_comparison

        with open(os.path.join(self.folder, MANIFEST), "rb") as fh:
            manifest = json.loads(fh.read())
        index, size = guard.index, guard.size
        if (len(guard), size, len(index.shards)) != (manifest["count"], manifest["size"], len(manifest["shards"])):
            return f"the opened index ({len(guard)} items, size {size}) disagrees with its {MANIFEST}"
        root = os.path.realpath(self.folder)
        if any(os.path.dirname(os.path.realpath(s.path)) != root for s in index.shards):
            return "a shard outside the guard folder was opened"
        rows = index.rows(range(len(guard)))
        if rows.dtype != torch.uint8 or tuple(rows.shape) != (len(guard), size, size, 3):
            return f"rows are {rows.dtype} {tuple(rows.shape)}"
        self.tally["checks"] += 1
        try:
            by_set = self.memorization.check_pixels(images, self.guarded, threshold) if with_set else None
            verdict = self.ig.add_index(by_set, images, guard, threshold)
        except self.error:
            self.tally["checks refused"] += 1
            return None
        self.memorization.format_report(verdict)
        json.dumps(verdict.as_json(), allow_nan=False)
        batch = images.shape[0]
        if not len(verdict.flagged) == len(verdict.distances) == len(verdict.nearest) == len(verdict.nearest_index) \
                == batch:
            return "the verdict's lists are not one entry an image"
        hw = (size, size)
        exact = tiled_l2_matrix(to_comparison(images, hw), to_comparison(rows, hw))
        hidden = False
        for b, hit in enumerate(verdict.flagged):
            nearest = float(exact[b].min())
            if not hit:
                if by_set is None and (verdict.distances[b] != threshold or not verdict.at_least(b)):
                    return "an image passed with a distance other than the threshold as a lower bound"
                hidden |= nearest < threshold * (1 - 1e-3) - 1e-6
                continue
            self.tally["flagged"] += 1
            k, distance = verdict.nearest_index[b], verdict.distances[b]
            if not (0 <= k < len(verdict.guarded)) or not isinstance(verdict.nearest[b], str):
                return "a flag points at no matched item"
            if not (math.isfinite(distance) and 0 <= distance < threshold):
                return f"a flagged distance {distance} is not under the threshold {threshold}"
            if by_set is not None and k < len(self.guarded):      # the set's own flag, as check_pixels gave it
                if distance != by_set.distances[b]:
                    return f"a flag by the set moved from {by_set.distances[b]} to {distance}"
                continue
            own = float(tiled_l2_matrix(to_comparison(images[b:b + 1], hw),
                                        to_comparison(verdict.guarded.pixels[k:k + 1], hw))[0, 0])
            if abs(own - distance) > 1e-6:
                return f"a flagged distance {distance} is not its copy's {own}"
            hidden |= nearest < distance - 1e-5
        if hidden:
            if self.means_agree(index, rows):
                return "a copy under the threshold was missed although the shards' means agree with their pixels"
            self.tally["missed behind hostile means"] += 1
        if not all(again or not hit for hit, again in zip(verdict.flagged, verdict.recheck(images)[0])):
            return "the re-test of the same images passes one the verdict flagged"
        if any(verdict.flagged):
            verdict.matched_set()
        return None

    def means_agree(self, index, rows: torch.Tensor) -> bool:
        """Whether the stored tile and cell means are those of the stored pixels (the check reads them
        through GuardIndex's own private readers, so that is what is compared)."""
        cells, tiles = self.gi.descriptors(rows, index.size)
        ids = np.arange(len(index))
        stored_cells = index._gather("cells", ids, (self.gi.CELL_DIMS,), np.float32).double()
        stored_tiles = index._tile_means(ids).double()
        return bool(torch.allclose(stored_cells, cells.reshape(len(ids), -1), atol=1e-5)
                    and torch.allclose(stored_tiles, tiles.reshape(len(ids), -1), atol=1e-5))

    def name_outcome(self, name: str) -> str | None:
        node, error = self.node, self.node.NudgeNodeError
        loader = node.LoadGuardIndex
        valid = loader.validate_inputs(name)
        if not isinstance(loader.fingerprint_inputs(name), str):
            return "fingerprint_inputs gave no string"
        try:
            path = node.find_guard_folder(node.NODE_ID, name)
        except error as exc:
            self.tally["names refused"] += 1
            if valid is True:
                return "validate_inputs accepts a name the node refuses"
            return None if str(exc).startswith(f"{node.NODE_ID}: input 'guard_name': ") else f"message: {exc}"
        self.tally["names resolved"] += 1
        if not any(os.path.commonpath([root, path]) == root and path != root for root in self.roots):
            return f"resolved outside the embedding_sets folders: {path!r}"
        manifest = os.path.join(path, MANIFEST)
        if not os.path.isdir(path) or os.path.islink(manifest) or not os.path.isfile(manifest):
            return f"resolved to no guard index: {path!r}"
        if valid is not True:
            return f"validate_inputs refuses a name the node resolves: {valid}"
        try:
            output = loader.execute(name)
        except error:
            return None                         # a damaged index behind a good name: refused, named
        guard, count = output.args
        return None if count == len(guard) > 0 else f"LoadGuardIndex gave a guard of {count} items"


def import_guard_node(atheris):
    """nodes/nodes_guard_index.py as ComfyUI loads it (the pack as a package, on the host's ComfyUI), or
    None where ComfyUI cannot be imported: the name targets are then counted, not run."""
    try:
        from host.comfy_env import import_comfy
        import_comfy()
    except (ImportError, SystemExit, RuntimeError) as exc:
        print(f"guard names not fuzzed: ComfyUI is not importable ({exc})", file=sys.stderr)
        return None
    spec = importlib.util.spec_from_file_location(PACK, os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    sys.modules[PACK] = importlib.util.module_from_spec(spec)
    if atheris is None:
        spec.loader.exec_module(sys.modules[PACK])
    else:
        with atheris.instrument_imports(include=[PACK]):
            spec.loader.exec_module(sys.modules[PACK])
    node = importlib.import_module(PACK + ".nodes.nodes_guard_index")
    node.NudgeNodeError = importlib.import_module(PACK + ".nodes.common").NudgeNodeError
    return node


def main(argv: list[str] | None = None) -> int:
    args, atheris = command_line(__doc__, argv, os.path.join(REPO, "out", "fuzz-guard"))
    names = ("guard_index", "index_guard", "memorization", "embedding_set")
    modules = dict(zip(names, import_pack_modules(atheris, [f"nudging_core.{n}" for n in names])))
    try:
        import faiss
        faiss.omp_set_num_threads(1)         # one core: the CPU-time limit counts every thread
    except ImportError:
        pass
    modules["node"] = import_guard_node(atheris)
    corpus = seed_corpus(modules["guard_index"], names=modules["node"] is not None)
    with tempfile.TemporaryDirectory() as work, LineCoverage(GUARD_FILE, INDEX_GUARD_FILE, NODE_FILE) as coverage:
        harness = GuardHarness(modules, args.out, work)
        elapsed = run_engine(atheris, harness, coverage, corpus, args, mutate, MAX_LEN)
    lines = ["coverage: {}/{} lines of guard_index.py's reading and checking functions, {}/{} of all in it".format(
        *coverage.reached(READER_FUNCTIONS), *coverage.reached()),
        "          {}/{} of index_guard.py, {}/{} of LoadGuardIndex's by-name path (find_guard_folder, "
        "validate_inputs, fingerprint_inputs, execute)".format(
            *coverage.reached(filename=INDEX_GUARD_FILE), *coverage.reached(NAME_FUNCTIONS, NODE_FILE))]
    return print_summary(harness, atheris, elapsed, lines)


if __name__ == "__main__":
    sys.exit(main())
