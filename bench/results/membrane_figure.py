"""docs/figures/membrane_unrolled_vs_unet.png: two test images of the membrane runs (bench/results/membrane.sh) with
the ground truth, each run's prediction (legend) and the last unrolled run's 'cell' heatmap (colour scale).

    python bench/results/membrane_figure.py RUNS DATA OUT.png     # RUNS holds unet/, unrolled/, unrolled-t10/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from bench import figures
from bench.runner import load_trained
from unroll.segmentation.folder import FolderSpec, MaskReader, read_image
from unroll.segmentation.train import predict


RUNS = {"unet": "unet", "unrolled": "unrolled (plain heatmaps)", "unrolled-t10": "unrolled (learnt temperature)"}


def main(runs: str, data: str, out: str, n: int = 2) -> None:
    runs, data = Path(runs), Path(data)
    names = [n for n in RUNS if (runs / n / "ckpt.pt").is_file()]
    models = {name: load_trained(runs / name / "ckpt.pt") for name in names}
    metrics = {name: json.loads((runs / name / "metrics.json").read_text()) for name in models}
    meta = models[names[0]][1]
    mapped = [n for n in names if n.startswith("unrolled")][-1]
    classes = meta["classes"]
    reader = MaskReader(FolderSpec.from_json(meta["data"]["spec"]))
    palette = figures.class_palette(len(classes))
    palette[1] = (215, 215, 215)  # cell interior light grey, membrane (class 0) black: how EM masks are usually shown
    mean, std = torch.tensor(meta["mean"]).view(3, 1, 1), torch.tensor(meta["std"]).view(3, 1, 1)
    ids = metrics[names[0]]["test_ids"][:n]
    plt = figures.plt
    cols = ["image", "ground truth", *names, f"'cell' heatmap\n{RUNS[mapped]}"]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.3 * len(cols), 2.35 * n + 0.9), squeeze=False)
    for r, stem in enumerate(ids):
        rgb = torch.from_numpy(np.array(read_image(data / "images" / f"{stem}.png"))).permute(2, 0, 1).float() / 255
        x = ((rgb - mean) / std)[None]
        outs = {name: predict(model, x) for name, (model, _) in models.items()}
        axes[r, 0].imshow(rgb[0], cmap="gray")
        axes[r, 1].imshow(figures.colorize(reader(data / "masks" / f"{stem}.png"), palette))
        for c, name in enumerate(names, start=2):
            axes[r, c].imshow(figures.colorize(outs[name]["pred"][0].numpy(), palette))
        h = outs[mapped]["seg"][0, 1].float().numpy()
        lim = float(np.abs(h).max()) or 1.0
        figures.heatmap_colorbar(fig, axes[r, -1].imshow(h, cmap="bwr", vmin=-lim, vmax=lim), axes[r, -1])
        axes[r, 0].set_ylabel(f"test image {stem}", fontsize=7)
        for ax in axes[r]:
            figures._off(ax)
    for c, name in enumerate(cols):
        title = name if name not in metrics else f"{RUNS[name]}\ntest mIoU {100 * metrics[name]['miou']:.1f}"
        axes[0, c].set_title(title, fontsize=7)
    figures._legend(fig, [0, 1], palette, classes)
    m = metrics[names[0]]
    fig.suptitle(f"ISBI membrane, N={m['labels']} pixel-labelled, resnet18 from scratch, {m['steps']} steps, "
                 f"{m['config']['image_size']} px crops, seed {m['config']['seed']} (one run each; test = "
                 f"{len(m['test_ids'])} held-out images)", fontsize=7.5)
    figures._save(fig, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:4])
