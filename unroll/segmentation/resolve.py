"""Background resolves: per-class attribution maps -> a semantic segmentation, given the image-level labels.

Conventions (all functions):

- ``maps`` is (B, K, H, W), indexed by class id (channel k = class k, background = ``background_index``, default 0,
  whose channel is never read). ``labels`` is (B, K) multi-hot image labels; only an image's positive foreground
  classes compete for its pixels (weak supervision: the image labels are known at pseudo-label time).
- Maps are made comparable across classes by :func:`normalize`: ReLU, then division by the max of each
  (image, class) map, so every present class peaks at 1 (an all-zero map stays zero).
- A pixel is foreground when its best positive class's score is **>= threshold**; it then takes that class (argmax;
  ties go to the lower class id), else background. An image without positive foreground classes is all background.

Resolves:

``basic``       the normalised maps, thresholded globally (:func:`resolve_basic`).
``smooth``      each normalised map blurred with a Gaussian (kernel 13, sigma 5, reflect padding), renormalised, then
                ``basic`` (:func:`smooth_maps`).
``superpixel``  Felzenszwalb superpixels of the image (scikit-image); each normalised map is replaced by its mean over
                each superpixel, then thresholded (default 0.3) with argmax over classes (:func:`superpixel_maps`).
                Not renormalised after averaging: a class whose peak sits in a mostly-cold superpixel scores < 1.

:func:`threshold_sweep` scores every threshold of a grid (default 0.01, 0.02, ..., 0.50) in one pass and returns the
mIoU curve and the best threshold (mIoU exactly as :class:`unroll.segmentation.metrics.SegmentationIoU`: one
confusion matrix over the whole dataset, background included, ``ignore_index`` pixels dropped, classes absent from
target and prediction excluded from the mean).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RESOLVES", "SWEEP_THRESHOLDS", "normalize", "foreground_scores", "resolve_basic", "smooth_maps",
    "superpixels", "superpixel_maps", "prepare", "resolve", "threshold_sweep", "SweepResult", "iou_from_confusion",
]

RESOLVES = ("basic", "smooth", "superpixel")
SWEEP_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(1, 51))  # 0.01 .. 0.50
DEFAULT_THRESHOLDS = {"basic": 0.25, "smooth": 0.25, "superpixel": 0.3}
# Felzenszwalb settings for images scaled to [0, 1]; sigma smooths before segmenting, min_size merges specks.
FELZENSZWALB = {"scale": 100.0, "sigma": 0.5, "min_size": 20}


def normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """ReLU, then divide each (image, class) map by its spatial max; all-zero maps stay zero."""
    maps = maps.clamp_min(0)
    return maps / maps.flatten(-2).amax(-1)[..., None, None].clamp_min(eps)


def _positive(labels: Tensor, background_index: int) -> Tensor:
    pos = labels.bool().clone()
    pos[:, background_index] = False
    return pos


def foreground_scores(maps: Tensor, labels: Tensor, background_index: int = 0) -> tuple[Tensor, Tensor]:
    """Per pixel: the best score among the image's positive foreground classes (B, H, W) and that class (B, H, W).
    Pixels of images without a positive class score -inf (never foreground). `maps` are used as given."""
    pos = _positive(labels, background_index).to(maps.device)
    masked = maps.masked_fill(~pos[:, :, None, None], float("-inf"))
    score, cls = masked.max(1)
    return score, cls


def resolve_basic(maps: Tensor, labels: Tensor, threshold: float = 0.25, background_index: int = 0,
                  normalized: bool = False) -> Tensor:
    """(B, H, W) class ids: the best positive class where its normalised map >= threshold, else background.
    normalized=True: `maps` are already normalised (skips :func:`normalize`)."""
    score, cls = foreground_scores(maps if normalized else normalize(maps), labels, background_index)
    return torch.where(score >= threshold, cls, torch.full_like(cls, background_index))


def _gaussian_kernel(kernel_size: int, sigma: float, dtype, device) -> Tensor:
    r = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    return (k / k.sum()).to(dtype=dtype, device=device)


def smooth_maps(maps: Tensor, kernel_size: int = 13, sigma: float = 5.0) -> Tensor:
    """Normalise, blur each map with a separable Gaussian (reflect padding), normalise again."""
    maps = normalize(maps)
    B, K, H, W = maps.shape
    k = _gaussian_kernel(kernel_size, sigma, maps.dtype, maps.device)
    pad = kernel_size // 2
    x = maps.reshape(B * K, 1, H, W)
    # reflect padding needs pad < size; replicate covers tiny maps
    mode = "reflect" if pad < min(H, W) else "replicate"
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode=mode), k.view(1, 1, -1, 1))
    return normalize(x.reshape(B, K, H, W))


def superpixels(images: Tensor, scale: float = FELZENSZWALB["scale"], sigma: float = FELZENSZWALB["sigma"],
                min_size: int = FELZENSZWALB["min_size"]) -> Tensor:
    """Felzenszwalb superpixels of (B, C, H, W) images (each image min-max scaled to [0, 1] first): (B, H, W) int64
    segment ids, numbered 0.. per image."""
    from skimage.segmentation import felzenszwalb

    out = []
    for img in images.detach().cpu().double():
        img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
        arr = img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()
        seg = felzenszwalb(arr, scale=scale, sigma=sigma, min_size=min_size,
                           channel_axis=None if img.shape[0] == 1 else -1)
        out.append(torch.from_numpy(seg.astype(np.int64)))
    return torch.stack(out).to(images.device)


def superpixel_maps(maps: Tensor, segments: Tensor) -> Tensor:
    """Normalise, then replace each map's values by their mean over each superpixel of `segments` (B, H, W)."""
    maps = normalize(maps)
    B, K, H, W = maps.shape
    seg = segments.reshape(B, 1, H * W).to(maps.device)
    n_seg = int(seg.max()) + 1
    sums = maps.new_zeros(B, K, n_seg).scatter_add_(2, seg.expand(B, K, -1), maps.reshape(B, K, H * W))
    counts = maps.new_zeros(B, 1, n_seg).scatter_add_(2, seg, torch.ones_like(seg, dtype=maps.dtype))
    means = sums / counts.clamp_min(1)
    return means.gather(2, seg.expand(B, K, -1)).reshape(B, K, H, W)


def prepare(maps: Tensor, method: str = "basic", images: Tensor | None = None, segments: Tensor | None = None,
            kernel_size: int = 13, sigma: float = 5.0) -> Tensor:
    """The per-class scores a resolve thresholds: normalised maps (basic), blurred (smooth), superpixel means."""
    if method == "basic":
        return normalize(maps)
    if method == "smooth":
        return smooth_maps(maps, kernel_size, sigma)
    if method == "superpixel":
        if segments is None:
            if images is None:
                raise ValueError("the superpixel resolve needs the images (or precomputed segments)")
            segments = superpixels(images)
        return superpixel_maps(maps, segments)
    raise ValueError(f"resolve method must be one of {RESOLVES}, got {method!r}")


def resolve(maps: Tensor, labels: Tensor, method: str = "basic", threshold: float | None = None,
            images: Tensor | None = None, segments: Tensor | None = None, background_index: int = 0) -> Tensor:
    """(B, H, W) segmentation by one of :data:`RESOLVES` (threshold default: 0.25 basic/smooth, 0.3 superpixel)."""
    threshold = DEFAULT_THRESHOLDS[method] if threshold is None else threshold
    scores = prepare(maps, method, images, segments)
    return resolve_basic(scores, labels, threshold, background_index, normalized=True)


def iou_from_confusion(conf: Tensor) -> tuple[Tensor, Tensor]:
    """(..., C, C) confusion (rows target, cols prediction) -> per-class IoU (..., C) with NaN for classes absent
    from both, and the mean over the non-NaN classes (...)."""
    conf = conf.double()
    tp = conf.diagonal(dim1=-2, dim2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    return iou, iou.nanmean(-1)


@dataclass
class SweepResult:
    thresholds: list[float]
    miou: list[float]
    best_threshold: float
    best_miou: float
    confusion: Tensor = field(repr=False)  # (T, C, C) int64

    def as_dict(self) -> dict:
        return {"thresholds": self.thresholds, "miou": self.miou, "best_threshold": self.best_threshold,
                "best_miou": self.best_miou}


class threshold_sweep:  # noqa: N801 -- used like a function with an accumulating state
    """Accumulate, over batches, the confusion matrix of ``resolve_basic`` at every threshold at once.

        sweep = threshold_sweep(num_classes)
        for scores, labels, target in batches:     # scores: prepare(maps, method, ...)
            sweep.update(scores, labels, target)
        result = sweep.compute()                   # SweepResult: mIoU per threshold, the best one

    Exact: a pixel is foreground at threshold t iff its score >= t, so with c = #{t_j <= score} it is foreground
    for the first c thresholds; one histogram over (target, class, c) gives all T confusion matrices.
    """

    def __init__(self, num_classes: int, thresholds=SWEEP_THRESHOLDS, ignore_index: int = 255,
                 background_index: int = 0):
        self.C, self.ignore, self.bg = num_classes, ignore_index, background_index
        self.thresholds = torch.tensor(sorted(float(t) for t in thresholds), dtype=torch.float64)
        T = len(self.thresholds)
        self.hist = torch.zeros(self.C, self.C, T + 1, dtype=torch.int64)  # target, class, #thresholds passed

    def update(self, scores: Tensor, labels: Tensor, target: Tensor) -> None:
        score, cls = foreground_scores(scores, labels, self.bg)
        keep = target != self.ignore
        t, c = target[keep].long().cpu(), cls[keep].cpu()
        # compared in the scores' own dtype, exactly as resolve_basic's `score >= threshold` does; -inf -> 0
        s = score[keep].cpu()
        passed = torch.bucketize(s, self.thresholds.to(s.dtype), right=True)
        T1 = self.hist.shape[2]
        flat = (t * self.C + c) * T1 + passed
        self.hist += torch.bincount(flat, minlength=self.C * self.C * T1).view(self.C, self.C, T1)

    def compute(self) -> SweepResult:
        T = len(self.thresholds)
        # at threshold j, pixels with passed > j are foreground with their class, the rest background
        tail = self.hist.flip(-1).cumsum(-1).flip(-1)  # tail[..., m] = sum_{c >= m}
        fg = tail[:, :, 1:T + 1].permute(2, 0, 1)  # (T, C, C): passed >= j + 1
        total = self.hist.sum(-1)  # (C, C)
        bg = (total - fg).sum(-1)  # (T, C): the same pixels, predicted background
        conf = fg.clone()
        conf[:, :, self.bg] += bg
        _, miou = iou_from_confusion(conf)
        best = int(torch.nan_to_num(miou, nan=-1.0).argmax())
        return SweepResult([round(float(v), 6) for v in self.thresholds], [float(v) for v in miou],
                           float(self.thresholds[best]), float(miou[best]), conf)
