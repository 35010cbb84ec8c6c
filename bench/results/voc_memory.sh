#!/usr/bin/env bash
# Peak memory of one default bench.voc training step (batch 10, 5 pixel-labelled rows, 256 px, 21 classes, float32)
# per decoder setting, on the CPU: bench.speed's --memory-row (peak RSS above model + input of a fresh process; glibc
# told to return big blocks so RSS tracks live tensors). Output: bench/results/voc_memory.txt. Run alone; ~30 min.
set -u
cd "$(dirname "$0")/../.."
export PYTHONWARNINGS=ignore MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072
for model in resnet50 vgg16_bn; do
  for cfg in "none" "auto" "1" "3" "7" "21 --checkpoint" "7 --checkpoint" "3 --checkpoint" "1 --checkpoint"; do
    mib=$(python -m bench.speed --memory-row train_half_unroll --model "$model" --size 256 --batch 10 --classes 21 \
          --chunk $cfg 2>&1 | tail -1)
    printf '%-9s --chunk %-16s peak %6.0f MiB\n' "$model" "$cfg" "$mib"
  done
done
