#!/usr/bin/env bash
# make demo: generate the shapes dataset, train H-ViT3-T Mask R-CNN and
# UperNet on it from scratch, evaluate them on the val split, paint their
# predictions and plot their curves.
# Usage: tools/demo.sh [PYTHON]   (outputs in $WORK, default work_dirs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
DATA=${DATA:-data/shapes}
WORK=${WORK:-work_dirs/quickstart}
DET_CONFIG=configs/quickstart/mask-rcnn_hvit3-t_fpn_shapes.py
SEG_CONFIG=configs/quickstart/hvit3-t_upernet_shapes.py
# Idle OpenMP threads otherwise spin: on a CPU shared with other work (the
# data loader included) that slows training several times over.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
start=$(date +%s)

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
# the full log goes to a file; the console gets progress and results
run_logged() {
    local log=$1
    shift
    "$@" 2>&1 | tee "$log" | {
        grep --line-buffered -E \
            'Epoch\(|Iter\(|mAP_copypaste|^\|| Error|Traceback' || true
    }
}
last_checkpoint() { cat "$1/last_checkpoint"; }

mkdir -p "$WORK"
step "1/5 Shapes dataset -> $DATA (COCO and ADE20K layouts)"
"$PY" tools/make_shapes.py "$DATA" --num-train 400 --num-val 50 --size 96 96 --seed 0

step "2/5 Training H-ViT3-T Mask R-CNN from scratch (log: $WORK/det_train.log)"
run_logged "$WORK/det_train.log" \
    "$PY" tools/train.py "$DET_CONFIG" --work-dir "$WORK/det"

step "3/5 Training H-ViT3-T UperNet from scratch (log: $WORK/seg_train.log)"
run_logged "$WORK/seg_train.log" \
    "$PY" tools/train.py "$SEG_CONFIG" --work-dir "$WORK/seg"

step "4/5 Evaluating on the val split, painting predictions"
det_ckpt=$(last_checkpoint "$WORK/det")
seg_ckpt=$(last_checkpoint "$WORK/seg")
run_logged "$WORK/det_test.log" \
    "$PY" tools/test.py "$DET_CONFIG" "$det_ckpt" --work-dir "$WORK/det" \
    --show-dir vis
run_logged "$WORK/seg_test.log" \
    "$PY" tools/test.py "$SEG_CONFIG" "$seg_ckpt" --work-dir "$WORK/seg" \
    --show-dir "$WORK/seg/vis"

step "5/5 Plotting losses and metrics"
"$PY" tools/plot_scalars.py "$WORK/det" --out "$WORK/det_curves.png"
"$PY" tools/plot_scalars.py "$WORK/seg" --out "$WORK/seg_curves.png"

det_vis=$(ls -d "$WORK"/det/*/vis | tail -n 1)
seg_vis=$(dirname "$(find "$WORK/seg/vis" -name '*.png' | sort | head -n 1)")
elapsed=$(($(date +%s) - start))
step "Done in $((elapsed / 60)) min $((elapsed % 60)) s"
echo "Detection (val):    $(grep -o 'coco/bbox_mAP: [0-9.]*' "$WORK/det_test.log" | tail -n 1)," \
    "$(grep -o 'coco/segm_mAP: [0-9.]*' "$WORK/det_test.log" | tail -n 1)"
echo "Segmentation (val): $(grep -oE 'mIoU: [0-9.]+' "$WORK/seg_test.log" | tail -n 1)" \
    "(percent, IoUMetric's convention)"
cat <<EOT
Checkpoints:    $det_ckpt
                $seg_ckpt
Predictions:    $det_vis/
                $seg_vis/
Curves:         $WORK/det_curves.png
                $WORK/seg_curves.png
Logs:           $WORK/{det,seg}_{train,test}.log
Try one image:  $PY tools/demo.py $DATA/coco/val/val_000000.jpg $DET_CONFIG $det_ckpt
EOT
