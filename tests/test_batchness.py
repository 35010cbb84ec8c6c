"""Batch-ness follows data flow through shapes (unroll.batchness): a tensor built with the batch size as its first
dim (`torch.ones((x.size(0), C, 1, 1))`, `torch.zeros_like(y)`, `y.new_full((y.shape[0], ...), v)`) is saved per
sample, so samples= subsets it, and meets the cotangent with the class dim inserted. Each operand below has
different values per sample (`.cumsum(0)` over the batch), so a row paired with the wrong sample shows.

Before (main at aaab9a8): these compiled with the operand as a batch-less constant -- samples= of one row returned
B rows, of several a RuntimeError -- or, for *_like / new_* of an active tensor, were refused ("no unroll rule")."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unroll
from unroll.verify import autograd_gradients, relative_error

from test_rules import K, assert_matches_autograd, body_model

C = 6  # channels of the body's input (Net's conv)


def ramp(t):
    return t.cumsum(0)  # 1, 2, 3, ... down the batch: per-sample values


BUILT = {
    "torch.ones(size(0))": lambda s, y: y * ramp(torch.ones((y.size(0), C, 1, 1), dtype=y.dtype)),
    "torch.zeros(shape[0])": lambda s, y: y / (ramp(torch.zeros((y.shape[0], 1, 1, 1)) + 1.0) + 1.0),
    "torch.zeros(x.shape)": lambda s, y: y * ramp(torch.zeros(y.shape, dtype=y.dtype) + 0.5),
    "torch.full(size=)": lambda s, y: y * ramp(torch.full(size=(y.size(dim=0), C, 1, 1), fill_value=0.3)),
    "size()[:1] + tuple": lambda s, y: y * ramp(torch.ones(y.size()[:1] + (C, 1, 1), dtype=y.dtype)),
    "new_ones(size(0), ...)": lambda s, y: y * ramp(y.new_ones(y.size(0), C, 1, 1)),
    "new_full((shape[0],))": lambda s, y: y - 0.5 * y * ramp(y.new_full((y.shape[0], 1, 1, 1), 0.25)),
    "new_ones drop_path shape": lambda s, y: y * ramp(y.new_ones((y.shape[0],) + (1,) * (y.ndim - 1))),
    "ones_like(y)": lambda s, y: y * ramp(torch.ones_like(y)),
    "zeros_like(y[:, :1])": lambda s, y: y / (ramp(torch.zeros_like(y[:, :1]) + 1.0) + 2.0),
    "ones_like(input)": lambda s, y: y * ramp(torch.ones_like(y)) + y,
    "where(ones_like mask)": lambda s, y: torch.where(ramp(torch.ones_like(y)) % 2 > 0.5, y, 0.0),
    "constant.expand(size(0))": lambda s, y: y * ramp(s.w.expand(y.size(0), -1, -1, -1)),
    "constant.view(size(0))": lambda s, y: y * ramp(s.w.view(1, C, 1, 1).expand(y.shape[0], C, 1, 1)),
    "table[:size(0)]": lambda s, y: y * s.table[:y.size(0)],  # rows differ already: one per sample
    "table[:shape[0], :C]": lambda s, y: s.table[0:y.shape[0]:1, :C] * y,
}


def built_model(name):
    return body_model(BUILT[name], w=nn.Parameter(torch.rand(1, C, 1, 1, dtype=torch.double) + 0.5),
                      table=nn.Parameter(torch.rand(8, C, 1, 1, dtype=torch.double) + 0.5))


@pytest.mark.parametrize("batch", [1, 2, 3, 5])  # K = 3: B == K, B != K
@pytest.mark.parametrize("name", list(BUILT))
def test_value_built_with_the_batch_size_is_per_sample(name, batch):
    model, _ = built_model(name)
    x = torch.randn(batch, 3, 7, 6, dtype=torch.double)
    net = assert_matches_autograd(model, x)
    grads, _ = autograd_gradients(model, x)
    ref = (grads * x.unsqueeze(1)).sum(2)
    for rows in ([batch - 1], [batch - 1, 0, batch - 1], list(range(batch))[::-1]):
        out = net(x, samples=rows)
        assert out.heatmaps.shape == (len(rows), K, 7, 6)
        assert relative_error(out.heatmaps, ref[rows]) < 1e-10
        assert relative_error(net.gradients(x, samples=rows), grads[rows]) < 1e-10


def test_random_per_sample_mask_follows_the_sample():
    """timm's drop_path in training: `x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep)` then an in-place
    `div_`: one random keep-bit per sample, saved per sample (the same seed makes the reference's mask)."""
    def drop_path(s, y):
        keep = y.new_empty((y.shape[0],) + (1,) * (y.ndim - 1)).bernoulli_(0.5)
        keep.div_(0.5)
        return y * keep

    model, _ = body_model(drop_path)
    x = torch.randn(6, 3, 7, 6, dtype=torch.double)
    net = unroll.compile(model)
    for rows in (None, [4], [5, 0, 2]):
        torch.manual_seed(7)
        grads, _ = autograd_gradients(model, x)
        ref = (grads * x.unsqueeze(1)).sum(2)
        torch.manual_seed(7)
        out = net(x, samples=rows)
        assert relative_error(out.heatmaps, ref if rows is None else ref[rows]) < 1e-10
    torch.manual_seed(7)
    bits = model.body.fn(model.body, torch.ones(6, 1, 1, 1, dtype=torch.double))
    assert 0 < int((bits == 0).sum()) < 6  # the mask really differs between samples


@pytest.mark.parametrize("fn, culprit", [
    (lambda s, y: y * torch.ones((y.shape[-4], C, 1, 1)), "ones"),  # a negative index: the batch dim or not
    (lambda s, y: y * torch.ones((y.size(0) * 1, C, 1, 1)), "ones"),  # arithmetic on the batch size
    (lambda s, y: y * s.table[1:y.size(0) + 1], "getitem"),  # a slice whose end is arithmetic on the batch size
    (lambda s, y: y * s.w.repeat(y.size(0), 1, 1, 1), "repeat"),  # repeat: B rows only if w has one
], ids=["negative_index", "arithmetic", "slice_of_a_table", "repeat"])
def test_undecidable_batchness_is_refused_naming_the_node(fn, culprit):
    model, _ = body_model(fn, w=nn.Parameter(torch.rand(1, C, 1, 1, dtype=torch.double)),
                          table=nn.Parameter(torch.rand(8, C, 1, 1, dtype=torch.double)))
    with pytest.raises(unroll.UnsupportedModelError, match="cannot tell") as error:
        unroll.compile(model)
    message = str(error.value)
    assert f"node '{culprit}" in message and "test_batchness.py" in message  # the node and its source line


def test_undecided_value_the_decoder_never_reads_compiles():
    """A class token repeated to the batch size and concatenated (ViT's pattern) never meets a cotangent: no
    reason to refuse it."""
    def with_token(s, y):
        return torch.cat([s.w.repeat(y.size(0), 1, 7, 6), y], 1)

    model, x = body_model(with_token, c_out=C + 1, w=nn.Parameter(torch.rand(1, 1, 1, 1, dtype=torch.double)))
    assert_matches_autograd(model, x)


def test_constant_operand_pairing_with_samples_is_refused_when_it_runs():
    """A parameter whose first dim happens to be the batch size broadcasts row by row against the samples, yet
    was built from neither: samples= could not subset it. A clear error instead of B rows for one sample."""
    model, _ = body_model(lambda s, y: y * s.w, w=nn.Parameter(torch.rand(3, C, 1, 1, dtype=torch.double)))
    net = unroll.compile(model)
    with pytest.raises(RuntimeError, match="not built from the input or its batch size"):
        net(torch.randn(3, 3, 7, 6, dtype=torch.double))


@pytest.mark.parametrize("fn", [
    lambda s, y: y * y.new_ones(C, 1, 1) * 2.0,
    lambda s, y: y * (y.new_zeros(1, C, 1, 1) + 0.5),
    lambda s, y: y * torch.ones_like(s.w),
], ids=["new_ones_no_batch", "new_zeros_size_1", "ones_like_constant"])
def test_factories_without_the_batch_size_are_constants(fn):
    """new_* / *_like carry no gradient (they were "no unroll rule" errors), and without the batch size they are
    constants: a (C, 1, 1) operand lines up with the feature dims."""
    model, x = body_model(fn, w=nn.Parameter(torch.rand(1, C, 1, 1, dtype=torch.double)))
    net = assert_matches_autograd(model, x)
    torch.testing.assert_close(net(x, samples=[1]).heatmaps, net(x).heatmaps[[1]], rtol=1e-12, atol=1e-12)


def pad_same(y, k=3, stride=2):
    """timm's pad_same: 'same' padding amounts computed from the map's size, with Python's math."""
    ih, iw = y.size()[-2:]
    pad_h = max((math.ceil(ih / stride) - 1) * stride + k - ih, 0)
    pad_w = max((math.ceil(iw / stride) - 1) * stride + k - iw, 0)
    return F.pad(y, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


@pytest.mark.parametrize("fn", [
    lambda s, y: pad_same(y),
    lambda s, y: y * y.size(-3) ** -0.5,  # attention's scale from a negative index
    lambda s, y: y * (1.0 / math.sqrt(y.shape[-1] * y.shape[-2])),
    lambda s, y: y * (2.0 / math.sqrt(y.size(0))),  # a number computed from the batch size
    lambda s, y: F.pad(y, (0, y.size(0) - 1)),  # padded by the batch size
], ids=["pad_same", "pow", "math.sqrt", "number_of_the_batch_size", "pad_by_the_batch_size"])
def test_numbers_from_shapes_are_not_tensors(fn):
    """Python numbers computed from shapes (math.ceil, **, math.sqrt of sizes) have no batch dim, whatever sizes
    they read: they were undecided (math.ceil and ** were taken for tensor ops), so timm's tf_efficientnet
    (pad_same) was refused ("cannot unroll node 'pad_4'")."""
    model, _ = body_model(fn)
    x = torch.randn(3, 3, 7, 6, dtype=torch.double)
    net = assert_matches_autograd(model, x, unroll.compile(model, example=x))  # (max() branches on the shape)
    full = net(x).heatmaps
    assert relative_error(net(x, samples=[2, 0]).heatmaps, full[[2, 0]]) < 1e-12


def test_timm_drop_path_in_training():
    """timm's DropPath (stochastic depth) in train mode: one keep-bit per sample (it was "no unroll rule
    (new_empty)")."""
    layers = pytest.importorskip("timm.layers")
    from test_rules import Net
    from conftest import randomize

    model = randomize(Net(layers.DropPath(0.5))).train()
    net = unroll.compile(model)
    x = torch.randn(6, 3, 7, 6, dtype=torch.double)
    for rows in (None, [4], [5, 0, 2]):
        torch.manual_seed(3)
        grads, _ = autograd_gradients(model, x)
        ref = (grads * x.unsqueeze(1)).sum(2)
        torch.manual_seed(3)
        assert relative_error(net(x, samples=rows).heatmaps, ref if rows is None else ref[rows]) < 1e-10
