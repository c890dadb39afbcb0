#!/usr/bin/env bash
# The main job: train a small Focus-DETR from scratch on the embedded synthetic dataset on CPU,
# evaluate it with pycocotools, and draw detections and the selector's tokens.
#
#   bash scripts/demo.sh                       # ~15 min on a 2-core CPU (training is time-bounded)
#   bash scripts/demo.sh --config.train.max_minutes=3  # extra args go to scripts/train.py
#
# Outputs (default DEMO_WORKDIR=demo_output): checkpoints/, metrics.jsonl, TensorBoard events,
# eval/ (COCO results JSON + metrics), model/ (final model checkpoint), predictions/overlays/*.png
# (detections) and predictions/tokens/*.png (foreground scores, updated and object tokens).
# A fresh run each time; DEMO_RESUME=1 continues an interrupted run instead.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
WORKDIR=${DEMO_WORKDIR:-demo_output}
CONFIG=configs/demo_synthetic.py
if [ "${DEMO_RESUME:-0}" != 1 ]; then
  rm -rf "$WORKDIR"
fi
mkdir -p "$WORKDIR"

echo "== 1/3 synthetic dataset (generated on first use, then cached)"
.venv/bin/python - <<'PY'
from configs.demo_synthetic import get_config
from focus_detr_jax.data import synthetic
s = get_config().data.synthetic
ds = synthetic.ensure_synthetic_dataset(root=s.root or None, num_train=s.num_train,
                                        num_val=s.num_val, image_size=s.image_size,
                                        difficulty=s.difficulty, seed=s.seed)
for split, (images, annotations) in ds.splits.items():
  print(f"  {split}: {images}  {annotations}")
PY

echo "== 2/3 training + COCO evaluation (time-bounded, see config.train.max_minutes)"
start=$(date +%s)
.venv/bin/python scripts/train.py --config="$CONFIG" --workdir="$WORKDIR" "$@"
echo "  training + evaluation took $(( $(date +%s) - start )) s"

echo "== 3/3 detections and token selection on validation images"
.venv/bin/python scripts/predict.py --config="$CONFIG" --workdir="$WORKDIR" --split=validation \
  --max_images=8 --tokens --output_dir="$WORKDIR/predictions"
echo "Done. AP table above; metrics in $WORKDIR/eval/, pictures in $WORKDIR/predictions/."
