#!/usr/bin/env bash
# make demo: generate the shapes dataset, train H-ViT3-T Mask R-CNN and
# UperNet on it from scratch, evaluate them on the val split, paint ground
# truth and predictions of a few val images into one picture and plot their
# curves.
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
# The two models train side by side, one thread each: at these small sizes
# a second thread speeds one run up far less than a second run does.
THREADS_PER_RUN=${THREADS_PER_RUN:-1}
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
start=$(date +%s)

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
# the full log goes to a file; the console gets progress and results,
# each line tagged with the run it comes from
run_logged() {
    local tag=$1 log=$2
    shift 2
    "$@" 2>&1 | tee "$log" | {
        grep --line-buffered -E \
            'Epoch\(|Iter\(|mAP_copypaste|^\|| Error|Traceback' || true
    } | sed -u "s/^/[$tag] /"
}
last_checkpoint() { cat "$1/last_checkpoint"; }

mkdir -p "$WORK"
step "1/4 Shapes dataset -> $DATA (COCO and ADE20K layouts)"
"$PY" tools/make_shapes.py "$DATA" --num-train 1000 --num-val 50 --size 64 64 --seed 0

step "2/4 Training H-ViT3-T Mask R-CNN [det] and UperNet [seg] from scratch, side by side (logs: $WORK/{det,seg}_train.log)"
OMP_NUM_THREADS=$THREADS_PER_RUN run_logged det "$WORK/det_train.log" \
    "$PY" tools/train.py "$DET_CONFIG" --work-dir "$WORK/det" &
det_pid=$!
OMP_NUM_THREADS=$THREADS_PER_RUN run_logged seg "$WORK/seg_train.log" \
    "$PY" tools/train.py "$SEG_CONFIG" --work-dir "$WORK/seg" &
seg_pid=$!
wait "$det_pid" || { echo "Detector training failed: see $WORK/det_train.log"; exit 1; }
wait "$seg_pid" || { echo "Segmenter training failed: see $WORK/seg_train.log"; exit 1; }

step "3/4 Evaluating on the val split, painting predictions"
det_ckpt=$(last_checkpoint "$WORK/det")
seg_ckpt=$(last_checkpoint "$WORK/seg")
run_logged det "$WORK/det_test.log" \
    "$PY" tools/test.py "$DET_CONFIG" "$det_ckpt" --work-dir "$WORK/det"
run_logged seg "$WORK/seg_test.log" \
    "$PY" tools/test.py "$SEG_CONFIG" "$seg_ckpt" --work-dir "$WORK/seg"
summary=$("$PY" tools/demo_summary.py --det "$DET_CONFIG" "$det_ckpt" \
    --seg "$SEG_CONFIG" "$seg_ckpt" --data-root "$DATA" \
    --out "$WORK/summary.png" | tail -n 1)

step "4/4 Plotting losses and metrics"
"$PY" tools/plot_scalars.py "$WORK/det" --out "$WORK/det_curves.png"
"$PY" tools/plot_scalars.py "$WORK/seg" --out "$WORK/seg_curves.png"

elapsed=$(($(date +%s) - start))
step "Done in $((elapsed / 60)) min $((elapsed % 60)) s"
echo "Detection (val):    $(grep -o 'coco/bbox_mAP: [0-9.]*' "$WORK/det_test.log" | tail -n 1)," \
    "$(grep -o 'coco/segm_mAP: [0-9.]*' "$WORK/det_test.log" | tail -n 1)"
echo "Segmentation (val): $(grep -oE 'mIoU: [0-9.]+' "$WORK/seg_test.log" | tail -n 1)" \
    "(percent, IoUMetric's convention)"
cat <<EOT
Checkpoints:    $det_ckpt
                $seg_ckpt
Curves:         $WORK/det_curves.png
                $WORK/seg_curves.png
Logs:           $WORK/{det,seg}_{train,test}.log
Try one image:  $PY tools/demo.py $DATA/coco/val/val_000000.jpg $DET_CONFIG $det_ckpt
Ground truth and predictions of the first val images (the summary):
                $summary
EOT
