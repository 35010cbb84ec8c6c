"""The joint image/mask transforms of every segmentation data set (VOC, a user's folder): torchvision v2."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IGNORE", "RandomScale", "make_transform", "denormalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255


class RandomScale(v2.Transform):
    """Resize by one random factor in ``scale`` (bilinear for images, nearest for masks: labels are never blended)."""

    def __init__(self, scale: tuple[float, float] = (0.5, 2.0)):
        super().__init__()
        self.scale = scale

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        s = float(torch.empty(()).uniform_(*self.scale))
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt, params):
        return F.resize(inpt, params["size"], antialias=True)


def make_transform(train: bool, image_size: int | tuple[int, int] = 320, scale=(0.5, 2.0),
                   mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    """Joint image/mask transform for uint8 images. Train: random scale, crop to ``image_size`` (pad the image with
    the mean colour, which normalises to ~0, the mask with 255), horizontal flip. Eval: nothing geometric -- full
    images. Both end normalised with ``mean`` / ``std`` (per channel, on the 0-1 scale)."""
    geometric = []
    if train:
        fill = tuple(round(255 * m) for m in mean)
        geometric = [
            RandomScale(scale),
            v2.RandomCrop(image_size, pad_if_needed=True, fill={tv_tensors.Image: fill, tv_tensors.Mask: IGNORE}),
            v2.RandomHorizontalFlip(),
        ]
    return v2.Compose([
        *geometric,
        v2.ToDtype(torch.float32, scale=True),  # images only; masks keep their integer labels
        v2.Normalize(list(mean), list(std)),
    ])


def denormalize(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Normalised images ((..., C, H, W)) back in [0, 1], on the CPU, for figures: the inverse of
    ``make_transform``'s ``v2.Normalize(mean, std)``."""
    m = torch.tensor(list(mean)).view(-1, 1, 1)
    s = torch.tensor(list(std)).view(-1, 1, 1)
    return (images.float().cpu() * s + m).clamp(0, 1)
