"""Segmentation baselines for the unrolled decoder. (The weight-shared autoencoder, WS-AE, is built by the compiler.)"""

from collections.abc import Sequence

from torch import Tensor, nn

from zoo import SegOutput
from zoo.backbones import encoder_stages, run_stages
from zoo.unet import Decoder


class FCN(nn.Module):
    """The classifier's stages, then a free single-branch decoder: nearest upsampling + conv blocks, no skips.

    It is UNet with the skip concatenations removed (same blocks, same widths), so UNet vs FCN measures what the
    skips add, and FCN vs unrolled measures what the tied gates and pooling indices add. Seg only.
    """

    def __init__(self, classifier: nn.Module, num_classes: int, decoder_channels: Sequence[int] | None = None):
        super().__init__()
        self.classifier = classifier
        self.stages = encoder_stages(classifier)
        self.decoder = Decoder(self.stages, num_classes, decoder_channels, skips=False)

    def forward(self, x: Tensor) -> SegOutput:
        features = run_stages(self.classifier, self.stages, x)
        # Only the deepest map carries content; the shallower ones give the decoder its upsampling sizes.
        return SegOutput(None, self.decoder(features, x.shape[-2:]))
