"""PNG figures for the benchmarks (digits and VOC): scenes with ground truth and every model's prediction, per-class
heatmaps, heatmaps over training, and the label sweep. Matplotlib only, Agg backend, no display needed.

Inputs are plain tensors / arrays so both datasets can call these: images (n, C, H, W) already de-normalised to
[0, 1] (C = 1 or 3), masks and predictions (n, H, W) class indices (255 = ignore), heatmaps (n, K, H, W), a palette
(K or 256, 3) uint8 and the class names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["class_palette", "colorize", "heatmap_colorbar", "scenes_figure", "heatmaps_figure", "evolution_figure",
           "sweep_figure", "curves_figure"]

IGNORE = 255


def class_palette(num_classes: int) -> np.ndarray:
    """(256, 3) uint8: class 0 (background) black, the others from tab10/tab20, 255 (ignore) light grey."""
    cmap = plt.get_cmap("tab10" if num_classes - 1 <= 10 else "tab20")
    palette = np.zeros((256, 3), np.uint8)
    for k in range(1, num_classes):
        palette[k] = np.array(cmap((k - 1) % cmap.N)[:3]) * 255
    palette[IGNORE] = (224, 224, 192)
    return palette


def _np(t) -> np.ndarray:
    return t.detach().cpu().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def colorize(labels, palette: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 colours."""
    return palette[np.asarray(_np(labels), dtype=np.int64).clip(0, 255)]


def _image(img) -> np.ndarray:
    img = _np(img)
    img = img.transpose(1, 2, 0) if img.ndim == 3 else img
    img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
    return img.clip(0, 1)


def _off(ax):
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _legend(fig, present: Sequence[int], palette: np.ndarray, class_names: Sequence[str]):
    handles = [matplotlib.patches.Patch(color=palette[k] / 255, label=class_names[k]) for k in present]
    if not handles:
        return
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 11), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, -0.02))


def _present(*label_maps, num_classes: int) -> list[int]:
    """The classes that occur in any of the label maps (ignore excluded), sorted: the legend's entries."""
    found: set[int] = set()
    for m in label_maps:
        m = np.asarray(_np(m), dtype=np.int64)
        found |= set(np.unique(m[m != IGNORE]).tolist())
    return sorted(k for k in found if 0 <= k < num_classes)


def heatmap_colorbar(fig, image, ax, label: str | None = None):
    """A colour scale for a red (+) / blue (-) heatmap, beside ``ax`` (one axes or a row of them)."""
    bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01, aspect=15)
    bar.ax.tick_params(labelsize=6)
    if label:
        bar.set_label(label, fontsize=6)
    return bar


def scenes_figure(path, images, masks, predictions: Mapping[str, object], class_names: Sequence[str],
                  palette: np.ndarray | None = None, title: str | None = None) -> Path:
    """Rows = scenes; columns = image, ground truth, then each model's prediction (name -> (n, H, W))."""
    palette = class_palette(len(class_names)) if palette is None else palette
    n = len(images)
    cols = 2 + len(predictions)
    fig, axes = plt.subplots(n, cols, figsize=(1.3 * cols, 1.3 * n + 0.5), squeeze=False)
    present = set()
    for i in range(n):
        axes[i, 0].imshow(_image(images[i]), cmap="gray", vmin=0, vmax=1)
        m = np.asarray(_np(masks[i]), dtype=np.int64)
        present |= set(np.unique(m[m != IGNORE]).tolist())
        axes[i, 1].imshow(colorize(m, palette))
        for j, (name, pred) in enumerate(predictions.items()):
            p = np.asarray(_np(pred[i]), dtype=np.int64)
            present |= set(np.unique(p).tolist())
            axes[i, 2 + j].imshow(colorize(p, palette))
        for ax in axes[i]:
            _off(ax)
    for j, name in enumerate(["scene", "ground truth", *predictions]):
        axes[0, j].set_title(name, fontsize=8)
    _legend(fig, sorted(k for k in present if k < len(class_names)), palette, class_names)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def heatmaps_figure(path, images, heatmaps, class_names: Sequence[str], masks=None, title: str | None = None) -> Path:
    """Rows = scenes; columns = image (and ground truth), then every class's heatmap. Red = positive, blue =
    negative, one symmetric colour scale per scene; the class whose heatmap wins a pixel is the prediction."""
    heatmaps = _np(heatmaps)
    n, k = heatmaps.shape[:2]
    extra = 1 if masks is None else 2
    fig, axes = plt.subplots(n, k + extra, figsize=(1.1 * (k + extra) + 0.5, 1.15 * n + 0.4), squeeze=False)
    palette = class_palette(len(class_names))
    for i in range(n):
        axes[i, 0].imshow(_image(images[i]), cmap="gray", vmin=0, vmax=1)
        if masks is not None:
            axes[i, 1].imshow(colorize(masks[i], palette))
        lim = float(np.abs(heatmaps[i]).max()) or 1.0
        for c in range(k):
            shown = axes[i, extra + c].imshow(heatmaps[i, c], cmap="bwr", vmin=-lim, vmax=lim)
        heatmap_colorbar(fig, shown, axes[i, :].tolist())  # the row's one scale
        for ax in axes[i]:
            _off(ax)
    names = ["scene"] + (["ground truth"] if masks is not None else []) + list(class_names[:k])
    for j, name in enumerate(names):
        axes[0, j].set_title(name, fontsize=8)
    if masks is not None:
        _legend(fig, _present(*masks, num_classes=len(class_names)), palette, class_names)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def evolution_figure(path, images, masks, snapshots: Sequence[tuple[int, object]], class_names: Sequence[str],
                     title: str | None = None) -> Path:
    """Heatmaps over training. snapshots: [(step, heatmaps (n, K, H, W))]. For each scene two rows: the heatmap of
    its first object class (red +, blue -) and the argmax prediction, one column per step. Each heatmap has its own
    symmetric scale (heatmaps grow by orders of magnitude during training), written under it as +-max; the colour
    bar reads as a fraction of that max."""
    palette = class_palette(len(class_names))
    n = len(images)
    steps = [s for s, _ in snapshots]
    fig, axes = plt.subplots(2 * n, len(steps) + 2, figsize=(1.15 * (len(steps) + 2) + 0.5, 2.3 * n + 0.6),
                             squeeze=False)
    shown, labels = None, [masks]
    for i in range(n):
        m = np.asarray(_np(masks[i]), dtype=np.int64)
        objects = [c for c in np.unique(m).tolist() if 0 < c < len(class_names)]
        c = objects[0] if objects else 0
        axes[2 * i, 0].imshow(_image(images[i]), cmap="gray", vmin=0, vmax=1)
        axes[2 * i + 1, 0].imshow(colorize(m, palette))
        axes[2 * i, 1].text(0.5, 0.5, f"heatmap\nclass {class_names[c]}", ha="center", va="center", fontsize=7)
        axes[2 * i + 1, 1].text(0.5, 0.5, "argmax", ha="center", va="center", fontsize=7)
        for j, (step, h) in enumerate(snapshots):
            h = _np(h)[i]
            lim = float(np.abs(h[c]).max()) or 1.0
            shown = axes[2 * i, j + 2].imshow(h[c] / lim, cmap="bwr", vmin=-1, vmax=1)
            axes[2 * i, j + 2].set_xlabel(f"\u00b1{lim:.2g}", fontsize=6, labelpad=1)
            axes[2 * i + 1, j + 2].imshow(colorize(h.argmax(0), palette))
            labels.append(h.argmax(0)[None])
        for ax in (*axes[2 * i], *axes[2 * i + 1]):
            _off(ax)
    for j, step in enumerate(steps):
        axes[0, j + 2].set_title(f"step {step}", fontsize=8)
    axes[0, 0].set_title("scene / truth", fontsize=8)
    if shown is not None:
        heatmap_colorbar(fig, shown, axes.ravel().tolist(), label="heatmap / its max |value| (under each map)")
    _legend(fig, _present(*(m for group in labels for m in group), num_classes=len(class_names)), palette,
            class_names)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def sweep_figure(path, summary: Mapping[str, Mapping[int, tuple[float, float]]], xlabel: str = "pixel-labelled images",
                 ylabel: str = "test mIoU (%)", title: str | None = None) -> Path:
    """One line per model: mean +- std (error bars) against the number of labelled images (log x)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, points in summary.items():
        xs = sorted(points)
        means = [points[x][0] for x in xs]
        stds = [points[x][1] for x in xs]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def curves_figure(path, histories: Mapping[str, Sequence[Mapping]], key: str = "val_miou",
                  title: str | None = None) -> Path:
    """Validation score (history rows' `key`) and training loss against step, one line per model."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name, rows in histories.items():
        steps = [r["step"] for r in rows]
        if rows and rows[0].get(key) is not None:
            a1.plot(steps, [r[key] for r in rows], marker=".", label=name)
        a2.plot(steps, [r["loss"] for r in rows], marker=".", label=name)
    a1.set_xlabel("step")
    a1.set_ylabel(key)
    a2.set_xlabel("step")
    a2.set_ylabel("training loss")
    a2.set_yscale("log")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)
