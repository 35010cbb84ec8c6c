#!/usr/bin/env bash
# The docs/own-data.md run: ISBI-2012 membrane images (30, 512x512, masks 0/255 read through a value mapping),
# 5 pixel-labelled training images, resnet18 from scratch (no pretrained weights here), 96 px crops, 150 steps,
# one CPU thread: unet, unrolled with the paper's plain heatmaps, unrolled with a learnt heatmap temperature
# (initial 1), and unrolled with bench.digits' tied-model recipe (learnt temperature initialised at 10, lr 3e-3).
# Then evaluate and predict from a checkpoint alone, and the docs figure.
set -euo pipefail
DATA=${DATA:-../shared/data/membrane}
OUT=${OUT:-runs/membrane}
export OMP_NUM_THREADS=1
common=(--classes membrane,cell --mask-values 0=membrane,255=cell --labels 5 --backbone resnet18 --weights none
        --image-size 96 --batch-size 4 --steps 150 --eval-every 150 --seed 0 --split-seed 0 --device cpu
        --no-progress --overwrite)
python -m bench.folder train "$DATA" "${common[@]}" --model unet --lr 1e-3 --out "$OUT/unet"
python -m bench.folder train "$DATA" "${common[@]}" --model unrolled --lr 1e-3 --out "$OUT/unrolled"
python -m bench.folder train "$DATA" "${common[@]}" --model unrolled --lr 1e-3 --heatmap-scale learn \
  --out "$OUT/unrolled-learn" --no-figures
python -m bench.folder train "$DATA" "${common[@]}" --model unrolled --lr 3e-3 --heatmap-scale learn --init-scale 10 \
  --out "$OUT/unrolled-t10"
python -m bench.folder evaluate --checkpoint "$OUT/unrolled-t10/ckpt.pt" "$DATA" --split test --device cpu --no-progress
python -m bench.folder predict --checkpoint "$OUT/unrolled-t10/ckpt.pt" "$DATA/images/10.png" --out "$OUT/predict" \
  --heatmaps --device cpu --no-progress
python bench/results/membrane_figure.py "$OUT" "$DATA" docs/figures/membrane_unrolled_vs_unet.png
