"""Weakly-supervised-segmentation metrics that separate the discriminative region (DR) from the rest (NDR).

All are torchmetrics ``Metric`` classes (states summed over batches and processes). Shared conventions:

- ``preds`` and ``target``: (N, H, W) class ids; ``target == ignore_index`` (default 255) pixels are dropped from
  every count (neither ground truth nor prediction). Class ``background_index`` (default 0) is background, every other
  class is foreground.
- A pixel is **correct** when ``preds == target`` (class-aware: a foreground pixel given the wrong foreground class
  counts as wrong, as it does for mIoU).
- Everything is **micro-averaged over the whole dataset**: one numerator and one denominator summed over every pixel
  of every image and every foreground class pooled (not a mean of per-image or per-class ratios). A ratio with a zero
  denominator is NaN.

Metrics:

``SegmentationIoU`` (re-exported from :mod:`unroll.segmentation.metrics`): mIoU over all classes, background
included (see there: one dataset confusion matrix, classes absent from target and prediction excluded).

``ForegroundPrecision``: among pixels **predicted** foreground (preds != background, target not ignored), the fraction
with ``preds == target``. Low when the map leaks into the background (or onto another object).

``RegionRecall(region="dr" | "ndr", tau_cam=0.25)``: among ground-truth foreground pixels in the region, the fraction
with ``preds == target``. The regions come from the CAM of the pixel's **ground-truth class**: DR = CAM >= tau_cam,
NDR = CAM < tau_cam (CAM normalised to [0, 1] per image and class, see ``unroll.attribution.cam``). ``update(preds,
target, cam)``: ``cam`` is (N, K, H, W) over all K classes (the target's channel is read at each pixel) or (N, H, W)
already holding the ground-truth class's CAM at each pixel. ``DRRecall`` and ``NDRRecall`` fix the region.

``wsss_metrics(num_classes)`` bundles mIoU, FG-Prec, DR-Rec and NDR-Rec in a ``MetricCollection``:
``m.update(preds, target, cam=cam)`` (the CAM goes only to the region recalls), ``m.compute()`` ->
``{"miou", "fg_precision", "dr_recall", "ndr_recall"}`` scalars.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from .metrics import SegmentationIoU

__all__ = ["SegmentationIoU", "ForegroundPrecision", "RegionRecall", "DRRecall", "NDRRecall", "wsss_metrics",
           "TAU_CAM"]

TAU_CAM = 0.25


def _check(preds: Tensor, target: Tensor) -> None:
    if preds.shape != target.shape:
        raise ValueError(f"preds and target must have the same (N, H, W) shape, got {tuple(preds.shape)} and "
                         f"{tuple(target.shape)}")


class _Ratio(Metric):
    """correct / total, both summed over the dataset; NaN when total is 0."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ignore_index: int | None = 255, background_index: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.background_index = background_index
        self.add_state("correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _valid(self, target: Tensor) -> Tensor:
        if self.ignore_index is None:
            return torch.ones_like(target, dtype=torch.bool)
        return target != self.ignore_index

    def _add(self, selected: Tensor, preds: Tensor, target: Tensor) -> None:
        self.correct += (selected & (preds == target)).sum()
        self.total += selected.sum()

    def compute(self) -> Tensor:
        if self.total == 0:
            return torch.tensor(math.nan)
        return self.correct.double() / self.total


class ForegroundPrecision(_Ratio):
    """#(predicted foreground and preds == target) / #(predicted foreground), target-ignored pixels dropped, over the
    whole dataset. See the module docstring."""

    def update(self, preds: Tensor, target: Tensor) -> None:
        _check(preds, target)
        self._add(self._valid(target) & (preds != self.background_index), preds, target)


class RegionRecall(_Ratio):
    """#(GT foreground in region and preds == target) / #(GT foreground in region), region from the CAM of the
    ground-truth class: "dr" = CAM >= tau_cam, "ndr" = CAM < tau_cam. Over the whole dataset."""

    def __init__(self, region: str = "dr", tau_cam: float = TAU_CAM, ignore_index: int | None = 255,
                 background_index: int = 0, **kwargs) -> None:
        if region not in ("dr", "ndr"):
            raise ValueError(f"region must be 'dr' or 'ndr', got {region!r}")
        super().__init__(ignore_index, background_index, **kwargs)
        self.region, self.tau_cam = region, tau_cam

    def update(self, preds: Tensor, target: Tensor, cam: Tensor) -> None:
        _check(preds, target)
        fg = self._valid(target) & (target != self.background_index)
        if cam.dim() == preds.dim() + 1:  # (N, K, H, W): read the ground-truth class's channel
            index = torch.where(fg, target, torch.zeros_like(target)).long().unsqueeze(1)
            cam = cam.gather(1, index.to(cam.device)).squeeze(1)
        if cam.shape != target.shape:
            raise ValueError(f"cam must be (N, K, H, W) or (N, H, W) matching target {tuple(target.shape)}, "
                             f"got {tuple(cam.shape)}")
        cam = cam.to(target.device)
        inside = cam >= self.tau_cam if self.region == "dr" else cam < self.tau_cam
        self._add(fg & inside, preds, target)


class DRRecall(RegionRecall):
    def __init__(self, tau_cam: float = TAU_CAM, **kwargs) -> None:
        super().__init__("dr", tau_cam, **kwargs)


class NDRRecall(RegionRecall):
    def __init__(self, tau_cam: float = TAU_CAM, **kwargs) -> None:
        super().__init__("ndr", tau_cam, **kwargs)


class _MIoU(SegmentationIoU):
    """SegmentationIoU whose compute() is the scalar mIoU (for the collection)."""

    def compute(self) -> Tensor:
        return super().compute()["miou"]


def wsss_metrics(num_classes: int, tau_cam: float = TAU_CAM, ignore_index: int = 255,
                 background_index: int = 0) -> MetricCollection:
    """mIoU, FG-Prec, DR-Rec, NDR-Rec together: ``update(preds, target, cam=cam)``; ``compute()`` -> dict of scalars.
    (compute groups off: the two recalls have identical state names and must never be merged.)"""
    kw = {"ignore_index": ignore_index, "background_index": background_index}
    return MetricCollection(
        {
            "miou": _MIoU(num_classes, ignore_index=ignore_index),
            "fg_precision": ForegroundPrecision(**kw),
            "dr_recall": DRRecall(tau_cam, **kw),
            "ndr_recall": NDRRecall(tau_cam, **kw),
        },
        compute_groups=False,
    )
