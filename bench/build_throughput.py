"""Build throughput of a guard index from image files: the Ray Data builder (guard_build, local mode)
against the single-process writer (build_sharded_guard) on the same files (issue #12).

Writes N seeded PNG files (photo-like noise at SIZE x SIZE) to a scratch folder under out/, then
builds the guard index of them both ways, checks that the two folders hold the same bytes, and
prints files per second. Decoding the files is most of the work, so this is what a real build of a
folder costs per core; bench/scale_million.py times the writer alone on items made in memory.

    python -m bench.build_throughput [--files 4000] [--size 512] [--num-cpus 2] [--json bench/build_throughput.json]
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_files(folder: str, n: int, size: int, seed: int = 3) -> list[str]:
    """n PNGs: smooth random colour fields plus grain, so they compress like photos, not like flat noise."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        coarse = rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.int16)
        grain = rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
        path = os.path.join(folder, f"{i:07d}.png")
        Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(path, compress_level=1)
        paths.append(path)
    return paths


def build_single_process(folder: str, paths: list[str]) -> float:
    from guard_build.ray_builder import read_rgb
    from nudging_core.guard_index import build_sharded_guard
    started = time.perf_counter()
    build_sharded_guard(folder, (read_rgb(p) for p in paths))
    return time.perf_counter() - started


def build_on_ray(folder: str, paths: list[str], num_cpus: int) -> float:
    from guard_build.ray_builder import build_guard_on_ray, import_ray, start_ray
    start_ray("local", num_cpus=num_cpus)
    try:
        build_guard_on_ray(folder, list(paths), progress=lambda line: None)   # warm the workers up
        shutil.rmtree(folder)
        started = time.perf_counter()
        build_guard_on_ray(folder, list(paths), progress=lambda line: None)
        return time.perf_counter() - started
    finally:
        import_ray().shutdown()


def same_bytes(a: str, b: str) -> bool:
    names = sorted(n for n in os.listdir(a) if n.endswith(".safetensors") or n == "guard.json")
    return names == sorted(n for n in os.listdir(b) if n.endswith(".safetensors") or n == "guard.json") and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--size", type=int, default=512, help="width and height of the image files")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs the local Ray may use")
    ap.add_argument("--scratch", default=os.path.join(REPO, "out", "build_throughput"))
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    shutil.rmtree(args.scratch, ignore_errors=True)
    images = os.path.join(args.scratch, "images")
    started = time.perf_counter()
    paths = write_files(images, args.files, args.size)
    print(f"{args.files} PNG files of {args.size} x {args.size} written in {time.perf_counter() - started:.0f} s")
    single = build_single_process(os.path.join(args.scratch, "single"), paths)
    print(f"build_sharded_guard, one process: {single:.1f} s, {args.files / single:.0f} files/s")
    ray_s = build_on_ray(os.path.join(args.scratch, "ray"), paths, args.num_cpus)
    print(f"guard_build on Ray Data (local, {args.num_cpus} CPUs): {ray_s:.1f} s, {args.files / ray_s:.0f} files/s")
    same = same_bytes(os.path.join(args.scratch, "single"), os.path.join(args.scratch, "ray"))
    print(f"same bytes both ways: {same}")
    result = {"machine": {"platform": platform.platform(), "cores": os.cpu_count(), "torch": torch.__version__},
              "files": args.files, "file_size": args.size, "num_cpus": args.num_cpus,
              "single_process_s": round(single, 1), "single_process_files_per_s": round(args.files / single),
              "ray_s": round(ray_s, 1), "ray_files_per_s": round(args.files / ray_s), "same_bytes": same}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    shutil.rmtree(args.scratch, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
