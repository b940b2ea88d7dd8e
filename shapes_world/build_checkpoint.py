"""Assemble the shapes fixture's checkpoint from its compact weights (the memorizer's builder).

CLI (from the repository root):  python -m shapes_world.build_checkpoint --out DIR
"""
import argparse
import os
import sys

from memorizer import build_checkpoint as memorizer_builder

CHECKPOINT_NAME = "nudging-shapes-sd15.safetensors"
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
NOTE = ("tiny SD1.x-format test model of a 64x64 shapes world: draws any 'a {colour} {shape} on a {colour} "
        "background' and memorizes 8 duplicated textured items under their own captions")


def ensure_checkpoint(out_dir, force=False):
    """Build OUT_DIR/nudging-shapes-sd15.safetensors unless an up-to-date copy is there; returns its path."""
    return memorizer_builder.ensure_checkpoint(out_dir, CHECKPOINT_NAME, WEIGHTS_DIR, force=force, note=NOTE)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output folder (e.g. ComfyUI/models/checkpoints)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    print(ensure_checkpoint(args.out, force=args.force))


if __name__ == "__main__":
    sys.exit(main())
