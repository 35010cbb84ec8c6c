"""Model zoo: the classifiers we unroll, and the segmentation baselines we compare the unrolled decoder against.

    clf = zoo.classifier("resnet18", num_classes=20, weights="runs/clf.pt")
    unet = zoo.UNet(clf, num_classes=20)          # encoder = clf's own modules, so it shares clf's weights
    logits, seg = unet(x)                         # every zoo segmentation model returns a SegOutput
"""

# What every zoo segmentation model returns (class logits, None for seg-only models, and (B, K, H, W) maps): the
# interface unroll.segmentation's training loop calls. Imported first: unet.py and baselines.py import it from here.
from unroll.segmentation.train import SegOutput
from zoo.backbones import Stage, classifier, classifier_head, encoder_stages, load_checkpoint, run_stages
from zoo.small import PlainConvNet, SmallVGG
from zoo.unet import MultiTaskUNet, UNet
from zoo.baselines import FCN, WSAE

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
