"""Import an unmodified ComfyUI checkout from a plain Python process.

The CPU torch wheel used by the test host may come with a torchvision whose compiled
ops fail to register ("operator torchvision::nms does not exist"). ComfyUI imports
torchvision indirectly, so we first try to load torchvision's extension library and,
if that fails, declare the two operator schemas torchvision's Python side checks for.
"""
import glob
import importlib
import logging
import os
import sys

_LIB_KEEPALIVE = []  # torch.library.Library objects must outlive the process' use of the ops


def _ensure_torchvision():
    import torch
    try:
        import torchvision  # noqa: F401
        return
    except Exception:
        pass
    # Forget the half-imported package before retrying.
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    loaded = False
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            for so in sorted(glob.glob(os.path.join(folder, "_C*.so")) + glob.glob(os.path.join(folder, "_C*.pyd"))):
                try:
                    torch.ops.load_library(so)
                    loaded = True
                    break
                except Exception as exc:  # ABI mismatch with this torch build
                    logging.debug("could not load %s: %s", so, exc)
            if loaded:
                break
    if not loaded or not torch._C._dispatch_has_kernel_for_dispatch_key("torchvision::nms", "Meta") and not hasattr(torch.ops.torchvision, "nms"):
        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _LIB_KEEPALIVE.append(lib)
        except Exception as exc:
            logging.debug("torchvision schema shim not installed: %s", exc)
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        logging.warning("torchvision still fails to import (%s); continuing without it", exc)


def import_comfy(comfy_dir=None):
    """Make `import comfy.*` work; returns the `comfy` package.

    comfy_dir defaults to $COMFYUI_DIR or <repo>/.cache/ComfyUI.
    """
    if comfy_dir is None:
        comfy_dir = os.environ.get("COMFYUI_DIR") or os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "ComfyUI")
    comfy_dir = os.path.abspath(comfy_dir)
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    _ensure_torchvision()
    import torch
    import comfy.options  # args parsing stays off (the default), so our own argv is left alone
    import comfy.cli_args
    if not torch.cuda.is_available() and "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True  # CPU-only torch: ComfyUI would otherwise ask CUDA for a device
    import comfy  # noqa: F401
    import comfy.sd  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.samplers  # noqa: F401
    return sys.modules["comfy"]
