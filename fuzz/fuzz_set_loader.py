"""Coverage-guided fuzzing of the embedding-set loader (issue #14, reliability under hostile input).

A set file comes from other people (shared, downloaded) and a set name from a workflow JSON: both
are hostile input. The rule checked here: every input either loads to a consistent set (or
resolves to a path inside the set folder) or raises NudgeInputError, whose message names the file.
Anything else (a raw SafetensorError, a KeyError from odd metadata, a ValueError from a NUL byte
in a name, an inconsistent set, a case that takes over HANG_SECONDS of CPU time) is a failure: its
input bytes and traceback are saved under OUT/failures/ and the run goes on.

The engine is atheris (libFuzzer, coverage-guided over the loader's bytecode) with a mutator that
knows the safetensors layout: byte-level mutations alone almost never get past the JSON header to
the checks behind it (1 input in 5 gets libFuzzer's own byte mutations instead). Without atheris
(or with --engine random) the same layout-aware mutators run in a seeded random loop, guided by the
lines of embedding_set.py each input reaches.

Input layout: byte 0 picks the target (mod 3), the rest is its input:
  0  the bytes of a set file, written to a temp folder and given to load_set
  1  a set name in UTF-8 (bad bytes surrogate-escaped), given to resolve_set_path
  2  a set name in UTF-16-LE (lone surrogates kept), given to resolve_set_path
The folder given to resolve_set_path holds a symlink that points outside it.

    python -m fuzz.fuzz_set_loader --runs 20000 [--seconds S] [--out out/fuzz] [--engine random] [--seed N]
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import random
import re
import signal
import struct
import sys
import tempfile
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADER_FILE = os.path.join(REPO, "nudging_core", "embedding_set.py")
LOADER_FUNCTIONS = ("_read_header", "_unique_keys", "_refuse_constant", "_natural", "_is_text", "_shape_text",
                    "_item_count", "_set_info", "load_set", "resolve_set_path")
TARGET_FILE, TARGET_NAME_UTF8, TARGET_NAME_UTF16 = 0, 1, 2
MAX_LEN = 8192
SAVED_PER_CAUSE = 5
HANG_SECONDS = 5.0                  # CPU seconds one input may take
INTERESTING = [0, 1, 2, 3, -1, 255, 2**31 - 1, 2**31, 2**32, 2**63, 2**64, 2**64 + 1,
               True, False, None, 1.5, float("nan"), float("inf"), "3", [], {}, [[1]]]


# ---- the safetensors layout, for the mutators ----------------------------------------------

def split(payload: bytes) -> tuple[dict, bytes] | None:
    """(header, data section) of a payload whose header is a readable JSON object, else None."""
    if len(payload) < 8:
        return None
    (length,) = struct.unpack("<Q", payload[:8])
    if length > len(payload) - 8:
        return None
    try:
        header = json.loads(payload[8:8 + length])
    except (ValueError, RecursionError):
        return None
    return (header, payload[8 + length:]) if isinstance(header, dict) else None


def pack(header_text: str, data: bytes) -> bytes:
    """A payload with this header text, padded with spaces to 8 bytes as safetensors does."""
    raw = header_text.encode("utf-8", "surrogatepass")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def tensor_names(header: dict) -> list[str]:
    return [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]


def spans(header: dict) -> list[tuple[str, int, int]]:
    """(name, begin, end) of the entries with two int offsets, in file order."""
    out = []
    for name in tensor_names(header):
        offsets = header[name].get("data_offsets")
        if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
            out.append((name, *offsets))
    return sorted(out, key=lambda s: s[1:])


# ---- mutation operators: file payloads ------------------------------------------------------

def op_truncate(p: bytes, rng: random.Random) -> bytes:
    return p[: rng.randrange(len(p) + 1)]


def op_flip_bits(p: bytes, rng: random.Random) -> bytes:
    b = bytearray(p)
    for _ in range(rng.randint(1, 4)):
        if b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def op_splice(p: bytes, rng: random.Random) -> bytes:
    """Delete, duplicate or insert a chunk of bytes."""
    i = rng.randrange(len(p) + 1)
    j = min(len(p), i + rng.randint(1, 64))
    kind = rng.randrange(3)
    if kind == 0:
        return p[:i] + p[j:]
    if kind == 1:
        return p[:j] + p[i:j] + p[j:]
    return p[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + p[i:]


def op_length_field(p: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", p[:8].ljust(8, b"\0"))
    new = rng.choice([0, 1, n - 1, n + 1, n - 8, n + 8, len(p), 2**63, 2**64 - 1, rng.randrange(2**16)])
    return struct.pack("<Q", new % 2**64) + p[8:]


def on_header(change):
    """An operator that edits the parsed header (a bit flip when there is no readable header)."""
    def op(p: bytes, rng: random.Random) -> bytes:
        parsed = split(p)
        if parsed is None:
            return op_flip_bits(p, rng)
        header, data = parsed
        try:
            out = change(header, data, rng)
            return out if isinstance(out, bytes) else pack(json.dumps(header), data)
        except RecursionError:          # a header nested too deep to edit as a dict
            return op_flip_bits(p, rng)
    op.__name__ = change.__name__
    return op


@on_header
def op_shape(header, data, rng):
    names = tensor_names(header)
    if not names:
        return None
    entry = header[rng.choice(names)]
    shape = entry.get("shape")
    if isinstance(shape, list) and shape and rng.random() < 0.7:
        i = rng.randrange(len(shape))
        shape[i] = rng.choice([rng.choice(INTERESTING), shape[i] + 1 if type(shape[i]) is int else 1, 0])
    else:
        entry["shape"] = rng.choice([[], [1], [0, 4, 1, 1], [1] * 40, [2**31 - 1] * 3 + [0], "1", None])


@on_header
def op_dtype(header, data, rng):
    names = tensor_names(header)
    if names:
        header[rng.choice(names)]["dtype"] = rng.choice(
            ["F32", "F16", "BF16", "U8", "F64", "I64", "BOOL", "F8_E4M3", "f32", "", None, 4])


@on_header
def op_offsets(header, data, rng):
    """Gaps, overlaps, swaps, shifts and odd values in data_offsets."""
    layout = spans(header)
    if not layout:
        return None
    name, begin, end = rng.choice(layout)
    other = rng.choice(layout)
    k = rng.choice([1, 2, 4, 8, -1, -4])
    header[name]["data_offsets"] = rng.choice([
        [begin + k, end + k], [begin, end + k], [begin + k, end], [end, begin], [other[1], other[2]],
        [0, len(data)], [begin, begin], [begin], [begin, end, end], [-1, end], [begin, 2**64],
        [float(begin), end], [str(begin), end], [True, end], None])


@on_header
def op_relayout(header, data, rng):
    """Change one tensor's shape or dtype and lay all tensors out again, so the file stays a valid
    safetensors file but is no longer a consistent set: reaches the checks behind the header."""
    layout = spans(header)
    if not layout:
        return None
    entry = header[rng.choice(layout)[0]]
    shape = entry.get("shape") if isinstance(entry.get("shape"), list) else [1]
    shape = [d for d in shape if type(d) is int and 0 <= d < 64] or [1]
    change = rng.randrange(5)
    if change == 0:
        shape = shape[:-1] if len(shape) > 1 and rng.random() < 0.5 else shape + [rng.choice([1, 3])]
    elif change == 1:
        shape[0] = rng.choice([0, 1, 2, 3, 4])
    elif change == 2:
        i = rng.randrange(len(shape))
        shape[i] = max(0, shape[i] + rng.choice([-1, 1]))
    elif change == 3:
        entry["dtype"] = rng.choice(["F32", "F16", "BF16", "U8", "F64", "I32"])
    else:
        shape = [rng.choice([0, 1, 2]) for _ in range(rng.randint(0, 5))]
    entry["shape"] = shape
    size = {"F64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "U8": 1}
    new_data, begin = b"", 0
    for name, old_begin, old_end in layout:
        info = header[name]
        count = 1
        for d in info["shape"] if isinstance(info.get("shape"), list) else []:
            count *= d if type(d) is int and 0 <= d < 64 else 1
        nbytes = count * size.get(info.get("dtype"), 4)
        chunk = data[old_begin:old_end][:nbytes]
        new_data += chunk + bytes(rng.randrange(256) for _ in range(nbytes - len(chunk)))
        info["data_offsets"] = [begin, begin + nbytes]
        begin += nbytes
    return pack(json.dumps(header), new_data)


@on_header
def op_poison_data(header, data, rng):
    """NaN or infinity in the tensor data."""
    if len(data) < 4:
        return None
    value = rng.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x00\x80\xff", b"\x00\x7e\x00\x7e"])
    i = rng.randrange(len(data) // 4) * 4
    return pack(json.dumps(header), data[:i] + value + data[i + 4:])


BAD_INFOS = ["", "not json", "NaN", "[]", "null", "7", '"text"', "[" * 5000, '{"items": 5}',
             '{"items": {"a": 1}}', '{"items": [1, 2]}', '{"items": ["a"]}', '{"items": null}',
             '{"encoder": {"a": 1}}', '{"encoder": null}', '{"clip_encoder": [1]}', '{"items": ["\\ud800"]}',
             '{"latent_shape": "x", "image_size": {}}', '{"items": ["a", "a", "a"], "items": 1}']


@on_header
def op_metadata(header, data, rng):
    """Wrong format, version or info in the string metadata, or metadata of the wrong type."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or rng.random() < 0.1:
        header["__metadata__"] = rng.choice([{}, None, [], "x", {"format": 1}, {"format": None}])
        return None
    key = rng.choice(["format", "format_version", "info", "info", "info", "extra"])
    if key == "info" and isinstance(meta.get("info"), str) and rng.random() < 0.6:
        try:
            info = json.loads(meta["info"])
        except (ValueError, RecursionError):
            info = {}
        if isinstance(info, dict):
            info[rng.choice(["items", "encoder", "clip_encoder", "image_size", "latent_shape"])] = \
                rng.choice(INTERESTING + [["x"] * rng.randint(0, 4), "a" * 300])
        meta["info"] = json.dumps(info)
    elif key == "info":
        meta["info"] = rng.choice(BAD_INFOS)
    else:
        meta[key] = rng.choice(["embedding-nudging-set", "other", "1", "2", "0", "-1", "x", " 1", "1e3",
                                "\u0661", "9" * 5000, 1, None])


def tensor_set_op(expected: list[str]):
    """An operator that drops, renames, duplicates or adds tensor entries, renaming to the names the
    format expects (`expected`) or to wrong ones; the guard-index fuzzer makes its own with its names."""
    renames = expected + ["weights", "", expected[0] + "\0"]

    @on_header
    def op_tensor_set(header, data, rng):
        names = tensor_names(header)
        if not names:
            return None
        name = rng.choice(names)
        kind = rng.randrange(4)
        if kind == 0:
            del header[name]
        elif kind == 1:
            header[rng.choice(renames)] = header.pop(name)
        elif kind == 2:
            header[rng.choice(expected)] = dict(header[name])
        else:
            header[name] = rng.choice(INTERESTING)
    return op_tensor_set


op_tensor_set = tensor_set_op(["latents", "clip_embeds", "pixels"])


def replace_a_number(text: str, rng: random.Random, replacements: list[str]) -> str:
    numbers = list(re.finditer(r"\d+", text))
    if not numbers:
        return text
    m = rng.choice(numbers)
    return text[:m.start()] + rng.choice(replacements) + text[m.end():]


TEXT_EDITS = [
    lambda t, rng: t.replace('"dtype"', '"dtype":"F32","dtype"', 1),                    # duplicate field
    lambda t, rng: re.sub(r'^\{("[^"]+":\{[^}]*\}),', r'{\1,\1,', t, count=1),            # duplicate tensor
    lambda t, rng: replace_a_number(t, rng, ["NaN", "Infinity", "-Infinity", "-0", "1e400", "1.0", "0" * 30]),
    lambda t, rng: t.replace('"img', '"\\ud800img', 1).replace('"F32"', '"F\\udc0032"', 1),
    lambda t, rng: rng.choice([" ", "\n", "\ufeff", "\t\t"]) + t,                          # leading padding / BOM
    lambda t, rng: t.rstrip() + rng.choice(["\0\0\0", " x", "}", "   ", ",", "\x7f"]),     # trailing garbage
    lambda t, rng: t.replace('"shape"', '"x":' + "[" * 200 + "]" * 200 + ',"shape"', 1),  # deep nesting
    lambda t, rng: t.replace('"data_offsets"', '"extra":1,"data_offsets"', 1),
    lambda t, rng: t.replace('"latents"', '"\\u006catents"', 1),
    lambda t, rng: rng.choice(["[]", '"x"', "1", "null", "[{}]"]),                       # JSON, but no object
]


def op_header_text(p: bytes, rng: random.Random) -> bytes:
    """Edit the header as text: what json.dumps never writes (duplicate keys, NaN, lone surrogates...)."""
    if len(p) < 8:
        return op_flip_bits(p, rng)
    (n,) = struct.unpack("<Q", p[:8])
    if n > len(p) - 8:
        return op_flip_bits(p, rng)
    text = p[8:8 + n].decode("utf-8", "surrogateescape")
    edited = rng.choice(TEXT_EDITS)(text, rng)
    raw = edited.encode("utf-8", "surrogateescape")
    if rng.random() < 0.2:
        return p[:8] + raw + p[8 + n:]          # the length field left as it was
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + p[8 + n:]


FILE_OPS = [op_truncate, op_flip_bits, op_splice, op_length_field, op_shape, op_dtype, op_offsets,
            op_relayout, op_relayout, op_poison_data, op_metadata, op_metadata, op_tensor_set, op_header_text,
            op_header_text]


# ---- mutation operators: set names ----------------------------------------------------------

NAME_PARTS = ["..", ".", "", "link", "link/..", "sub", "a.safetensors", "/", "\\", "\0", "~", "%2e%2e",
              "loop", "filelink.safetensors", "\udc80", "\ud800", "a" * 300, "\u202e", " "]


def decode_name(raw: bytes, target: int) -> str:
    if target == TARGET_NAME_UTF16:
        return raw[: len(raw) // 2 * 2].decode("utf-16-le", "surrogatepass")
    return raw.decode("utf-8", "surrogateescape")


def encode_name(name: str, target: int) -> bytes:
    if target == TARGET_NAME_UTF16:
        return name.encode("utf-16-le", "surrogatepass")
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:          # a lone surrogate that is no escaped byte
        return name.encode("utf-8", "surrogatepass")


def op_name_parts(raw: bytes, rng: random.Random, target: int, vocabulary: list[str] = NAME_PARTS) -> bytes:
    """Insert or replace path components: '..', separators, NUL, the outward symlink, surrogates
    (`vocabulary`: the parts to use; the guard-index fuzzer adds the names in its folders)."""
    parts = decode_name(raw, target).split("/")
    part = rng.choice(vocabulary)
    if rng.random() < 0.5 or not parts:
        parts.insert(rng.randrange(len(parts) + 1), part)
    else:
        parts[rng.randrange(len(parts))] = part
    return encode_name("/".join(parts), target)


def mutate(data: bytes, rng: random.Random, max_size: int = MAX_LEN) -> bytes:
    """Apply 1-3 operators to the input's payload, keeping its target byte."""
    target = data[0] % 3 if data else TARGET_FILE
    payload = data[1:]
    if rng.random() < 0.02:
        target = rng.randrange(3)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if target == TARGET_FILE:
            payload = rng.choice(FILE_OPS)(payload, rng)
        elif rng.random() < 0.6:
            payload = op_name_parts(payload, rng, target)
        else:
            payload = rng.choice([op_flip_bits, op_splice, op_truncate])(payload, rng)
    return (bytes([target]) + payload)[:max_size]


# ---- the seed corpus --------------------------------------------------------------------------

def seed_corpus(sets) -> list[bytes]:
    """Valid sets (as save_set writes them, and with F16/BF16 latents), hostile variants of each
    made by every file operator, and set names, hostile and not."""
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    valid = []
    for n, extras, side in ((1, False, 4), (2, True, 4), (3, True, 2)):
        s = sets.EmbeddingSet(
            latents=torch.randn(n, 4, side, side, generator=g), names=[f"img{i}" for i in range(n)],
            encoder="TAESD/4ch/abc", clip_embeds=torch.randn(n, 8, generator=g) if extras else None,
            clip_encoder="clip" if extras else None,
            pixels=torch.randint(0, 256, (n, 8, 8, 3), generator=g, dtype=torch.uint8) if extras else None)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "s.safetensors")
            sets.save_set(s, path)
            with open(path, "rb") as f:
                valid.append(f.read())
        if extras:
            header, _ = split(valid[-1])
            for dtype in (torch.float16, torch.bfloat16):
                valid.append(save({"latents": s.latents.to(dtype), "clip_embeds": s.clip_embeds.to(dtype),
                                   "pixels": s.pixels}, metadata=header["__metadata__"]))
    rng = random.Random(0)
    hostile = [op(v, rng) for v in valid for op in FILE_OPS]
    files = [bytes([TARGET_FILE]) + p for p in valid + hostile]
    names = ["a.safetensors", "sub/b.safetensors", "link/secret.safetensors", "filelink.safetensors",
             "../a.safetensors", "/etc/passwd", "a\0.safetensors", ".", "sub/..", "loop/x", "\ud800.safetensors"]
    return files + [bytes([t]) + encode_name(n, t) for n in names for t in (TARGET_NAME_UTF8, TARGET_NAME_UTF16)]


# ---- the outcome rule -------------------------------------------------------------------------

def inconsistency(sets, s) -> str | None:
    """Why a loaded set breaks the set contract, or None. Saving and loading it again must work too."""
    n = s.latents.shape[0] if s.latents.ndim else -1
    rules = [
        (s.latents.ndim == 4 and s.latents.dtype == torch.float32 and s.latents.numel() > 0, "latents"),
        (isinstance(s.names, list) and len(s.names) == n and all(isinstance(x, str) for x in s.names), "names"),
        (isinstance(s.encoder, str) and (s.clip_encoder is None or isinstance(s.clip_encoder, str)), "encoders"),
        (s.clip_embeds is None or (s.clip_embeds.ndim == 2 and s.clip_embeds.shape[0] == n
                                   and s.clip_embeds.dtype == torch.float32 and s.clip_embeds.numel() > 0), "clip_embeds"),
        (s.pixels is None or (s.pixels.ndim == 4 and s.pixels.shape[0] == n and s.pixels.shape[3] == 3
                              and s.pixels.dtype == torch.uint8 and s.pixels.numel() > 0), "pixels"),
    ]
    broken = [what for ok, what in rules if not ok]
    if broken:
        return "inconsistent set: " + ", ".join(broken)
    json.dumps(s.info())
    s.subset([0])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "again.safetensors")
        sets.save_set(s, path)
        try:
            again = sets.load_set(path)
        except sets.NudgeInputError as exc:
            return f"refused after a save/load round trip: {exc}"
    return None if again.names == s.names else "names changed on a save/load round trip"


class Hang(BaseException):
    """Raised into an input that has used HANG_SECONDS of CPU time. Not an Exception, so that no
    `except Exception` in the code under test can swallow it."""


def _on_hang(signum, frame):
    raise Hang(f"over {HANG_SECONDS:g} s of CPU time on one input")


class Recorder:
    """Runs each input through `outcome` (the target's rule, in a subclass) and keeps the tallies and
    the failures: a few inputs per cause, their bytes and traceback under OUT/failures. An input gets
    HANG_SECONDS of CPU time (CPU, not wall time: this machine is shared, a starved case is no hang)."""

    def __init__(self, out_dir: str, counts: tuple[str, ...]):
        self.out_dir = out_dir
        self.tally = dict.fromkeys(("cases",) + counts + ("failures",), 0)
        self.causes: dict[str, int] = {}

    def outcome(self, data: bytes) -> str | None:
        """None when the input met the rule, else what went wrong."""
        raise NotImplementedError

    def check(self, data: bytes) -> bool:
        """Run one input; record it as a failure (bytes and traceback) unless it met the rule."""
        self.tally["cases"] += 1
        previous = signal.signal(signal.SIGPROF, _on_hang)
        signal.setitimer(signal.ITIMER_PROF, HANG_SECONDS)
        try:
            problem, detail = self.outcome(data), ""
        except (Exception, Hang) as exc:  # noqa: BLE001 - anything but the refusal is what we look for
            frames = traceback.extract_tb(exc.__traceback__)
            frame = frames[-2] if isinstance(exc, Hang) and len(frames) > 1 else frames[-1]   # not _on_hang's
            problem = f"{type(exc).__name__} at {os.path.basename(frame.filename)}:{frame.lineno}: {exc}"
            detail = traceback.format_exc()
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, previous)
        if problem is None:
            return True
        problem = re.sub(r"\\[ux][0-9a-f]+|\d+|'[^']*'|`[^`]*`|\([^)]*\)", "_", problem)[:120]   # a line per cause
        self.tally["failures"] += 1
        seen = self.causes[problem] = self.causes.get(problem, 0) + 1
        if seen <= SAVED_PER_CAUSE:
            stem = os.path.join(self.out_dir, "failures", hashlib.sha1(data).hexdigest()[:16])
            os.makedirs(os.path.dirname(stem), exist_ok=True)
            with open(stem + ".bin", "wb") as f:
                f.write(data)
            with open(stem + ".txt", "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"{problem}\n\n{detail}")
        return False


class Harness(Recorder):
    """The set loader's targets: a set file, a set name."""

    def __init__(self, sets, out_dir: str, work_dir: str):
        from safetensors import SafetensorError

        super().__init__(out_dir, ("loaded", "refused", "refused by the safety net", "names resolved",
                                   "names refused"))
        self.sets, self.safetensor_error = sets, SafetensorError
        self.folder = os.path.join(work_dir, "sets")
        outside = os.path.join(work_dir, "outside")
        for d in (self.folder, os.path.join(self.folder, "sub"), outside):
            os.makedirs(d, exist_ok=True)
        for link, to in (("link", outside), ("filelink.safetensors", os.path.join(outside, "secret.safetensors")),
                         ("loop", "loop")):
            os.symlink(to, os.path.join(self.folder, link))
        self.set_path = os.path.join(self.folder, "case.safetensors")
        self.root = os.path.realpath(self.folder)

    def outcome(self, data: bytes) -> str | None:
        target = data[0] % 3 if data else TARGET_FILE
        try:
            if target == TARGET_FILE:
                with open(self.set_path, "wb") as f:
                    f.write(data[1:])
                problem = inconsistency(self.sets, self.sets.load_set(self.set_path))
                self.tally["loaded"] += problem is None
                return problem
            path = self.sets.resolve_set_path(self.folder, decode_name(data[1:], target))
            self.tally["names resolved"] += 1
            inside = os.path.commonpath([self.root, path]) == self.root and path != self.root
            return None if inside else f"resolved outside the folder: {path!r}"
        except self.sets.NudgeInputError as exc:
            if target != TARGET_FILE:
                self.tally["names refused"] += 1
                return None
            self.tally["refused"] += 1
            self.tally["refused by the safety net"] += isinstance(exc.__cause__, self.safetensor_error)
            return None if "case.safetensors" in str(exc) else f"message does not name the file: {exc}"


# ---- line coverage (the random engine's guide; printed by both engines) ----------------------

class LineCoverage:
    """Distinct lines in the function bodies of these files that inputs reached, via sys.settrace
    (module and class bodies run at import, def lines never report a line event: both left out).
    The first file is the one `reached` counts unless told another."""

    def __init__(self, *filenames: str):
        self.filenames, self.lines, self.by_function = filenames, set(), {}
        for filename in filenames:
            with open(filename, encoding="utf-8") as f:
                todo = [compile(f.read(), filename, "exec")]
            while todo:
                code = todo.pop()
                if code.co_flags & inspect.CO_OPTIMIZED:
                    body = {line for _, _, line in code.co_lines() if line and line != code.co_firstlineno}
                    self.by_function.setdefault((filename, code.co_qualname), set()).update(body)
                todo.extend(c for c in code.co_consts if inspect.iscode(c))

    def reached(self, functions=None, filename: str | None = None) -> tuple[int, int]:
        """(lines reached, lines) over these functions of the file, or over all of them. A function is
        named by its name or, where names repeat (methods), its qualified name ('GuardIndex.open')."""
        filename = filename or self.filenames[0]
        lines = set().union(*(v for (f, k), v in self.by_function.items() if f == filename and (
            functions is None or k in functions or k.rsplit(".", 1)[-1] in functions)))
        return len({line for f, line in self.lines if f == filename} & lines), len(lines)

    def _call(self, frame, event, arg):
        return self._line if frame.f_code.co_filename in self.filenames else None

    def _line(self, frame, event, arg):
        if event == "line":
            self.lines.add((frame.f_code.co_filename, frame.f_lineno))
        return self._line

    def __enter__(self):
        sys.settrace(self._call)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)


# ---- engines ----------------------------------------------------------------------------------

def run_random(harness: Recorder, coverage: LineCoverage, corpus: list[bytes], runs: int, deadline: float,
               seed: int, mutator=mutate) -> None:
    """Seeds first, then mutants of the inputs that reached new lines; seeded, so reproducible."""
    rng = random.Random(seed)
    queue = []
    for data in corpus:
        if harness.tally["cases"] >= runs:
            return
        before = len(coverage.lines)
        harness.check(data)
        if len(coverage.lines) > before or len(queue) < 8:
            queue.append(data)
    while harness.tally["cases"] < runs and time.monotonic() < deadline:
        child = mutator(rng.choice(queue), rng)
        before = len(coverage.lines)
        harness.check(child)
        if len(coverage.lines) > before:
            queue.append(child)


def run_atheris(atheris, harness: Recorder, corpus: list[bytes], runs: int, seconds: float | None, seed: int,
                mutator=mutate, max_len: int = MAX_LEN) -> None:
    """libFuzzer over the seeds in OUT/corpus (it adds the inputs that found new coverage there).
    A case stuck where the CPU-time alarm cannot reach it (inside C code) is libFuzzer's -timeout's:
    it ends the run and leaves the input in OUT/failures."""
    corpus_dir = os.path.join(harness.out_dir, "corpus")
    os.makedirs(corpus_dir, exist_ok=True)
    os.makedirs(os.path.join(harness.out_dir, "failures"), exist_ok=True)
    for data in corpus:
        with open(os.path.join(corpus_dir, hashlib.sha1(data).hexdigest()), "wb") as f:
            f.write(data)
    argv = [sys.argv[0], f"-atheris_runs={runs}", f"-max_len={max_len}", f"-seed={seed}",
            f"-timeout={round(HANG_SECONDS * 12)}", f"-artifact_prefix={os.path.join(harness.out_dir, 'failures')}/",
            corpus_dir]
    if seconds:
        argv.insert(1, f"-max_total_time={max(1, round(seconds))}")

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)      # 1 in 5: libFuzzer's own byte mutations, guided by comparisons
        return atheris.Mutate(data, max_size) if rng.random() < 0.2 else mutator(data, rng, max_size)

    atheris.Setup(argv, harness.check, custom_mutator=custom_mutator)
    try:
        atheris.Fuzz()
    except SystemExit:      # libFuzzer ends the run with exit(); the summary comes after it
        pass


# ---- the command line, shared with fuzz_guard_index ----------------------------------------------

def command_line(doc: str, argv: list[str] | None, default_out: str):
    """(options, atheris module or None): --runs, --seconds, --out, --engine, --seed. With atheris the
    engine is atheris; None means the seeded random engine."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20000, help="inputs to run, seeds included")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long even if runs are left")
    parser.add_argument("--out", default=default_out, help="failures/ and corpus/ go here")
    parser.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto",
                        help="auto: atheris when it is installed")
    parser.add_argument("--seed", type=int, default=1, help="the mutators' seed (libFuzzer's -seed with atheris)")
    args = parser.parse_args(argv)
    try:
        import atheris
    except ImportError:
        atheris = None
    if args.engine == "atheris" and atheris is None:
        parser.error("atheris is not installed (pip install atheris); --engine random runs without it")
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    return args, None if args.engine == "random" else atheris


def import_pack_modules(atheris, names: list[str]) -> list:
    """The pack's modules by name, instrumented for atheris's coverage when it runs (safetensors
    imported before: only the pack is instrumented)."""
    import importlib

    import safetensors.torch  # noqa: F401
    if atheris is None:
        return [importlib.import_module(n) for n in names]
    with atheris.instrument_imports(include=["nudging_core"]):
        return [importlib.import_module(n) for n in names]


def run_engine(atheris, harness: Recorder, coverage: LineCoverage, corpus: list[bytes], args, mutator=mutate,
               max_len: int = MAX_LEN) -> float:
    """Run the chosen engine over the corpus; returns the seconds it took."""
    started = time.monotonic()
    if atheris is not None:
        run_atheris(atheris, harness, corpus, args.runs, args.seconds, args.seed, mutator, max_len)
    else:
        run_random(harness, coverage, corpus, args.runs, started + (args.seconds or float("inf")), args.seed,
                   mutator)
    return time.monotonic() - started


def print_summary(harness: Recorder, atheris, elapsed: float, coverage_lines: list[str]) -> int:
    """Print cases, coverage and failures (a line per cause); the exit status: 1 when any failed."""
    engine = "random" if atheris is None else "atheris"
    print(f"engine: {engine}  time: {elapsed:.1f} s  " + "  ".join(f"{k}: {v}" for k, v in harness.tally.items()))
    for line in coverage_lines:
        print(line + ("  (libFuzzer's cov/ft figures are above)" if atheris is not None else ""))
    for cause, count in sorted(harness.causes.items(), key=lambda kv: -kv[1]):
        print(f"  {count:6d} x {cause}")
    if harness.causes:
        print(f"inputs and tracebacks: {os.path.join(harness.out_dir, 'failures')}")
    print(f"failures: {harness.tally['failures']}")
    return 1 if harness.tally["failures"] else 0


def main(argv: list[str] | None = None) -> int:
    args, atheris = command_line(__doc__, argv, os.path.join(REPO, "out", "fuzz"))
    (sets,) = import_pack_modules(atheris, ["nudging_core.embedding_set"])
    corpus = seed_corpus(sets)
    with tempfile.TemporaryDirectory() as work, LineCoverage(LOADER_FILE) as coverage:
        harness = Harness(sets, args.out, work)
        elapsed = run_engine(atheris, harness, coverage, corpus, args)
    return print_summary(harness, atheris, elapsed, ["coverage: {}/{} lines of the loader's functions, {}/{} of all "
                                                     "in {}".format(*coverage.reached(LOADER_FUNCTIONS),
                                                                    *coverage.reached(),
                                                                    os.path.relpath(LOADER_FILE, REPO))])


if __name__ == "__main__":
    sys.exit(main())
