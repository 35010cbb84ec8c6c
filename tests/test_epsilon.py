"""LRP-epsilon against zennit's Epsilon rule, and its behaviour as a training signal."""
import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm

import unroll
from unroll.verify import autograd_heatmaps, relative_error

from conftest import randomize

zennit = pytest.importorskip("zennit", reason="zennit is a test extra: pip install -e '.[dev]'")
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import LayerMapComposite  # noqa: E402
from zennit.layer import Sum  # noqa: E402
from zennit.rules import Epsilon, Norm  # noqa: E402
from zennit.torchvision import ResNetCanonizer  # noqa: E402
from zennit.types import AvgPool, Convolution, Linear  # noqa: E402


def zennit_epsilon(model, x, eps, canonizers=(), extra=()):
    """zennit's Epsilon on every conv/linear layer, relevance seeded with the logit of each class."""
    composite = LayerMapComposite([(Convolution, Epsilon(epsilon=eps)), (Linear, Epsilon(epsilon=eps)), *extra],
                                  canonizers=list(canonizers))
    x = x.clone().requires_grad_()
    maps = []
    with composite.context(model) as modified:
        logits = modified(x)
        for k in range(logits.shape[1]):
            seed = torch.zeros_like(logits)
            seed[:, k] = logits[:, k]
            (grad,) = torch.autograd.grad(logits, x, seed, retain_graph=True)
            maps.append(grad.sum(1))
    return torch.stack(maps, 1)


def exact_batchnorm(model):
    """zennit's canonizer turns a merged BN into x / sqrt(1 + bn.eps), not the identity; with bn.eps = 0 both sides
    compute the same network, so what remains is the rule itself."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0
    return model


# 38x45 inputs give VGG 1x1 features, so its adaptive pool to 7x7 only copies (see test_avgpool_difference)
@pytest.mark.parametrize("name, canonizers", [("vgg11", ()), ("vgg11_bn", (SequentialMergeBatchNorm(),))])
@pytest.mark.parametrize("eps", [1e-6, 0.1, 1.0])
def test_vgg_matches_zennit(name, canonizers, eps):
    model = exact_batchnorm(randomize(getattr(tvm, name)(num_classes=4)))
    x = torch.randn(2, 3, 38, 45, dtype=torch.double)
    ours = unroll.compile(model, rule="epsilon", epsilon=eps)(x).heatmaps.detach()
    assert relative_error(ours, zennit_epsilon(model, x, eps, canonizers)) < 1e-6


def test_resnet_residual_sums_measured_against_zennit():
    """Our residual treatment: the sum fans the cotangent out unchanged (LRP-0 on the sum, proportional split of
    relevance), epsilon acts at each branch's conv/BN output, global average pooling passes the cotangent (LRP-0 on
    the pool). zennit's ResNetCanonizer + Norm rules on its Sum and AvgPool layers is the same thing (1e-12 Norm
    stabiliser: measured 3e-10..1.3e-9). With plain gradient through zennit's Sum/AvgPool (relevance copied to both
    branches and spread evenly), the maps are unrelated: measured relative difference ~1, cosine ~0."""
    model = exact_batchnorm(randomize(tvm.resnet18(num_classes=4)))
    x = torch.randn(2, 3, 67, 45, dtype=torch.double)
    for eps in (1e-6, 1.0):
        ours = unroll.compile(model, rule="epsilon", epsilon=eps)(x).heatmaps.detach()
        norm = zennit_epsilon(model, x, eps, [ResNetCanonizer()], [(Sum, Norm(1e-12)), (AvgPool, Norm(1e-12))])
        assert relative_error(ours, norm) < 1e-7
        plain = zennit_epsilon(model, x, eps, [ResNetCanonizer()])
        assert relative_error(ours, plain) > 0.5


def test_avgpool_difference():
    """Average pooling wider than one pixel: zennit (gradient of relevance) and unroll (LRP-0 on the pool, zennit's
    Norm rule) differ -- this test pins that the difference is the pooling rule alone."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                    nn.Flatten(), nn.Linear(4, 3)))
    x = torch.randn(2, 3, 5, 6, dtype=torch.double)
    ours = unroll.compile(model, rule="epsilon", epsilon=0.3)(x).heatmaps.detach()
    assert relative_error(ours, zennit_epsilon(model, x, 0.3)) > 1e-3
    assert relative_error(ours, zennit_epsilon(model, x, 0.3, extra=[(AvgPool, Norm(1e-12))])) < 1e-9


def test_small_epsilon_approaches_input_times_gradient():
    model = randomize(tvm.resnet18(num_classes=4))
    x = torch.randn(1, 3, 45, 37, dtype=torch.double)
    ours = unroll.compile(model, rule="epsilon", epsilon=1e-12)(x).heatmaps.detach()
    ref, _ = autograd_heatmaps(model, x)
    assert relative_error(ours, ref) < 1e-6


def test_epsilon_heatmap_loss_gradient_is_the_true_derivative():
    """The epsilon gate depends on z, so a heatmap loss reaches the encoder through it too; check the parameter
    gradient against central finite differences."""
    model = randomize(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                    nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                    nn.Flatten(), nn.Linear(4, 3)))
    net = unroll.compile(model, rule="epsilon", epsilon=0.5)
    x = torch.randn(2, 2, 6, 6, dtype=torch.double)
    w = torch.randn(2, 3, 6, 6, dtype=torch.double)

    def loss():
        return (net(x).heatmaps * w).sum()

    weight = model[0].weight
    (grad,) = torch.autograd.grad(loss(), weight)
    h = 1e-6
    for idx in [(0, 0, 1, 1), (2, 1, 0, 2), (1, 0, 2, 2)]:
        with torch.no_grad():
            weight[idx] += h
            up = loss()
            weight[idx] -= 2 * h
            down = loss()
            weight[idx] += h
        fd = (up - down) / (2 * h)
        assert abs(float(fd - grad[idx])) < 1e-6 * max(1.0, abs(float(fd)))
    assert model[3].weight.grad is None  # nothing leaked into .grad
