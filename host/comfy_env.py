"""Which ComfyUI host to use, and importing it in a plain Python process (CLI tools, the
launcher, training).

The hosts (installed by host/setup_host.sh into .cache/), chosen with NUDGE_HOST:
  0.30    ComfyUI 0.30.0, the newest reachable offline, venv .cache/venv-0.30, served with
          frontend 1.58.1 (--front-end-root); what `make test` runs on
  0.30-pinned  the same ComfyUI 0.30.0 and venv with the frontend it pins (1.47.12); the browser
          suites run on it too (`make test-browser-pinned`)
  0.3.75  ComfyUI 0.3.75, the declared minimum, venv .cache/venv, the frontend it pins (1.32.9);
          `make test-min`
Without NUDGE_HOST: the host whose venv runs this Python, else 0.3.75.

PyPI's torchvision wheel is CUDA-linked; on the CPU torch its compiled ops fail to load and
`import torchvision` dies on the missing `torchvision::nms` schema. SD 1.x never calls those
ops, so declaring their schemas is enough for ComfyUI to import.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys
from dataclasses import dataclass

_keep_alive = []
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("NUDGE_CACHE", os.path.join(REPO, ".cache"))


@dataclass(frozen=True)
class Host:
    name: str                   # "0.30" or "0.3.75"
    version: str                # ComfyUI's version
    comfy_dir: str              # the ComfyUI tree (main.py)
    venv: str                   # its virtual environment
    front_end_root: str | None  # served with --front-end-root; None: the frontend ComfyUI pins

    @property
    def python(self) -> str:
        return os.path.join(self.venv, "bin", "python")


HOSTS = {
    "0.30": Host("0.30", "0.30.0", os.path.join(CACHE, "ComfyUI-0.30.0"), os.path.join(CACHE, "venv-0.30"),
                 os.path.join(CACHE, "frontend-1.58.1", "comfyui_frontend_package", "static")),
    "0.30-pinned": Host("0.30-pinned", "0.30.0", os.path.join(CACHE, "ComfyUI-0.30.0"),
                        os.path.join(CACHE, "venv-0.30"), None),
    "0.3.75": Host("0.3.75", "0.3.75", os.path.join(CACHE, "ComfyUI"), os.path.join(CACHE, "venv"), None),
}
ALIASES = {"0.30.0": "0.30", "new": "0.30", "newest": "0.30", "min": "0.3.75", "minimum": "0.3.75"}
DEFAULT_HOST = "0.3.75"


def _running_venv_host() -> str | None:
    prefix = os.path.realpath(sys.prefix)
    for name, host in HOSTS.items():
        if os.path.realpath(host.venv) == prefix:
            return name
    return None


def selected_host() -> Host:
    """The host NUDGE_HOST names; unset, the one whose venv runs this Python, else 0.3.75."""
    name = os.environ.get("NUDGE_HOST", "").strip()
    if not name:
        return HOSTS[_running_venv_host() or DEFAULT_HOST]
    name = ALIASES.get(name, name)
    if name not in HOSTS:
        raise SystemExit(f"NUDGE_HOST={os.environ['NUDGE_HOST']!r}: known hosts are {', '.join(HOSTS)}")
    return HOSTS[name]


DEFAULT_COMFY_DIR = selected_host().comfy_dir


def patch_torchvision() -> None:
    import torch

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
    """Put ComfyUI on sys.path (default: the selected host's tree, see selected_host) and return
    `comfy`."""
    import torch

    comfy_dir = os.path.abspath(comfy_dir or os.environ.get("COMFYUI_DIR") or DEFAULT_COMFY_DIR)
    if not os.path.isfile(os.path.join(comfy_dir, "comfy", "sd.py")):
        raise SystemExit(f"no ComfyUI at {comfy_dir}: pass --comfyui PATH or run `bash host/setup_host.sh`")
    running = _running_venv_host()
    if running and os.path.realpath(comfy_dir) != os.path.realpath(HOSTS[running].comfy_dir):
        print(f"[comfy_env] warning: importing ComfyUI {comfy_dir} in {sys.prefix}, the venv of host "
              f"{running}: its packages may not fit that tree", file=sys.stderr)
    patch_torchvision()
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # what `main.py --cpu` sets; device detection reads it at import
    import comfy.sd  # noqa: F401

    import comfy
    return comfy
