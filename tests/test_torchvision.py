"""Every torchvision classifier, by family: the piecewise-linear CNNs compile and their heatmaps equal autograd input x
gradient in float64; the others are refused with an UnsupportedModelError that names the ops in the way.

The lists below are the census of torchvision 0.29's `list_models(module=torchvision.models)`. A model a later
torchvision adds is in neither list and is reported (skipped with its name) until someone classifies it here.
"""

import warnings

import pytest
import torch
import torchvision
import torchvision.models as tvm

import unroll
from unroll.verify import autograd_heatmaps, relative_error

from conftest import randomize

K = 5

ACCEPTED = {  # ReLU / ReLU6, conv, BatchNorm, max and average pooling, concatenation, channel shuffle, linear
    "alexnet", "densenet121", "densenet161", "densenet169", "densenet201", "googlenet", "inception_v3",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "mobilenet_v2",
    "regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf", "regnet_x_16gf",
    "regnet_x_32gf", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "resnext101_64x4d", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0", "squeezenet1_0", "squeezenet1_1", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16",
    "vgg16_bn", "vgg19", "vgg19_bn", "wide_resnet50_2", "wide_resnet101_2",
}
# family -> (the smallest member, instantiated here; ops the error must name). Not piecewise linear: IxG of these
# is not a tied decoder with 0/1 gates, so refusing them is the right answer.
REJECTED = {
    "convnext": ("convnext_tiny", ("GELU", "LayerNorm")),
    "efficientnet": ("efficientnet_b0", ("SiLU", "Sigmoid")),
    "mobilenet_v3": ("mobilenet_v3_small", ("Hardswish", "Hardsigmoid")),
    "regnet_y": ("regnet_y_400mf", ("Sigmoid",)),
    "swin": ("swin_t", ("GELU", "LayerNorm")),
    "vit": ("vit_b_32", ("GELU", "LayerNorm", "MultiheadAttention")),
    "maxvit": ("maxvit_t", ("GELU", "softmax")),
}
FAST = {"alexnet", "googlenet", "mnasnet0_5", "regnet_x_400mf", "resnet34", "shufflenet_v2_x1_0", "squeezenet1_0",
        "vgg13", "densenet121"}
SIZE = {"inception_v3": 80, "alexnet": 67}  # smallest inputs their strides and 3x3 valid convs accept


def family(name: str) -> str | None:
    if name in ACCEPTED:
        return "accepted"
    for fam in sorted(REJECTED, key=len, reverse=True):  # regnet_y before regnet, mobilenet_v3 before mobilenet
        if name.startswith(fam + "_") or name == fam:
            return fam
    return None


def build(name: str) -> torch.nn.Module:
    kw = {"num_classes": K}
    if name in ("googlenet", "inception_v3"):  # auxiliary heads only exist in train mode; none needed here
        kw.update(aux_logits=False, init_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tvm.get_model(name, **kw)


def test_census_covers_torchvision():
    """Every classifier this torchvision lists is in ACCEPTED or in a REJECTED family (a new one is named here)."""
    names = tvm.list_models(module=tvm)
    assert "resnet50" in names and "vgg16_bn" in names
    unknown = sorted(n for n in names if family(n) is None)
    if unknown:
        pytest.skip(f"torchvision {torchvision.__version__} lists classifiers this census has not classified: "
                    f"{unknown}")


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow])
                                  for n in sorted(ACCEPTED)])
def test_accepted_equals_autograd(name):
    if name not in tvm.list_models(module=tvm):
        pytest.skip(f"{name} is not in this torchvision")
    torch.manual_seed(0)
    model = randomize(build(name))
    size = SIZE.get(name, 64)
    x = torch.randn(2, 3, size, size - 3, dtype=torch.double)  # not square: catches swapped H/W
    heatmaps = unroll.compile(model)(x).heatmaps
    assert heatmaps.shape == (2, K, size, size - 3)
    assert relative_error(heatmaps, autograd_heatmaps(model, x)[0]) < 1e-10


@pytest.mark.parametrize("fam", sorted(REJECTED))
def test_rejected_names_the_ops(fam):
    name, ops = REJECTED[fam]
    model = build(name).eval()
    with pytest.raises(unroll.UnsupportedModelError) as err:
        unroll.compile(model)
    text = str(err.value)
    for op in ops:
        assert op in text, (op, text[:500])
