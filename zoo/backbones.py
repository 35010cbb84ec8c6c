"""Classifiers by name, and where their feature stages are (for U-Net skips).

`classifier(name, num_classes)` builds a torchvision model (any `torchvision.models.get_model` name) or one of our
small nets, offline by default. `encoder_stages(model)` cuts a ResNet, a VGG or a small net into the sequence of
stages a U-Net takes its skips from; `run_stages` and `classifier_head` run those stages and the classifier's own head
on the classifier's own modules, so a decoder built on them shares the classifier's weights.
"""

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torchvision
from torch import Tensor, nn

from zoo.small import PlainConvNet, SmallVGG

SMALL_NETS = {"small_vgg": SmallVGG, "plain_convnet": PlainConvNet}

# Strings with one of these endings are treated as file paths, never as torchvision weights names.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin")


# ---------------------------------------------------------------------------------------------------------------------
# building classifiers


def classifier(
    name: str,
    num_classes: int,
    weights: str | os.PathLike | torchvision.models.WeightsEnum | None = None,
    in_channels: int = 3,
    **kwargs: Any,
) -> nn.Module:
    """A ReLU classifier by name: "small_vgg", "plain_convnet" (pass kernel_size=...) or any torchvision model name.

    weights:
      None                    random init; never touches the network (the default, and what tests use).
      a path                  a state dict, or a checkpoint dict holding one under "model" or "state_dict".
      a torchvision name      e.g. "DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1" or the enum member
                              itself: downloads the weights, then swaps the last Linear for a fresh `num_classes` one.
    in_channels != 3 replaces the first conv; its weights become the RGB filters summed and divided by in_channels,
    so pretrained filters keep their response to grey images. Extra kwargs go to the model constructor.
    """
    path = _checkpoint_path(weights)
    if name in SMALL_NETS:
        if weights is not None and path is None:
            raise ValueError(f"{name} has no pretrained weights: weights= takes None or a path, not {weights!r}")
        model = SMALL_NETS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    elif name.lower() not in torchvision.models.list_models():
        raise ValueError(f"unknown classifier {name!r}: use {sorted(SMALL_NETS)} or a torchvision model name")
    elif weights is None or path is not None:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        if in_channels != 3:
            _replace_first_conv(model, in_channels)
    else:
        # Pretrained: torchvision insists on its own class count, so build with it and replace the last layer after.
        model = torchvision.models.get_model(name, weights=_torchvision_weights(name, weights), **kwargs)
        if in_channels != 3:
            _replace_first_conv(model, in_channels)
        _replace_last_linear(model, num_classes)
    if path is not None:
        load_checkpoint(model, path)
    return model


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state dict (or a {"model"|"state_dict": state dict} checkpoint) from `path` into `model`, strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict or a checkpoint dict")
    state = checkpoint_state(state)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path} does not fit {type(model).__name__}: {err}") from err
    return model


def checkpoint_state(obj: dict) -> dict:
    """The state dict in a loaded checkpoint: ``obj`` itself or its "model" / "state_dict" entry, keys without the
    prefixes that DistributedDataParallel ("module.") and torch.compile ("_orig_mod.") wrappers add."""
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
    return {_strip_prefixes(k, ("module.", "_orig_mod.")): v for k, v in obj.items()}


def _strip_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    for prefix in prefixes:
        key = key.removeprefix(prefix)
    return key


def _checkpoint_path(weights: str | os.PathLike | None) -> Path | None:
    """`weights` as a checkpoint path, or None when it is None or a torchvision weights name. A string that looks
    like a path but names no file is an error here, so a typo never falls through to a download."""
    if weights is None or isinstance(weights, torchvision.models.WeightsEnum):
        return None
    looks_like_path = (
        isinstance(weights, os.PathLike)
        or os.sep in weights
        or "/" in weights
        or weights.endswith(CHECKPOINT_SUFFIXES)
        or Path(weights).exists()
    )
    if not looks_like_path:
        return None
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (weights= takes None, a checkpoint path, or a torchvision weights name)"
        )
    return path


def _torchvision_weights(name: str, weights: str | torchvision.models.WeightsEnum) -> torchvision.models.WeightsEnum:
    if isinstance(weights, torchvision.models.WeightsEnum):
        return weights
    if "." in weights:  # fully qualified, e.g. "ResNet18_Weights.IMAGENET1K_V1"
        return torchvision.models.get_weight(weights)
    options = torchvision.models.get_model_weights(name)
    try:
        return options[weights]
    except KeyError:
        raise ValueError(
            f"weights={weights!r} is neither an existing file nor a torchvision weights name for {name} "
            f"(choose from {list(options.__members__)})"
        ) from None


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    path, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(
        in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        # Summed over RGB / in_channels: a grey image repeated over in_channels gives the old filter response.
        new.weight.copy_(conv.weight.sum(1, keepdim=True).expand_as(new.weight) / in_channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    model.set_submodule(path, new)


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no Linear layer to replace for num_classes={num_classes}")
    path, fc = linears[-1]
    if fc.out_features != num_classes:
        model.set_submodule(path, nn.Linear(fc.in_features, num_classes, bias=fc.bias is not None))


# ---------------------------------------------------------------------------------------------------------------------
# feature stages


class Stage(NamedTuple):
    """One encoder stage: run `modules` (paths inside the classifier) in order on the previous stage's output.

    The output has `channels` channels and is `stride` times smaller than the input (rounded as the layers round).
    A U-Net takes its skips from the stage outputs; the last stage's output is what the classifier head reads.
    """

    name: str
    modules: tuple[str, ...]
    channels: int
    stride: int


def encoder_stages(model: nn.Module) -> list[Stage]:
    """The feature stages of a torchvision ResNet or VGG, a SmallVGG or a PlainConvNet, shallow to deep.

    ResNet: stem (conv1-bn1-relu, /2), then maxpool+layer1 (/4), layer2 (/8), layer3 (/16), layer4 (/32).
    VGG-like (VGG, SmallVGG): `features` is cut just before each max-pool, so each skip is the last full-resolution
    map of its block; a trailing max-pool (VGG has one) becomes a stage of its own.
    PlainConvNet: one stage, since it never downsamples.
    """
    if isinstance(model, torchvision.models.ResNet):
        return _resnet_stages(model)
    if isinstance(model, (torchvision.models.VGG, SmallVGG)):
        return _vgg_like_stages(model.features)
    if isinstance(model, PlainConvNet):
        paths = tuple(f"features.{i}" for i in range(len(model.features)))
        return [Stage("features", paths, _out_channels(model, paths), 1)]
    raise ValueError(
        f"encoder_stages knows torchvision ResNet and VGG, SmallVGG and PlainConvNet, not {type(model).__name__}"
    )


def classifier_head(model: nn.Module) -> tuple[str, str]:
    """Paths of the classifier's (pool, fc) modules: logits = fc(flatten(pool(last stage output))), as in
    torchvision's ResNet and VGG forward and in our small nets."""
    encoder_stages(model)  # same families, same error for the others
    if isinstance(model, torchvision.models.VGG):
        return "avgpool", "classifier"
    return "avgpool", "fc"


def run_stages(model: nn.Module, stages: list[Stage], x: Tensor) -> list[Tensor]:
    """Run the stages on the model's own modules; returns every stage's output, shallow to deep."""
    features = []
    for stage in stages:
        for path in stage.modules:
            x = model.get_submodule(path)(x)
        features.append(x)
    return features


def _resnet_stages(model: torchvision.models.ResNet) -> list[Stage]:
    strides = [_stride(model.conv1)]
    for layer_name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(model, layer_name)
        # A stage's first block strides through its downsample conv (stride 1 when torchvision dilates instead).
        down = layer[0].downsample
        step = _stride(down[0]) if down is not None else 1
        if layer_name == "layer1":
            step *= _stride(model.maxpool)
        strides.append(strides[-1] * step)
    groups = [
        ("stem", ("conv1", "bn1", "relu")),
        ("layer1", ("maxpool", "layer1")),
        ("layer2", ("layer2",)),
        ("layer3", ("layer3",)),
        ("layer4", ("layer4",)),
    ]
    return [Stage(name, paths, _out_channels(model, paths), s) for (name, paths), s in zip(groups, strides)]


def _vgg_like_stages(features: nn.Sequential) -> list[Stage]:
    stages: list[Stage] = []
    block: list[str] = []
    stride, channels, pools_only = 1, 0, True
    for i, m in enumerate(features):
        if isinstance(m, nn.MaxPool2d) and block:
            stages.append(Stage(f"block{len(stages) + 1}", tuple(block), channels, stride))
            block, pools_only = [], True
        if isinstance(m, nn.Conv2d):
            channels, pools_only = m.out_channels, False
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            stride *= _stride(m)
        block.append(f"features.{i}")
    name = "pool" if pools_only else "block"  # VGG's trailing max-pool is a stage of its own
    stages.append(Stage(f"{name}{len(stages) + 1}", tuple(block), channels, stride))
    return stages


def _stride(m: nn.Module) -> int:
    s = m.stride
    return s if isinstance(s, int) else s[0]


def _out_channels(model: nn.Module, paths: tuple[str, ...]) -> int:
    # The last conv of a stage sets its width (in a ResNet bottleneck the last conv registered is conv3, or the
    # downsample conv, which has the same width).
    convs = [m for p in paths for m in model.get_submodule(p).modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels
