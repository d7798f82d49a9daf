#!/usr/bin/env bash
# The prepared GPU check: one command on a lent H100/H200 machine, under 8
# minutes, every result under $OUT.
#
# Usage: bash tools/gpu_check.sh [OUT]    (default: $OUT, else ./gpu_check_out)
#
# Steps, in order of value, each with a time budget (seconds) and a
# `timeout`, all within GPU_CHECK_BUDGET_S (default 450) from the start; a
# step that fails or runs out of time is logged and the next one runs, and
# a step with under 20 s left is skipped:
#   setup            Python with CUDA torch and the pinned toolboxes (below)
#   cuda-tests  150  pytest -m "not slow" of the CUDA tests: the Triton MLP,
#                    CPE and TTT kernels, the TTT layer, AMP
#   kernel-counts 90 benchmarks/kernel_counts.py, 800x1216, float32
#   ttt-kernels  75  benchmarks/ttt_kernels.py (time, GB/s, % of peak)
#   bench-eager 120  tools/benchmark.py --devices cuda, eager, 800x1216 and
#                    2048x2048, inference and training step
#   detector    120  benchmarks/detector_step.py, Mask R-CNN, batch 2,
#                    1333x800, AMP fp16
#   kernel-counts-amp 75  the counts again under bf16 autocast
#   bench-graphs 240 tools/benchmark.py --compile reduce-overhead (CUDA
#                    graphs), 800x1216
#   compile-tests 150  the CUDA torch.compile tests of the backbone
# Then $OUT/summary.md: the machine, each step's status and time, and the
# tables and test counts from the logs ($OUT/<step>.log).
#
# Set-up works offline: it uses the machine's Python ($PYTHON, else
# python3) and its CUDA torch and Triton, in a virtual environment that
# sees the system's packages ($VENV, default ~/.cache/mmvit3/gpu-venv,
# kept for a rerun on the same machine). Missing toolboxes are installed at the
# requirements.txt pins from $WHEELHOUSE (default .whl/ in the repository,
# then ~/.cache/mmvit3/wheels and its per-torch folders), then from the
# package index if one is reachable (no retries). mmcv has no Linux wheel:
# without one, it is built from an sdist found the same way, with its CPU
# ops only (about 3 minutes on 16 cores; its CUDA ops would take the whole
# budget), and detector_step.py then runs RoIAlign and NMS on torchvision's
# CUDA kernels. What cannot be set up is reported and the steps that need
# it fail fast.
#
# GPU_CHECK_DRY_RUN=1 prints each step's command instead (no set-up): the
# tests check the commands' flags against the tools without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${1:-${OUT:-./gpu_check_out}}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
MIN_STEP_S=20
DRY_RUN=${GPU_CHECK_DRY_RUN:-}
VENV=${VENV:-$HOME/.cache/mmvit3/gpu-venv}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STATUS="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\n' >"$STATUS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
left() { echo $((DEADLINE - $(date +%s))); }

# run_step NAME BUDGET_S COMMAND...: logs to $OUT/NAME.log, records status
run_step() {
    local name=$1 budget=$2
    shift 2
    if [ -n "$DRY_RUN" ]; then
        printf '%s:' "$name"
        printf ' %q' "$@"
        printf '\n'
        return
    fi
    local remaining
    remaining=$(left)
    if ((remaining < MIN_STEP_S)); then
        log "$name: skipped, ${remaining}s of the budget left"
        printf '%s\tskipped (budget spent)\t0\n' "$name" >>"$STATUS"
        return
    fi
    ((budget > remaining)) && budget=$remaining
    log "$name (up to ${budget}s): $*"
    local begin=$(date +%s) rc status
    timeout --kill-after=10 "$budget" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out after ${budget}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    log "$name: $status, see $OUT/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$status" $(($(date +%s) - begin)) \
        >>"$STATUS"
}

pin() { grep -E "^$1==" requirements.txt; }

# pip_install ARGS...: from the wheelhouses first, then the index (once)
pip_install() {
    local links=() dir
    for dir in "${WHEELHOUSES[@]}"; do
        [ -d "$dir" ] && links+=(--find-links "$dir")
    done
    # the machine's torch stack stays as it is
    "$PY" -m pip freeze 2>/dev/null |
        grep -E '^(torch|torchvision|triton|numpy)==' >"$OUT/setup-constraints.txt"
    "$PY" -m pip install -q --no-index -c "$OUT/setup-constraints.txt" \
        "${links[@]}" "$@" 2>/dev/null ||
        "$PY" -m pip install -q --retries 0 --timeout 15 \
            -c "$OUT/setup-constraints.txt" "${links[@]}" "$@"
}

# the modules the steps need, and the requirement of each
missing_requirements() {
    "$PY" - <<'EOF'
import importlib
needs = {'mmengine': 'mmengine', 'mmdet': 'mmdet', 'timm': 'timm',
         'pytest': 'pytest', 'matplotlib': 'matplotlib',
         'pycocotools': 'pycocotools', 'scipy': 'scipy',
         'shapely': 'shapely', 'terminaltables': 'terminaltables'}
for module, requirement in needs.items():
    try:
        importlib.import_module(module)
    except Exception:
        print(requirement)
EOF
}

mmcv_works() {
    "$PY" -c 'import mmcv, mmcv.ops' >/dev/null 2>&1
}

# the newest mmcv sdist in the wheelhouses, else the pin (from the index)
mmcv_source() {
    local dir
    for dir in "${WHEELHOUSES[@]}"; do
        if [ -f "$dir/mmcv-2.1.0.tar.gz" ]; then
            echo "$dir/mmcv-2.1.0.tar.gz"
            return
        fi
    done
    pin mmcv
}

build_mmcv() {
    local tag cache tmp source budget
    tag=$("$PY" -c 'import sys, torch; print(f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}")')
    cache="$HOME/.cache/mmvit3/wheels/$tag"
    WHEELHOUSES+=("$cache")
    if pip_install --no-deps "$(pin mmcv)" && mmcv_works; then
        return 0
    fi
    # what the steps after it need at the least
    budget=$(($(left) - 180))
    if ((budget < 60)); then
        log "no time left to build mmcv"
        return 1
    fi
    source=$(mmcv_source)
    log "building mmcv from $source with CPU ops into $cache (up to ${budget}s)"
    mkdir -p "$cache"
    tmp=$(mktemp -d)
    pip_install setuptools wheel ninja
    CUDA_VISIBLE_DEVICES= MMCV_WITH_OPS=1 MAX_JOBS=$(nproc) \
        timeout "$budget" "$PY" -m pip wheel -q --retries 0 \
        --no-build-isolation --no-deps -w "$tmp" "$source" &&
        mv "$tmp"/mmcv-*.whl "$cache"/ &&
        "$PY" -m pip install -q --no-deps "$cache"/mmcv-2.1.0-*.whl
    rm -rf "$tmp"
    mmcv_works
}

setup() {
    local base=${PYTHON:-python3} missing
    WHEELHOUSES=("$REPO/.whl" "$HOME/.cache/mmvit3/wheels")
    WHEELHOUSES+=("$HOME"/.cache/mmvit3/wheels/*/)
    if ! "$base" -c 'import torch, triton; assert torch.cuda.is_available()'; then
        log "no CUDA torch with Triton in $base: install torch first"
        return 1
    fi
    PY=$base
    missing=$(missing_requirements)
    if [ -z "$missing" ] && mmcv_works; then
        log "$base has everything"
    else
        if [ ! -x "$VENV/bin/python" ]; then
            "$base" -m venv --system-site-packages "$VENV" || return 1
        fi
        PY="$(cd "$VENV" && pwd)/bin/python"
        missing=$(missing_requirements)
    fi
    if [ -n "$missing" ]; then
        log "installing: $missing"
        # shellcheck disable=SC2046
        pip_install $(for requirement in $missing; do pin "$requirement"; done) ||
            log "could not install all of: $missing"
    fi
    mmcv_works || build_mmcv || log "mmcv with ops is not available: the benchmarks need mmdet"
    "$PY" -m pip freeze >"$OUT/pip-freeze.txt" 2>/dev/null
    "$PY" - >"$OUT/machine.txt" 2>&1 <<'EOF'
import platform, torch, triton
print('python', platform.python_version(), '| torch', torch.__version__,
      '| CUDA', torch.version.cuda, '| triton', triton.__version__)
props = torch.cuda.get_device_properties(0)
print(torch.cuda.get_device_name(0), f'{props.total_memory / 2**30:.0f} GiB,',
      props.multi_processor_count, 'SMs, capability',
      f'{props.major}.{props.minor}')
EOF
    nvidia-smi >>"$OUT/machine.txt" 2>&1
    missing=$(missing_requirements)
    [ -z "$missing" ] || log "still missing: $missing"
}

summary() {
    local file="$OUT/summary.md" name
    {
        echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo
        echo '```'
        head -2 "$OUT/machine.txt" 2>/dev/null
        echo '```'
        echo
        echo '| step | status | seconds |'
        echo '| --- | --- | --- |'
        tail -n +2 "$STATUS" | sed 's/\t/ | /g; s/^/| /; s/$/ |/'
        for name in cuda-tests kernel-counts ttt-kernels bench-eager detector \
            kernel-counts-amp bench-graphs compile-tests; do
            [ -f "$OUT/$name.log" ] || continue
            echo
            echo "## $name"
            echo
            case $name in
                *tests)
                    echo "passed $(grep -c ' PASSED' "$OUT/$name.log"), skipped" \
                        "$(grep -c ' SKIPPED' "$OUT/$name.log"), failed" \
                        "$(grep -cE ' (FAILED|ERROR)' "$OUT/$name.log")"
                    grep -E '^(FAILED|ERROR|SKIPPED) ' "$OUT/$name.log" ;;
                *)
                    grep -E '^(\||machine:|training step|Mask R-CNN|H-ViT3-T time|NVIDIA|.*peak DRAM)' \
                        "$OUT/$name.log" ;;
            esac
            if ! grep -qP "^$name\tok\t" "$STATUS"; then
                echo
                echo '```'
                tail -n 8 "$OUT/$name.log"
                echo '```'
            fi
        done
    } >"$file"
}

PY=python
CUDA_TESTS=(tests/test_mlp_kernels.py tests/test_ttt_fused.py tests/test_ttt.py
            tests/test_amp.py)
# the tests that need a GPU: the 'cuda' device parameter, the compiled
# kernels, and the AMP check at the detectors' size
CUDA_SELECT='cuda or compiled_kernels or 1333x800'
if [ -z "$DRY_RUN" ]; then
    log "results go to $OUT; budget ${BUDGET}s"
    begin=$(date +%s)
    if setup >"$OUT/setup.log" 2>&1; then status=ok; else status=failed; fi
    printf 'setup\t%s\t%s\n' "$status" $(($(date +%s) - begin)) >>"$STATUS"
    log "setup: $status, see $OUT/setup.log"
    [ "$status" = ok ] || { summary; log "stopped: no CUDA torch. Results: $OUT"; exit 1; }
fi
run_step cuda-tests 150 "$PY" -m pytest -v -rs -m 'not slow' -p no:cacheprovider \
    -k "$CUDA_SELECT" "${CUDA_TESTS[@]}"
run_step kernel-counts 90 "$PY" benchmarks/kernel_counts.py --device cuda \
    --size 800x1216 --batch 2 --top 15 --out-json "$OUT/kernel-counts.json"
run_step ttt-kernels 75 "$PY" benchmarks/ttt_kernels.py --sizes 800x1216 \
    2048x2048 --batch 2 --dtype bf16 --repeats 20
run_step bench-eager 120 "$PY" tools/benchmark.py --devices cuda \
    --models hvit3-t swin-t --sizes 800x1216 2048x2048 \
    --train-sizes 800x1216 2048x2048 --train-batch 2 --repeats 10 \
    --out-dir "$OUT/bench-eager"
run_step detector 120 "$PY" benchmarks/detector_step.py --device cuda \
    --size 1333x800 --batch 2 --amp fp16 --repeats 10 \
    --out-json "$OUT/detector.json"
run_step kernel-counts-amp 75 "$PY" benchmarks/kernel_counts.py --device cuda \
    --size 800x1216 --batch 2 --amp bf16 --out-json "$OUT/kernel-counts-amp.json"
run_step bench-graphs 240 "$PY" tools/benchmark.py --devices cuda \
    --models hvit3-t swin-t --sizes 800x1216 --train-sizes 800x1216 \
    --train-batch 2 --repeats 10 --compile reduce-overhead \
    --out-dir "$OUT/bench-graphs"
run_step compile-tests 150 "$PY" -m pytest -v -rs -m 'not slow' -p no:cacheprovider \
    -k cuda tests/test_compile.py
if [ -z "$DRY_RUN" ]; then
    summary
    log "done in $(($(date +%s) - START))s. Results: $OUT (summary: $OUT/summary.md)"
fi
