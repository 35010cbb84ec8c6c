"""Segmentation baselines for the unrolled decoder: FCN (free decoder) and WS-AE (tied decoder without gates)."""

from collections.abc import Sequence

from torch import Tensor, nn

import unroll

from zoo import SegOutput
from zoo.backbones import encoder_stages, run_stages
from zoo.unet import Decoder, decode_samples


class FCN(nn.Module):
    """The classifier's stages, then a free single-branch decoder: nearest upsampling + conv blocks, no skips.

    It is UNet with the skip concatenations removed (same blocks, same widths), so UNet vs FCN measures what the
    skips add, and FCN vs unrolled measures what the tied gates and pooling indices add. Seg only; `samples` as in
    UNet.
    """

    def __init__(self, classifier: nn.Module, num_classes: int, decoder_channels: Sequence[int] | None = None):
        super().__init__()
        self.classifier = classifier
        self.stages = encoder_stages(classifier)
        self.decoder = Decoder(self.stages, num_classes, decoder_channels, skips=False)

    def forward(self, x: Tensor, samples: Tensor | None = None) -> SegOutput:
        features = run_stages(self.classifier, self.stages, x)
        # Only the deepest map carries content; the shallower ones give the decoder its upsampling sizes.
        return SegOutput(None, decode_samples(self.decoder, features, x, samples))


class WSAE(nn.Module):
    """Weight-shared autoencoder: the unrolled decoder (tied transposed convs, the encoder's pool indices, the
    per-class bottleneck and the final multiplication with x) with every tied gate (ReLU, LeakyReLU, ReLU6, Hardtanh)
    replaced by a ReLU on the decoder's own signal (``unroll.rulesets.WS_AE``). It isolates what the gates add.
    Returns logits and per-class maps like the unrolled model.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.net = unroll.compile(classifier, rules=unroll.rulesets.WS_AE)

    def forward(self, x: Tensor, samples: Tensor | None = None) -> SegOutput:
        out = self.net(x, samples=samples)
        return SegOutput(out.logits, out.heatmaps)
