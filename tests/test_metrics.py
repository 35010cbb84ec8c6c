"""unroll.segmentation.metrics against hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex

from unroll.segmentation.metrics import MultilabelF1, SegmentationIoU

nan = math.nan


def assert_close(actual, expected):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32), torch.tensor(expected), equal_nan=True)


# ---------------------------------------------------------------------------------------------------- SegmentationIoU


def test_iou_hand_example():
    # 4 classes; class 3 is in neither target nor prediction; one pixel ignored (its prediction, 0, must not count).
    target = torch.tensor([[[0, 0, 1, 1], [1, 255, 0, 0]]])
    preds = torch.tensor([[[0, 1, 1, 1], [2, 0, 0, 0]]])
    m = SegmentationIoU(num_classes=4)
    assert isinstance(m, Metric)
    m.update(preds, target)
    out = m.compute()
    # class 0: TP 3 ((0,0),(1,2),(1,3)), FN 1 ((0,1) predicted 1), FP 0 (the ignored pixel does not count) -> 3/4
    # class 1: TP 2, FP 1 ((0,1)), FN 1 ((1,0) predicted 2)                                                    -> 2/4
    # class 2: TP 0, FP 1                                                                                      -> 0
    # class 3: absent from both -> NaN, excluded from the mean
    assert_close(out["per_class"], [0.75, 0.5, 0.0, nan])
    assert_close(out["miou"], (0.75 + 0.5 + 0.0) / 3)


def test_iou_accumulates_one_dataset_confusion_matrix():
    # Two images; the dataset-level IoU is not the mean of per-image IoUs.
    t1, p1 = torch.tensor([[0, 0, 0, 1]]), torch.tensor([[0, 0, 0, 0]])  # class 1 missed
    t2, p2 = torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 1]])  # perfect
    m = SegmentationIoU(num_classes=2)
    m.update(p1, t1)
    m.update(p2, t2)
    out = m.compute()
    # summed: class 0 TP 3, FP 1 -> 3/4; class 1 TP 4, FN 1 -> 4/5
    assert_close(out["per_class"], [0.75, 0.8])
    assert_close(out["miou"], (0.75 + 0.8) / 2)
    per_image = (((3 / 4 + 0) / 2) + 1.0) / 2  # image 2 has class 0 absent -> its mIoU is class 1 alone
    assert abs(out["miou"].item() - per_image) > 0.05  # 0.775 vs 0.6875
    m.reset()
    with pytest.warns(UserWarning):  # torchmetrics warns about compute() before update()
        assert torch.isnan(m.compute()["miou"])


def test_iou_takes_logits_and_matches_torchmetrics_macro():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 8, 8, generator=g)
    target = torch.randint(0, 4, (4, 8, 8), generator=g)  # class 4 never in the target
    target[0, :2] = 255
    m = SegmentationIoU(num_classes=5)
    m.update(logits, target)
    out = m.compute()
    m2 = SegmentationIoU(num_classes=5)
    m2.update(logits.argmax(1), target)
    assert_close(out["miou"], m2.compute()["miou"].item())
    ref = MulticlassJaccardIndex(num_classes=5, ignore_index=255, average="macro")
    ref.update(logits, target)
    assert_close(out["miou"], ref.compute().item())
    # hand check of one class from the definition
    keep = target != 255
    p, t = logits.argmax(1)[keep], target[keep]
    tp, fp, fn = ((p == 2) & (t == 2)).sum(), ((p == 2) & (t != 2)).sum(), ((p != 2) & (t == 2)).sum()
    assert_close(out["per_class"][2], (tp / (tp + fp + fn)).item())


def test_iou_predicted_but_absent_class_counts_as_zero():
    # Class 2 never in the target but predicted once: IoU 0 and it counts in the mean (only TP+FP+FN=0 is excluded).
    m = SegmentationIoU(num_classes=3)
    m.update(torch.tensor([0, 0, 2, 1]), torch.tensor([0, 0, 1, 1]))
    out = m.compute()
    assert_close(out["per_class"], [1.0, 0.5, 0.0])
    assert_close(out["miou"], 0.5)


def test_iou_ignore_index_inside_the_class_range():
    # ignore_index=0 (e.g. scoring foreground only): class 0 is NaN and excluded, like torchmetrics' macro.
    target, preds = torch.tensor([0, 1, 1, 2]), torch.tensor([1, 1, 0, 2])
    m = SegmentationIoU(num_classes=3, ignore_index=0)
    m.update(preds, target)
    out = m.compute()
    # pixels 1..3: class 1 TP 1, FN 1 (predicted 0) -> 1/2; class 2 -> 1
    assert_close(out["per_class"], [nan, 0.5, 1.0])
    assert_close(out["miou"], 0.75)
    ref = MulticlassJaccardIndex(num_classes=3, ignore_index=0)
    ref.update(preds, target)
    assert_close(out["miou"], ref.compute().item())


# -------------------------------------------------------------------------------------------------------- MultilabelF1


def test_f1_hand_example():
    # 3 classes, column 0 = background (always 1 in the target; predictions there must not matter).
    logits = torch.tensor([[-9.0, 1.0, -1.0], [-9.0, -1.0, 0.5]])
    target = torch.tensor([[1, 1, 0], [1, 1, 1]])
    m = MultilabelF1(num_classes=3)
    assert isinstance(m, Metric)
    m.update(logits, target)
    # class 1: preds [1, 0] vs [1, 1] -> TP 1, FN 1 -> F1 = 2/3 ; class 2: preds [0, 1] vs [0, 1] -> F1 = 1
    assert_close(m.compute(), (2 / 3 + 1.0) / 2)


def test_f1_threshold_is_zero_on_logits():
    # All logits inside [0, 1]: torchmetrics alone would treat them as probabilities and threshold at 0.5.
    logits = torch.tensor([[0.9, 0.3, 0.2], [0.9, 0.1, 0.0]])
    target = torch.tensor([[1, 1, 1], [1, 1, 0]])
    m = MultilabelF1(num_classes=3)
    m.update(logits, target)
    # logit > 0: class 1 preds [1, 1] vs [1, 1] -> 1 ; class 2 preds [1, 0] vs [1, 0] -> 1 (0.0 is not > 0)
    assert_close(m.compute(), 1.0)
    strict = MultilabelF1(num_classes=3, logit_threshold=0.25)
    strict.update(logits, target)
    # class 1 preds [1, 0] -> TP 1 FN 1 -> 2/3 ; class 2 preds [0, 0] vs [1, 0] -> 0
    assert_close(strict.compute(), (2 / 3 + 0.0) / 2)


def test_f1_accumulates_over_the_dataset_and_counts_absent_classes():
    m = MultilabelF1(num_classes=4)
    m.update(torch.tensor([[5.0, 2.0, -2.0, -2.0]]), torch.tensor([[1, 1, 0, 0]]))
    m.update(torch.tensor([[5.0, -2.0, 2.0, -2.0]]), torch.tensor([[1, 1, 1, 0]]))
    # class 1: TP 1, FN 1 -> 2/3 ; class 2: TP 1 -> 1 ; class 3: never present, never predicted -> 0 (zero_division)
    assert_close(m.compute(), (2 / 3 + 1.0 + 0.0) / 3)
    m1 = MultilabelF1(num_classes=4, zero_division=1.0)
    logits = torch.tensor([[5.0, 2.0, -2.0, -2.0], [5.0, -2.0, 2.0, -2.0]])
    m1.update(logits, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]))  # the same two images in one batch
    assert_close(m1.compute(), (2 / 3 + 1.0 + 1.0) / 3)


def test_f1_background_column_is_configurable_and_shapes_are_checked():
    logits = torch.tensor([[1.0, -1.0, 1.0]])  # background last here
    target = torch.tensor([[1, 0, 1]])
    m = MultilabelF1(num_classes=3, background_index=2)
    m.update(logits, target)
    # classes 0 and 1: class 0 predicted and present -> 1 ; class 1 absent both -> 0
    assert_close(m.compute(), 0.5)
    with pytest.raises(ValueError):
        MultilabelF1(num_classes=3).update(torch.zeros(2, 4), torch.zeros(2, 4))
