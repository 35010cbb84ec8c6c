"""U-Net whose encoder is a classifier's own feature extractor, with a free (untied) decoder.

The encoder is not a copy: the U-Net keeps the classifier module itself and runs its stages (`zoo.encoder_stages`),
so a classifier checkpoint loaded into `unet.classifier` is exactly the one the unrolled model wraps. This makes the
comparison "tied decoder (unrolled) vs free decoder (U-Net)" differ only in the decoder.

The decoder block is the one of segmentation_models_pytorch's Unet (nearest upsampling to the skip's exact size,
concatenation, two 3x3 conv-BN-ReLU), written on torchvision's Conv2dNormActivation so zoo needs no extra package.
Upsampling to the skip's size rather than by 2x is what makes any input size work (67x45: 34x23, 17x12, ...).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from zoo import SegOutput
from zoo.backbones import Stage, classifier_head, encoder_stages, run_stages


class DecoderBlock(nn.Module):
    """Upsample (nearest) to `size`, concatenate the skip if there is one, then two 3x3 conv-BN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = Conv2dNormActivation(in_channels + skip_channels, out_channels, kernel_size=3)
        self.conv2 = Conv2dNormActivation(out_channels, out_channels, kernel_size=3)

    def forward(self, x: Tensor, size: Sequence[int], skip: Tensor | None = None) -> Tensor:
        x = F.interpolate(x, size=tuple(size), mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class Decoder(nn.Module):
    """From the encoder's stage outputs back to (B, num_classes, H, W).

    One block per stage below the deepest, going up the stage sizes; with `skips` each block also concatenates that
    stage's output (U-Net), without it only the sizes are used (FCN). When the shallowest stage is already
    downsampled (a ResNet stem is /2) one more block, without skip, brings the map to the input size.
    `widths` are the blocks' output channels, deep to shallow; by default each stage's channels capped at 256, and
    half the last width (at least 16) for the extra full-resolution block.
    """

    def __init__(self, stages: list[Stage], num_classes: int, widths: Sequence[int] | None = None, skips: bool = True):
        super().__init__()
        skip_stages = list(reversed(stages[:-1]))
        needs_full_res = stages[0].stride > 1
        if widths is None:
            widths = [min(s.channels, 256) for s in skip_stages]
            if needs_full_res:
                widths.append(max(16, (widths[-1] if widths else stages[-1].channels) // 2))
        n_blocks = len(skip_stages) + needs_full_res
        if len(widths) != n_blocks:
            raise ValueError(f"this encoder needs {n_blocks} decoder widths (deep to shallow), got {len(widths)}")
        self.skips = skips
        self.blocks = nn.ModuleList()
        channels = stages[-1].channels
        for stage, width in zip(skip_stages, widths):
            self.blocks.append(DecoderBlock(channels, stage.channels if skips else 0, width))
            channels = width
        self.full_res = DecoderBlock(channels, 0, widths[-1]) if needs_full_res else None
        channels = widths[-1] if n_blocks else channels
        self.classify = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, features: list[Tensor], size: Sequence[int]) -> Tensor:
        x = features[-1]
        for block, skip in zip(self.blocks, reversed(features[:-1])):
            x = block(x, skip.shape[-2:], skip if self.skips else None)
        if self.full_res is not None:
            x = self.full_res(x, size)
        return self.classify(x)


def decode_samples(decoder: Decoder, features: list[Tensor], x: Tensor, samples: Tensor | None) -> Tensor:
    """The decoder on the rows `samples` (an index tensor; None = every row) of the encoder's features of `x`.

    The encoder runs on the whole batch (BatchNorm statistics move once per step) and the decoder only where maps are
    wanted (the pixel-labelled rows of a training batch); no rows gives a (0, K, H, W) map without running it."""
    if samples is None:
        return decoder(features, x.shape[-2:])
    if len(samples) == 0:
        return x.new_zeros(0, decoder.classify.out_channels, *x.shape[2:])
    return decoder([f[samples] for f in features], x.shape[-2:])


class UNet(nn.Module):
    """U-Net on `classifier`'s stages (shared modules, shared weights) with a free decoder; seg only.

    forward(x, samples=None) -> SegOutput(logits=None, seg=(B, num_classes, H, W)), for any H, W; with `samples`
    the maps of those rows only (see `decode_samples`).
    The classifier's head is kept (it is part of `classifier`) but unused; MultiTaskUNet uses it.
    """

    def __init__(self, classifier: nn.Module, num_classes: int, decoder_channels: Sequence[int] | None = None):
        super().__init__()
        self.classifier = classifier
        self.stages = encoder_stages(classifier)
        self.decoder = Decoder(self.stages, num_classes, decoder_channels, skips=True)

    def encode(self, x: Tensor) -> list[Tensor]:
        return run_stages(self.classifier, self.stages, x)

    def forward(self, x: Tensor, samples: Tensor | None = None) -> SegOutput:
        return SegOutput(None, decode_samples(self.decoder, self.encode(x), x, samples))


class MultiTaskUNet(UNet):
    """UNet plus the classifier's own head on the deepest features: SegOutput(logits=(B, C), seg=(B, K, H, W));
    `samples` as in UNet (the logits are always of every row).

    The logits are exactly `classifier(x)`: same modules, same order, one shared encoder pass.
    """

    def __init__(self, classifier: nn.Module, num_classes: int, decoder_channels: Sequence[int] | None = None):
        super().__init__(classifier, num_classes, decoder_channels)
        self.head = classifier_head(classifier)

    def forward(self, x: Tensor, samples: Tensor | None = None) -> SegOutput:
        features = self.encode(x)
        pool, fc = (self.classifier.get_submodule(path) for path in self.head)
        logits = fc(torch.flatten(pool(features[-1]), 1))  # every row: the classification loss sees the whole batch
        return SegOutput(logits, decode_samples(self.decoder, features, x, samples))
