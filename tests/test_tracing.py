"""Tracing ordinary model code: optional forward arguments, dict / ModelOutput results (output=), and Python
decisions on shapes (a trace specialised to example=, guarded) versus on values (refused, naming the line)."""
import inspect
from collections import OrderedDict
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unroll
from unroll.tracing import InputShapeError, NeedsExampleError
from unroll.verify import autograd_heatmaps, relative_error


def line_of(cls, text: str) -> str:
    """'<file>:<line>' of the source line of cls containing `text` (what the error must point at)."""
    source, start = inspect.getsourcelines(cls)
    offset = next(i for i, line in enumerate(source) if text in line)
    return f"{inspect.getsourcefile(cls)}:{start + offset}"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def head(self, y):
        return self.fc(y.mean((2, 3)))


class OptionalArgs(Net):
    def forward(self, x, attn_mask=None, scale: float = 1.0, *, return_dict=False):
        y = torch.relu(self.conv(x)) * scale
        if attn_mask is not None:
            y = y * attn_mask
        return self.head(y)


def test_optional_arguments_keep_their_defaults():
    model = OptionalArgs().double()
    net = unroll.compile(model)
    x = torch.randn(2, 3, 8, 7, dtype=torch.double)
    assert [n.name for n in net.encoder.graph.nodes if n.op == "placeholder"] == ["x"]
    assert relative_error(net(x).heatmaps, autograd_heatmaps(model, x)[0]) < 1e-12


class RequiredSecond(Net):
    def forward(self, x, mask):
        return self.head(self.conv(x) * mask)


def test_second_required_argument_is_refused():
    with pytest.raises(unroll.UnsupportedModelError, match=r"requires 2 \(x, mask\)"):
        unroll.compile(RequiredSecond())


@dataclass
class Output(OrderedDict):  # what transformers' ModelOutput is: a dataclass that is also a dict
    logits: torch.Tensor = None
    features: torch.Tensor = None


class DictOut(Net):
    def forward(self, x):
        y = torch.relu(self.conv(x))
        return {"features": y, "logits": self.head(y)}


class ObjectOut(Net):
    def forward(self, x):
        y = torch.relu(self.conv(x))
        return Output(logits=self.head(y), features=y)


class TupleOut(Net):
    def forward(self, x):
        y = torch.relu(self.conv(x))
        return y, self.head(y)


@pytest.mark.parametrize("cls, output, pick", [
    (DictOut, "logits", lambda out: out["logits"]),
    (ObjectOut, "logits", lambda out: out.logits),
    (TupleOut, 1, lambda out: out[1]),
    (TupleOut, lambda out: out[-1], lambda out: out[1]),
])
def test_output_selects_the_logits(cls, output, pick):
    model = cls().double()
    net = unroll.compile(model, output=output)
    x = torch.randn(2, 3, 6, 6, dtype=torch.double)
    assert relative_error(net(x).heatmaps, autograd_heatmaps(lambda t: pick(model(t)), x)[0]) < 1e-12


def test_dict_output_without_output_names_the_keys():
    with pytest.raises(unroll.UnsupportedModelError, match=r"keys \['features', 'logits'\].*output="):
        unroll.compile(DictOut())
    with pytest.raises(unroll.UnsupportedModelError, match="output='scores'"):
        unroll.compile(DictOut(), output="scores")


class ShapeBranch(Net):
    """timm's ConvMlp: pool first when the feature map is smaller than the kernel."""

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if y.shape[-2] < 8:
            y = F.max_pool2d(y, 2)
        return self.head(y)


class ChannelCheck(Net):
    """transformers' ResNetEmbeddings: refuse inputs with the wrong channel count."""

    def forward(self, x):
        if x.shape[1] != self.conv.in_channels:
            raise ValueError("wrong channel count")
        return self.head(torch.relu(self.conv(x)))


def test_shape_branch_without_example_asks_for_one_and_names_the_line():
    with pytest.raises(NeedsExampleError) as e:
        unroll.compile(ShapeBranch())
    msg = str(e.value)
    assert "from a tensor's shape" in msg and "example=" in msg
    assert line_of(ShapeBranch, "if y.shape[-2] < 8") in msg


@pytest.mark.parametrize("size", [6, 10])  # both sides of the branch
def test_shape_branch_specialised_to_the_example(size):
    model = ShapeBranch().double()
    x = torch.randn(2, 3, size, size + 1, dtype=torch.double)
    net = unroll.compile(model, example=x)
    assert net.input_shape == tuple(x.shape)  # an intermediate's shape was read: every dim is fixed
    assert relative_error(net(x).heatmaps, autograd_heatmaps(model, x)[0]) < 1e-12
    other = torch.randn(2, 3, 16 - size, 16 - size, dtype=torch.double)  # the other branch: must not run
    with pytest.raises(InputShapeError, match=r"serves inputs of shape \(2, 3, \d+, \d+\)") as e:
        net(other)
    assert line_of(ShapeBranch, "if y.shape[-2] < 8") in str(e.value)
    with pytest.raises(InputShapeError):
        net(torch.randn(3, 3, size, size + 1, dtype=torch.double))  # batch size too: it could change the branch


def test_input_channel_check_fixes_only_that_dim():
    model = ChannelCheck().double()
    net = unroll.compile(model, example=torch.randn(1, 3, 8, 8, dtype=torch.double))
    assert net.input_shape == (None, 3, None, None)
    x = torch.randn(2, 3, 5, 9, dtype=torch.double)  # another batch and size: served
    assert relative_error(net(x).heatmaps, autograd_heatmaps(model, x)[0]) < 1e-12
    with pytest.raises(InputShapeError, match=r"\(\*, 3, \*, \*\)"):
        net(torch.randn(2, 4, 8, 8, dtype=torch.double))


def test_symbolic_models_ignore_the_example_and_serve_every_shape():
    model = OptionalArgs().double()
    net = unroll.compile(model, example=torch.randn(1, 3, 8, 8, dtype=torch.double))
    assert net.input_shape is None
    x = torch.randn(3, 3, 11, 5, dtype=torch.double)
    assert relative_error(net(x).heatmaps, autograd_heatmaps(model, x)[0]) < 1e-12


class ValueBranch(Net):
    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:
            y = -y
        return self.head(torch.relu(y))


@pytest.mark.parametrize("example", [None, torch.randn(1, 3, 8, 8)])
def test_value_dependent_branch_is_refused_with_its_line(example):
    with pytest.raises(unroll.UnsupportedModelError, match="data-dependent") as e:
        unroll.compile(ValueBranch(), example=example)
    assert line_of(ValueBranch, "if y.mean() > 0") in str(e.value)


class LoopOverLen(Net):
    def forward(self, x):
        y = torch.relu(self.conv(x))
        parts = [y[:, i:i + 1] for i in range(len(y.shape) - 2)]  # len() of a shape, range(): rank only
        return self.head(torch.cat(parts + [y], 1)[:, :4])


def test_len_and_range_on_shapes():
    model = LoopOverLen().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.double)
    net = unroll.compile(model, example=x)
    assert relative_error(net(x).heatmaps, autograd_heatmaps(model, x)[0]) < 1e-12


class TrainModeBN(Net):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.shape[-1] > 100:
            y = y[..., ::2]
        return self.head(torch.relu(y))


def test_running_the_example_leaves_the_model_untouched():
    model = TrainModeBN().double().train()
    example = torch.randn(2, 3, 8, 8, dtype=torch.double)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    unroll.compile(model, example=example)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.random.get_rng_state())


@pytest.mark.parametrize("size", [6, 10])
def test_verify_checks_shape_branching_models_at_the_input_shape(size):
    model = ShapeBranch().double().eval()
    report = unroll.verify(model, torch.randn(2, 3, size, size, dtype=torch.double), verbose=False)
    assert max(report.heatmaps, report.gradients) < 1e-12


def test_tracing_errors_are_exported():
    assert unroll.NeedsExampleError is NeedsExampleError and unroll.InputShapeError is InputShapeError
