#!/usr/bin/env bash
# The paper's configuration on VOC-sized synthetic images, on the CPU: resnet50 and vgg16_bn, 256 px crops,
# batch 10 (5 pixel-labelled), 21 classes, full-image evaluation (500x375-class images). 2 steps each.
set -eu
cd "$(dirname "$0")/../.."
export PYTHONWARNINGS=ignore
rm -rf /tmp/fullvoc; mkdir -p runs/voc-fullscale-cpu
python - <<'PY'
import bench.data.fake_voc as f
f.SIZES = ((375, 500), (500, 333), (333, 500))   # VOC's common sizes
f.make_fake_voc("/tmp/fullvoc", n_train=12, n_val=3, n_extra=10)
PY
for backbone in resnet50 vgg16_bn; do
  start=$(date +%s)
  /usr/bin/time -v python -m bench.voc --root /tmp/fullvoc --labels 10 --backbone $backbone --weights none \
      --steps 2 --pretrain-steps 1 --eval-every 2 --device cpu --out runs/voc-fullscale-cpu/$backbone --no-progress \
      2> runs/voc-fullscale-cpu/$backbone.time | tail -4
  echo "$backbone wall $(( $(date +%s) - start )) s, max RSS $(grep 'Maximum resident' runs/voc-fullscale-cpu/$backbone.time | awk '{print $NF/1024}') MiB"
done
