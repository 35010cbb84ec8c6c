"""Benchmark metrics, as torchmetrics ``Metric`` subclasses so they accumulate over batches and sync across processes.

Both reuse torchmetrics' own accumulation and arithmetic; what is added here is the benchmark's conventions
(ignore label 255, background excluded from the image-level score, logits thresholded at 0) and a precise statement
of how each number is reduced, since "mIoU" and "macro F1" are computed in subtly different ways across papers.
"""

from __future__ import annotations

import math

from torch import Tensor
from torchmetrics.classification import BinaryF1Score, MulticlassJaccardIndex, MultilabelF1Score

__all__ = ["SegmentationIoU", "MultilabelF1", "BinaryObjectF1", "image_level_f1"]


class SegmentationIoU(MulticlassJaccardIndex):
    """Mean and per-class intersection over union for semantic segmentation.

    ``update(preds, target)``: ``target`` is a LongTensor of class indices, (N, H, W) (any shape works); ``preds`` is
    either class indices of the same shape or scores/logits with the class axis at dim 1, (N, C, H, W), which are
    reduced by argmax over dim 1.

    Reduction, exactly:

    1. One C x C confusion matrix is accumulated over **every pixel of the whole dataset** (torchmetrics'
       ``MulticlassConfusionMatrix`` state, summed over batches and processes). Pixels whose target equals
       ``ignore_index`` are dropped entirely: they count neither as ground truth nor as prediction.
    2. Per-class IoU_c = TP_c / (TP_c + FP_c + FN_c) from that one matrix (not averaged per image or per batch).
    3. A class absent from both ground truth and prediction over the whole dataset (TP + FP + FN = 0) has no IoU:
       its per-class entry is NaN and it is **excluded from the mean**. A class present in the ground truth but never
       predicted (or predicted but never present) has IoU 0 and counts. If ``ignore_index`` is itself a valid class
       index, that class is NaN and excluded too.
    4. ``miou`` = unweighted mean of the non-NaN per-class IoUs (background included when it is class 0). This equals
       torchmetrics' ``MulticlassJaccardIndex(average="macro")``.

    ``compute()`` returns ``{"miou": scalar tensor, "per_class": tensor (C,)}``; ``miou`` is NaN before any update.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, **kwargs) -> None:
        # average="none" with zero_division=NaN makes torchmetrics mark absent classes as NaN instead of 0,
        # which is what lets the mean exclude them.
        super().__init__(
            num_classes=num_classes, average="none", ignore_index=ignore_index, zero_division=math.nan, **kwargs
        )

    def compute(self) -> dict[str, Tensor]:
        per_class = super().compute()
        if self.ignore_index is not None and 0 <= self.ignore_index < self.num_classes:
            per_class = per_class.clone()
            per_class[self.ignore_index] = math.nan
        return {"miou": per_class.nanmean(), "per_class": per_class}


class MultilabelF1(MultilabelF1Score):
    """Macro F1 of image-level (multi-label) classification over the object classes, background excluded.

    ``update(logits, target)``: both (N, C) over all C classes including background (column ``background_index``,
    default 0); ``target`` is multi-hot (0/1, any dtype). The background column is dropped from both. A class is
    predicted present when its **logit > logit_threshold (default 0)**, i.e. sigmoid > 0.5; the binarising is done
    here rather than by torchmetrics, whose float path would apply a sigmoid only when values fall outside [0, 1].

    Reduction, exactly: TP/FP/FN per object class are summed over **all images of the dataset** (not per batch);
    F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c); the result is the unweighted mean of F1_c over the C - 1 object classes
    (torchmetrics ``MultilabelF1Score(average="macro")``). Unlike ``SegmentationIoU``, a class with TP + FP + FN = 0
    (never present, never predicted) is **not** excluded: it scores ``zero_division`` (default 0) and counts in the
    mean. On a split where every class occurs, as in the benchmarks, this does not arise.

    ``compute()`` returns a scalar tensor.
    """

    def __init__(
        self,
        num_classes: int,
        background_index: int = 0,
        logit_threshold: float = 0.0,
        zero_division: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(num_labels=num_classes - 1, average="macro", zero_division=zero_division, **kwargs)
        self.num_classes = num_classes
        self.background_index = background_index
        self.logit_threshold = logit_threshold

    def update(self, logits: Tensor, target: Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != self.num_classes or target.shape != logits.shape:
            raise ValueError(
                f"expected logits and target of shape (N, {self.num_classes}), "
                f"got {tuple(logits.shape)} and {tuple(target.shape)}"
            )
        keep = [c for c in range(self.num_classes) if c != self.background_index]
        preds = (logits[:, keep] > self.logit_threshold).long()
        super().update(preds, target[:, keep].long())


class BinaryObjectF1(BinaryF1Score):
    """:class:`MultilabelF1` for a task with one class besides the background (e.g. membrane / cell): the same
    arguments and conventions (background column dropped, logit > threshold), torchmetrics' binary F1 of the one
    remaining column, counts summed over the whole dataset. (torchmetrics' multilabel F1 needs two labels or more.)"""

    def __init__(self, num_classes: int = 2, background_index: int = 0, logit_threshold: float = 0.0,
                 zero_division: float = 0.0, **kwargs) -> None:
        if num_classes != 2:
            raise ValueError(f"BinaryObjectF1 is for 2 classes (background + one), got {num_classes}")
        super().__init__(zero_division=zero_division, **kwargs)
        self.num_classes, self.background_index, self.logit_threshold = num_classes, background_index, logit_threshold

    def update(self, logits: Tensor, target: Tensor) -> None:
        if logits.ndim != 2 or logits.shape[1] != 2 or target.shape != logits.shape:
            raise ValueError(f"expected logits and target of shape (N, 2), got {tuple(logits.shape)} and "
                             f"{tuple(target.shape)}")
        c = 1 - self.background_index
        super().update((logits[:, c] > self.logit_threshold).long(), target[:, c].long())


def image_level_f1(num_classes: int, background_index: int = 0, **kwargs):
    """The image-level F1 metric for ``num_classes`` classes (background included): MultilabelF1, or
    BinaryObjectF1 when only one class remains besides the background."""
    if num_classes == 2:
        return BinaryObjectF1(num_classes, background_index, **kwargs)
    return MultilabelF1(num_classes, background_index, **kwargs)
