"""Small ReLU classifiers for the digit-scene experiments.

Both are built only from Conv2d, BatchNorm2d, ReLU, MaxPool2d, AdaptiveAvgPool2d and Linear, with a forward that has
no data-dependent control flow, so `torch.fx.symbolic_trace` (and hence `unroll.compile`) sees every op.
Layouts follow torchvision (`features` Sequential, then `avgpool`, then `fc`) so `zoo.encoder_stages` can read them
the same way it reads VGG and ResNet.
"""

import torch
from torch import nn


def _init_like_torchvision(model: nn.Module) -> None:
    # torchvision's VGG/ResNet init: He-normal (fan_out) convs, unit BN, small-normal linear; trains well from scratch.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


class SmallVGG(nn.Module):
    """VGG-style classifier for 64x64 digit scenes: stages of (3x3 conv, BN, ReLU) x convs_per_stage, 2x2 max-pool
    between stages (not after the last), then global average pool and one linear layer.

    With the defaults (widths 16-32-64-128, two convs per stage) it has ~0.29M parameters and an 8x8 last feature map
    for a 64x64 input: small enough to train on two CPU cores in minutes, deep enough to need real localisation.
    No max-pool before the global pool keeps the last feature map at 8x8 instead of 4x4, so heatmaps stay sharper.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        convs_per_stage: int = 2,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i, width in enumerate(widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs_per_stage):
                # bias=False: the BatchNorm right after has its own shift.
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class PlainConvNet(nn.Module):
    """`depth` ReLU conv layers with `kernel_size` x `kernel_size` kernels and same padding, no pooling, then global
    average pool and one linear layer: the "contribution window" experiment.

    Every layer keeps the input resolution, so each output position sees exactly a
    `depth * (kernel_size - 1) + 1` square window of the input, and nothing else changes between kernel sizes.
    """

    def __init__(
        self,
        kernel_size: int,
        depth: int = 5,
        width: int = 32,
        num_classes: int = 10,
        in_channels: int = 3,
    ):
        super().__init__()
        # Odd kernels only: same padding is then the symmetric integer k // 2. Even kernels need asymmetric padding,
        # which Conv2d(padding="same") hides and a transposed conv in the unrolled decoder cannot mirror.
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"PlainConvNet needs an odd kernel_size >= 1 (same padding), got {kernel_size}")
        if depth < 1:
            raise ValueError(f"PlainConvNet needs depth >= 1, got {depth}")
        self.kernel_size = kernel_size
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        _init_like_torchvision(self)

    @property
    def window(self) -> int:
        """Side of the input square that one output position of `features` depends on."""
        depth = sum(isinstance(m, nn.Conv2d) for m in self.features)
        return depth * (self.kernel_size - 1) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)
