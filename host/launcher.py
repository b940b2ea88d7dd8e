"""Starts ComfyUI's main.py after making torchvision importable on a CPU-only torch.

PyPI's torchvision wheel is CUDA-linked; on the CPU torch its compiled ops fail to load and
`import torchvision` dies on the missing `torchvision::nms` schema. SD 1.x never calls those
ops, so declaring their schemas is enough for ComfyUI to import. Usage:
    python host/launcher.py COMFYUI_DIR [main.py arguments...]
"""
from __future__ import annotations

import glob
import os
import runpy
import sys

import torch

_keep_alive = []


def patch_torchvision() -> None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            return
        for lib in glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so")):
            try:
                torch.ops.load_library(lib)
                return
            except (OSError, RuntimeError):
                pass
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _keep_alive.append(library)
    except RuntimeError:
        pass  # already defined: torchvision works


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
