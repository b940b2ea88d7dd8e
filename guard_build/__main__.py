"""Build a guard index (nudging_core/guard_index.py) of a folder or a manifest of images on Ray Data.

    python -m guard_build --images DIR --out FOLDER
    python -m guard_build --manifest FILE.txt --out FOLDER [--shard-size 65536] [--size 64]
        [--address local|auto|ray://HOST:10001] [--num-cpus N] [--batch 256] [--skip-bad]

--images takes the image files under DIR (recursively) sorted by path; --manifest one path a line, in
its order (relative paths from the manifest's folder). --address local (the default) starts Ray on
this machine; auto joins the Ray cluster this machine belongs to (the images must be at the same
paths on every node). Running it again resumes: finished shards are kept. A file that cannot be read
stops the build with its name, unless --skip-bad leaves it out. items.txt in FOLDER lists item i's
source on line i + 1.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from nudging_core.errors import NudgeInputError
from nudging_core.guard_index import DEFAULT_SHARD_SIZE
from nudging_core.tiled_l2 import COMPARISON_SIZE

from .ray_builder import (DEFAULT_BATCH, RayMissingError, build_guard_on_ray, folder_sources, import_ray,
                          manifest_sources, start_ray)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guard_build", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (searched recursively)")
    source.add_argument("--manifest", help="text file: one image path a line")
    parser.add_argument("--out", required=True, help="the guard folder (created; an earlier build there resumes)")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="items per shard file")
    parser.add_argument("--size", type=int, default=COMPARISON_SIZE, help="comparison size (the filter's: 64)")
    parser.add_argument("--address", default="local",
                        help="'local' starts Ray here; 'auto' or ray://HOST:PORT joins a running cluster")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs a local Ray may use (default: all)")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="images per Ray task")
    parser.add_argument("--skip-bad", action="store_true",
                        help="leave out files that cannot be read (reported) instead of stopping")
    args = parser.parse_args(argv)
    try:
        ray = import_ray()
        if args.images is not None:
            sources, root = folder_sources(args.images), args.images
        else:
            sources, root = manifest_sources(args.manifest), os.path.dirname(os.path.abspath(args.manifest))
        started = not ray.is_initialized()
        if started:
            for name in ("ray", "ray.data"):                        # one line per shard is the progress
                logging.getLogger(name).setLevel(logging.WARNING)
            start_ray(args.address, args.num_cpus, log_to_driver=True, logging_level=logging.WARNING)
        try:
            report = build_guard_on_ray(args.out, sources, root, shard_size=args.shard_size, size=args.size,
                                        batch=args.batch, skip_bad=args.skip_bad)
        finally:
            if started:
                ray.shutdown()
    except RayMissingError as exc:
        print(f"guard_build: {exc}", file=sys.stderr)
        return 2
    except NudgeInputError as exc:
        print(f"guard_build: error: {exc}", file=sys.stderr)
        return 1
    m = report.manifest
    print(f"guard_build: {m['count']:,} items in {len(m['shards'])} shards in {args.out} ({report.kept_shards} kept, "
          f"{report.written_shards} written; {report.read:,} files read in {report.seconds:.1f} s, "
          f"{report.read / max(report.seconds, 1e-9):,.0f} images/s; {len(report.skipped)} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
