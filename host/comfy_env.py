"""Import an unmodified ComfyUI in a plain Python process (CLI tools, the launcher, training).

PyPI's torchvision wheel is CUDA-linked; on the CPU torch its compiled ops fail to load and
`import torchvision` dies on the missing `torchvision::nms` schema. SD 1.x never calls those
ops, so declaring their schemas is enough for ComfyUI to import.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

import torch

_keep_alive = []
DEFAULT_COMFY_DIR = os.path.join(os.environ.get("NUDGE_CACHE", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache")), "ComfyUI")


def patch_torchvision() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations or _keep_alive:
        return
    for lib in glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "_C*.so")):
        try:
            torch.ops.load_library(lib)
            return
        except (OSError, RuntimeError):
            pass
    try:
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _keep_alive.append(library)
    except RuntimeError:
        pass  # the schemas exist already: torchvision works


def import_comfy(comfy_dir: str | None = None):
    """Put ComfyUI on sys.path (default: the host in .cache/ComfyUI) and return `comfy`."""
    comfy_dir = os.path.abspath(comfy_dir or os.environ.get("COMFYUI_DIR") or DEFAULT_COMFY_DIR)
    if not os.path.isfile(os.path.join(comfy_dir, "comfy", "sd.py")):
        raise SystemExit(f"no ComfyUI at {comfy_dir}: pass --comfyui PATH or run `bash host/setup_host.sh`")
    patch_torchvision()
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # what `main.py --cpu` sets; device detection reads it at import
    import comfy.sd  # noqa: F401

    import comfy
    return comfy
