"""The decoder equals autograd: heatmaps, input gradients and heatmap-loss parameter gradients, in float64."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

import unroll
from unroll.verify import autograd_gradients, relative_error

from conftest import randomize

K = 5  # classes


class Functional(nn.Module):
    """Functional ops everywhere and one ReLU module reused at several depths."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding="valid")
        self.c3 = nn.Conv2d(8, 12, 3, padding="same", dilation=2)
        self.bn = nn.BatchNorm2d(12)
        self.act = nn.ReLU()
        self.fc = nn.Linear(12, K)

    def forward(self, x):
        x = self.act(self.c1(x))
        x = F.max_pool2d(x, 2, ceil_mode=True)
        y = torch.relu(self.c2(x))
        y = self.act(self.bn(self.c3(y))) + y[:, :1]  # a slice, broadcast over channels in the add
        y = y.relu()
        y = F.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc(y)


class Inplace(nn.Module):
    """inplace=True and in-place tensor methods everywhere, plus a residual `+=`."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.r1 = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.fc = nn.Linear(8, K)

    def forward(self, x):
        x = self.r1(self.c1(x))
        y = self.bn(self.c2(x))
        y += x
        y = F.relu(y, inplace=True)
        y = self.pool(y).relu_()
        return self.fc(y.mean((2, 3)))


def plain_convnet():
    """Five ReLU conv layers without pooling, then global average pooling (the contribution-window net)."""
    layers, c = [], 3
    for _ in range(5):
        layers += [nn.Conv2d(c, 16, 5, padding=2), nn.ReLU()]
        c = 16
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, K))


# name -> (constructor, input H, W); big models at small inputs keep the suite fast
MODELS = {
    "resnet18": (lambda: tvm.resnet18(num_classes=K), 67, 45),
    "resnet50": (lambda: tvm.resnet50(num_classes=K), 67, 45),
    "resnext50_32x4d": (lambda: tvm.resnext50_32x4d(num_classes=K), 45, 35),
    "wide_resnet50_2": (lambda: tvm.wide_resnet50_2(num_classes=K), 45, 35),
    "vgg11": (lambda: tvm.vgg11(num_classes=K), 67, 45),
    "vgg16_bn": (lambda: tvm.vgg16_bn(num_classes=K), 67, 45),
    "alexnet": (lambda: tvm.alexnet(num_classes=K), 99, 83),
    "squeezenet1_1": (lambda: tvm.squeezenet1_1(num_classes=K), 67, 45),
    "densenet121": (lambda: tvm.densenet121(num_classes=K), 45, 35),
    "mobilenet_v2": (lambda: tvm.mobilenet_v2(num_classes=K), 37, 33),
    "shufflenet_v2_x0_5": (lambda: tvm.shufflenet_v2_x0_5(num_classes=K), 67, 45),
    "functional": (Functional, 37, 29),
    "inplace": (Inplace, 23, 31),
    "plain_convnet": (plain_convnet, 21, 17),
}
HEAVY = {"resnet50", "resnext50_32x4d", "wide_resnet50_2", "vgg16_bn", "densenet121"}


def cases():
    return [pytest.param(name, id=name, marks=[pytest.mark.slow] if name in HEAVY else []) for name in MODELS]


def make(name, batch):
    ctor, h, w = MODELS[name]
    model = randomize(ctor())
    x = torch.randn(batch, 3, h, w, dtype=torch.double)
    return model, x


def heatmap_loss(heatmaps, target, weights):
    """Pixel-wise softmax cross-entropy over the class heatmaps plus a random weighted sum."""
    return F.cross_entropy(heatmaps, target) + (heatmaps * weights).sum()


@pytest.mark.parametrize("name", cases())
@pytest.mark.parametrize("batch", [1, 3])
def test_equals_autograd(name, batch):
    """Heatmaps and input gradients equal per-class autograd (1e-8 relative); with batch 3, the parameter gradients
    of a heatmap loss through the decoder equal autograd double backprop (create_graph=True) to 1e-7 relative."""
    model, x = make(name, batch)
    train = batch == 3
    net = unroll.compile(model)
    with torch.set_grad_enabled(train):
        out = net(x)
    with torch.no_grad():
        grads = net.gradients(x)
    ref_grads, ref_logits = autograd_gradients(model, x, create_graph=train)
    ref_heat = (ref_grads * x.unsqueeze(1)).sum(2)
    assert out.heatmaps.shape == (batch, K, *x.shape[2:])
    assert ref_heat.abs().max() > 0
    assert relative_error(out.logits, ref_logits) < 1e-12
    assert relative_error(out.heatmaps, ref_heat) < 1e-8
    assert relative_error(grads, ref_grads) < 1e-8
    if not train:
        return

    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, K, (batch, *x.shape[2:]), generator=g)
    weights = torch.randn(batch, K, *x.shape[2:], generator=g, dtype=torch.double)
    params = list(model.parameters())
    ref = torch.autograd.grad(heatmap_loss(ref_heat, target, weights), params, allow_unused=True)
    ours = torch.autograd.grad(heatmap_loss(out.heatmaps, target, weights), params, allow_unused=True)
    scale = max(r.abs().max() for r in ref if r is not None)
    assert scale > 0
    for p, r, o in zip(params, ref, ours):
        r = torch.zeros_like(p) if r is None else r
        o = torch.zeros_like(p) if o is None else o
        if r.abs().max() > 0:
            assert relative_error(o, r) < 1e-7
        else:  # e.g. the last bias and BN shifts: heatmaps do not depend on them, in both
            assert o.abs().max() <= 1e-12 * scale


def test_parameters_are_the_models_own():
    model = tvm.resnet18(num_classes=K)
    net = unroll.compile(model)
    assert [id(p) for p in net.parameters()] == [id(p) for p in model.parameters()]
    assert list(net.state_dict()) == ["model." + k for k in model.state_dict()]


def test_classes_and_samples_select_heatmaps():
    model, x = make("resnet18", 3)
    net = unroll.compile(model)
    with torch.no_grad():
        full = net(x).heatmaps
        some = net(x, classes=[3, 1]).heatmaps
        rows = net(x, samples=torch.tensor([2, 0])).heatmaps
    torch.testing.assert_close(some, full[:, [3, 1]], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(rows, full[[2, 0]], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("train", [False, True])
def test_samples_with_dropout(train):
    """VGG's classifier has Dropout: in eval mode its saved mask is None, in train mode the forward's own mask; either
    way the selected rows equal the same rows of the full batch."""
    torch.manual_seed(0)
    model = tvm.vgg11(num_classes=3).double().train(train)
    x = torch.randn(3, 3, 32, 32, dtype=torch.double)
    net = unroll.compile(model)
    with torch.no_grad():
        logits, saved = net.encode(x)
        full = net.decode(logits, saved)
        rows = net.decode(logits, saved, samples=torch.tensor([2, 0]))
    torch.testing.assert_close(rows, full[[2, 0]], rtol=1e-12, atol=1e-14)


def test_inference_mode_and_input_size_change():
    model, _ = make("resnet18", 1)
    net = unroll.compile(model)
    for h, w in [(64, 64), (33, 71)]:
        x = torch.randn(2, 3, h, w, dtype=torch.double)
        with torch.inference_mode():
            out = net(x)
        ref_grads, _ = autograd_gradients(model, x)
        assert relative_error(out.heatmaps, (ref_grads * x.unsqueeze(1)).sum(2)) < 1e-8


def test_verify_reports_small_errors(capsys):
    model, x = make("resnet18", 2)
    report = unroll.verify(model, x)
    assert report.max_error < 1e-10
    assert "heatmaps" in capsys.readouterr().out
