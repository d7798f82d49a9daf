#!/usr/bin/env bash
# Create the virtual environment with the pinned stack.
# Usage: tools/setup_env.sh VENV WHEELHOUSE
# mmcv 2.1.0 has no Linux wheel on PyPI; its build (~17 min on 2 cores) is
# cached in WHEELHOUSE, keyed by Python and torch version, and paid once per
# machine.
set -euo pipefail
venv=${1:-.venv}
wheelhouse=${2:-$HOME/.cache/mmvit3/wheels}
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip 'setuptools<81' wheel ninja

# '===' matches the plain release only: a local '+cpu' build of torch offered
# by a find-links folder cannot be paired with PyPI's torchvision.
torch_pin=$(grep -E '^torch==' requirements.txt | cut -d= -f3)
vision_pin=$(grep -E '^torchvision==' requirements.txt | cut -d= -f3)
"${pip[@]}" install -q "torch===$torch_pin" "torchvision===$vision_pin"

mmcv_pin=$(grep -E '^mmcv==' requirements.txt | cut -d= -f3)
tag=$("$venv/bin/python" -c 'import sys, torch; print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")')
cache="$wheelhouse/$tag"
if ! ls "$cache"/mmcv-"$mmcv_pin"-*.whl >/dev/null 2>&1; then
    echo "Building mmcv $mmcv_pin with ops (once per machine, ~17 min on 2 cores) into $cache"
    mkdir -p "$cache"
    tmp=$(mktemp -d "$cache/.build.XXXXXX")
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "${pip[@]}" wheel \
        --no-build-isolation --no-deps -w "$tmp" "mmcv==$mmcv_pin"
    mv "$tmp"/mmcv-*.whl "$cache"/   # rename within one filesystem: atomic
    rm -rf "$tmp"
fi
"${pip[@]}" install -q --find-links "$cache" -r requirements.txt
"${pip[@]}" install -q --no-deps --no-build-isolation -e .
"$venv/bin/python" -c 'import mmvit3; print("mmvit3 registered in:", ", ".join(mmvit3.REGISTERED_TOOLBOXES))'
