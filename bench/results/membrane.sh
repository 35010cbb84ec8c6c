#!/usr/bin/env bash
# The docs/own-data.md run: ISBI-2012 membrane images (30, 512x512, masks 0/255 read through a value mapping),
# 5 pixel-labelled training images, resnet18 from scratch (no pretrained weights here), 96 px crops, 150 steps,
# unrolled vs unet, one CPU thread. Then evaluate and predict from the checkpoints alone, and the docs figure.
set -euo pipefail
DATA=${DATA:-../shared/data/membrane}
OUT=${OUT:-runs/membrane}
export OMP_NUM_THREADS=1
for model in unrolled unet; do
  python -m bench.folder train "$DATA" --classes membrane,cell --mask-values 0=membrane,255=cell \
    --labels 5 --model "$model" --backbone resnet18 --weights none --image-size 96 --batch-size 4 \
    --steps 150 --eval-every 150 --lr 1e-3 --seed 0 --split-seed 0 --device cpu --no-progress \
    --out "$OUT/$model" --overwrite
done
python -m bench.folder evaluate --checkpoint "$OUT/unrolled/ckpt.pt" "$DATA" --split test --device cpu --no-progress
python -m bench.folder predict --checkpoint "$OUT/unrolled/ckpt.pt" "$DATA/images/10.png" --out "$OUT/predict" \
  --heatmaps --device cpu --no-progress
python bench/results/membrane_figure.py "$OUT" "$DATA" docs/figures/membrane_unrolled_vs_unet.png
