"""Model zoo: the classifiers we unroll, and the segmentation baselines we compare the unrolled decoder against.

    clf = zoo.classifier("resnet18", num_classes=20, weights="runs/clf.pt")
    unet = zoo.UNet(clf, num_classes=20)          # encoder = clf's own modules, so it shares clf's weights
    logits, seg = unet(x)                         # every zoo segmentation model returns a SegOutput
"""

from typing import NamedTuple

from torch import Tensor


class SegOutput(NamedTuple):
    """What every zoo segmentation model returns: class logits (None for seg-only models) and (B, K, H, W) maps."""

    logits: Tensor | None
    seg: Tensor


# Imported after SegOutput on purpose: unet.py and baselines.py import SegOutput from this package.
from zoo.backbones import Stage, classifier, classifier_head, encoder_stages, load_checkpoint, run_stages  # noqa: E402
from zoo.small import PlainConvNet, SmallVGG  # noqa: E402
from zoo.unet import MultiTaskUNet, UNet  # noqa: E402
from zoo.baselines import FCN, WSAE  # noqa: E402

__all__ = [
    "SegOutput",
    "Stage",
    "classifier",
    "classifier_head",
    "encoder_stages",
    "load_checkpoint",
    "run_stages",
    "SmallVGG",
    "PlainConvNet",
    "UNet",
    "MultiTaskUNet",
    "FCN",
    "WSAE",
]
