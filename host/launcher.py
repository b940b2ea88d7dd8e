"""Starts ComfyUI's main.py after making torchvision importable on a CPU-only torch
(see comfy_env.py). Usage:
    python host/launcher.py COMFYUI_DIR [main.py arguments...]
"""
from __future__ import annotations

import os
import runpy
import sys

from comfy_env import patch_torchvision


def main() -> None:
    comfy_dir = os.path.abspath(sys.argv[1])
    patch_torchvision()
    here = os.path.dirname(os.path.abspath(__file__))
    # This folder must not shadow ComfyUI's own top-level packages.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != here]
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    sys.argv = [os.path.join(comfy_dir, "main.py")] + sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
