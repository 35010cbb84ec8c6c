"""One small model per rule, each checked against autograd in float64 (heatmaps, input gradients, and the
parameter gradients of a heatmap loss against double backprop). Adding an op = one rule + one case here."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unroll
from unroll.verify import autograd_gradients, relative_error

from conftest import randomize

K = 3


class Net(nn.Module):
    """conv -> body(op under test) -> global average pool -> linear: a classifier around one op."""

    def __init__(self, body, c_in=3, c=6, dims=2, head_in=None):
        super().__init__()
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        self.conv = conv(c_in, c, 3, padding=1)
        self.body = body
        self.fc = nn.Linear(head_in or c, K)

    def forward(self, x):
        y = self.body(F.relu(self.conv(x)))
        return self.fc(y.flatten(2).mean(2))


class Lambda(nn.Module):
    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for k, m in modules.items():
            setattr(self, k, m)

    def forward(self, x):
        return self.fn(self, x)


def chunk_cat(self, x):
    a, b = x.chunk(2, dim=1)
    return torch.cat([F.relu(b), a], dim=1)


def shuffle(self, x):
    b, c, h, w = x.size()
    x = x.view(b, 2, c // 2, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


def slicing(self, x):
    return x[:, 1:5, 1:-1, ::2]


def unused_part(self, x):
    a, _ = torch.split(x, [2, 4], dim=1)
    return a * 2.0


def unbind_add(self, x):
    b, c, h, w = x.shape
    u, v = x.reshape(b, 2, c // 2, h, w).unbind(1)
    return u - v


def permutes(self, x):
    return x.permute(0, 2, 3, 1).relu().permute(0, 3, 1, 2)


def broadcast(self, x):
    return x + x.mean(1, keepdim=True) - 0.5 * x[:, :1]


def constants(self, x):
    return -(x * self.scale) / 3.0 + self.scale


def flatten_unflatten(self, x):
    return torch.flatten(x, 1).view(x.shape[0], x.shape[1], -1)  # (B, C, H*W): a 1-d "spatial" map


CASES = {
    "conv_stride2_odd": (nn.Conv2d(6, 6, 3, stride=2, padding=1), 2),
    "conv_same_even_kernel": (nn.Conv2d(6, 6, 4, padding="same"), 2),
    "conv_dilated_strided": (nn.Conv2d(6, 6, 3, stride=3, dilation=2, padding=2), 2),
    "conv_depthwise": (nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), 2),
    "conv_grouped_valid": (nn.Conv2d(6, 6, 2, groups=2, padding="valid"), 2),
    "conv1d": (nn.Conv1d(6, 6, 5, stride=2, padding=2), 1),
    "maxpool_overlap_ceil": (nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True), 2),
    "maxpool_functional": (Lambda(lambda s, x: F.max_pool2d(x, 2)), 2),
    "maxpool1d": (nn.MaxPool1d(3, 2, 1), 1),
    "adaptive_maxpool": (nn.AdaptiveMaxPool2d((3, 2)), 2),
    "avgpool_ceil_no_pad_count": (nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False), 2),
    "avgpool_divisor": (nn.AvgPool2d(2, divisor_override=3), 2),
    "adaptive_avgpool_up_and_down": (nn.AdaptiveAvgPool2d((5, 11)), 2),
    "adaptive_avgpool1d": (nn.AdaptiveAvgPool1d(4), 1),
    "mean_keepdim": (Lambda(lambda s, x: x.mean((-1,), keepdim=True) * x), None),  # product with an active: error
    "leaky_relu": (nn.LeakyReLU(0.1), 2),
    "relu6": (nn.Sequential(nn.Conv2d(6, 6, 1), nn.ReLU6()), 2),
    "hardtanh": (nn.Sequential(nn.Conv2d(6, 6, 1), nn.Hardtanh(-0.5, 0.7)), 2),
    "batchnorm_eval": (nn.BatchNorm2d(6), 2),
    "chunk_cat": (Lambda(chunk_cat), 2),
    "channel_shuffle": (Lambda(shuffle), 2),
    "slicing": (Lambda(slicing), 2),
    "unused_split_part": (Lambda(unused_part), 2),
    "unbind": (Lambda(unbind_add), 2),
    "permute": (Lambda(permutes), 2),
    "broadcast_add_sub": (Lambda(broadcast), 2),
    "constants": (Lambda(constants, scale=nn.Parameter(torch.rand(1, 6, 1, 1) + 0.5)), 2),
    "flatten_view": (Lambda(flatten_unflatten), 2),
    "identity_dropout_eval": (nn.Sequential(nn.Identity(), nn.Dropout(0.3)), 2),
}


def case_model(name):
    body, dims = CASES[name]
    c_out = {"slicing": 4, "unused_split_part": 2, "unbind": 3}.get(name)
    model = randomize(Net(body, dims=dims, head_in=c_out))
    shape = (2, 3, 23) if dims == 1 else (2, 3, 13, 11)
    return model, torch.randn(*shape, dtype=torch.double)


def assert_matches_autograd(model, x, net=None):
    """Heatmaps, input gradients and heatmap-loss parameter gradients of the compiled model equal autograd's."""
    net = net or unroll.compile(model)
    out = net(x)
    ref_grads, _ = autograd_gradients(model, x, create_graph=True)
    ref_heat = (ref_grads * x.unsqueeze(1)).sum(2)
    assert ref_heat.abs().max() > 0
    assert relative_error(out.heatmaps, ref_heat) < 1e-10
    assert relative_error(net.gradients(x), ref_grads) < 1e-10
    # parameter gradients of a heatmap loss: decoder backprop == double backprop
    w = torch.randn_like(ref_heat)
    params = list(model.parameters())
    ref = torch.autograd.grad((ref_heat * w).sum() + ref_heat.square().sum(), params, allow_unused=True)
    ours = torch.autograd.grad((out.heatmaps * w).sum() + out.heatmaps.square().sum(), params, allow_unused=True)
    for r, o in zip(ref, ours):
        if r is None or r.abs().max() == 0:
            assert o is None or o.abs().max() < 1e-12
        else:
            assert relative_error(o, r) < 1e-9
    return net


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][1] is not None])
def test_rule_matches_autograd(name):
    assert_matches_autograd(*case_model(name))


def test_product_of_two_input_dependent_tensors_is_refused():
    model, _ = case_model("mean_keepdim")
    with pytest.raises(unroll.UnsupportedModelError, match="product of two input-dependent"):
        unroll.compile(model)


def test_batchnorm_train_mode_holds_batch_statistics_constant():
    """In train mode the decoder uses this batch's variance as a constant (documented): the reference is autograd
    through a BN whose statistics are detached."""
    model, x = case_model("batchnorm_eval")
    model.train()
    bn = model.body
    net = unroll.compile(model)
    heat = net(x).heatmaps

    def frozen_stats_forward(inp):
        z = F.relu(model.conv(inp))
        mean = z.mean((0, 2, 3), keepdim=True).detach()
        var = z.var((0, 2, 3), unbiased=False, keepdim=True).detach()
        y = (z - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        return model.fc(y.flatten(2).mean(2))

    xr = x.clone().requires_grad_()
    logits = frozen_stats_forward(xr)
    ref = torch.stack([(torch.autograd.grad(logits[:, k].sum(), xr, retain_graph=True)[0] * x).sum(1)
                       for k in range(K)], 1)
    assert relative_error(heat, ref) < 1e-10
    # and the full autograd gradient (through the batch statistics) is genuinely different
    full = torch.stack([(torch.autograd.grad(model(xr)[:, k].sum(), xr)[0] * x).sum(1) for k in range(K)], 1)
    assert relative_error(heat, full) > 1e-6


def test_dropout_in_train_mode_reuses_the_forward_mask():
    model = randomize(Net(nn.Dropout(0.4)))
    model.train()
    net = unroll.compile(model)
    x = torch.randn(2, 3, 9, 7, dtype=torch.double)
    logits, saved = net.encode(x)
    names = [n.name for n in net.decoder.graph.nodes if n.op == "placeholder"][1:]  # after the seed
    mask = saved[next(i for i, n in enumerate(names) if n.startswith("mask_"))]
    assert mask.dtype == torch.bool and 0.3 < mask.double().mean() < 0.9

    def masked_forward(inp):
        y = F.relu(model.conv(inp)) * mask / 0.6
        return model.fc(y.flatten(2).mean(2))

    torch.testing.assert_close(logits, masked_forward(x), rtol=1e-12, atol=1e-12)
    xr = x.clone().requires_grad_()
    out = masked_forward(xr)
    ref = torch.stack([(torch.autograd.grad(out[:, k].sum(), xr, retain_graph=True)[0] * x).sum(1) for k in range(K)], 1)
    assert relative_error(net.decode(logits, saved), ref) < 1e-10
    model.eval()  # .eval() on the model reaches the compiled module: dropout becomes the identity
    assert net.encode(x)[1][next(i for i, n in enumerate(names) if n.startswith("mask_"))] is None


def test_decoder_code_is_readable():
    model, _ = case_model("maxpool_overlap_ceil")
    code = unroll.compile(model).decoder.code
    for word in ("conv_transpose", "unpool", "gate_", "skip_multiply", "grad_"):
        assert word in code


# ------------------------------------------------------------------ regressions (issue 14: silent wrong answers)


def body_model(fn, c_out=None, dims=2, **modules):
    model = randomize(Net(Lambda(fn, **modules), dims=dims, head_in=c_out))
    shape = (2, 3, 23) if dims == 1 else (2, 3, 7, 6)
    return model, torch.randn(*shape, dtype=torch.double)


def res2net_split(self, x):
    """timm's Bottle2neck: parts by index, the last one (spx[-1]) passed through unchanged."""
    spx = torch.split(x, 2, 1)
    out = [F.relu(spx[0])]
    sp = out[-1] + spx[1]
    out.append(F.relu(sp))
    out.append(spx[-1])
    return torch.cat(out, 1)


@pytest.mark.parametrize("fn", [
    res2net_split,
    lambda s, x: x.chunk(2, 1)[-1] * 2.0,  # only through [-1]: raised StopIteration
    lambda s, x: x.chunk(3, dim=-3)[0] + x.chunk(3, dim=-3)[-3] + x.chunk(3, -3)[-1],  # -3 and 0 are one part
    lambda s, x: torch.stack([x.unbind(-1)[-1], x.unbind(-1)[0], x.unbind(-1)[-1]], -1),
], ids=["res2net", "only_minus_one", "same_part_twice", "unbind_negative"])
def test_negative_part_indices(fn):
    """parts[-1] of a split was dropped (timm res2net 60-100% off)."""
    model, x = body_model(fn)
    with torch.no_grad():
        c_out = F.relu(model.conv(x))
        c_out = model.body(c_out).shape[1]
    model.fc = nn.Linear(c_out, K).double()
    assert_matches_autograd(model, x)


@pytest.mark.parametrize("fn", [
    lambda s, x: torch.add(x, x[:, :1], alpha=2),
    lambda s, x: torch.sub(x, x[:, 1:2], alpha=0.5),
    lambda s, x: x.sub(x[:, :1] * 3.0, alpha=3),
    lambda s, x: x.add(x[:, 2:3], alpha=-1.5),
], ids=["torch.add", "torch.sub", "Tensor.sub", "Tensor.add"])
def test_add_sub_alpha(fn):
    """alpha was ignored (33-100% off)."""
    assert_matches_autograd(*body_model(fn))


def masked(self, x):
    return x * (x > 0.1).float() + x[:, :1] * (x[:, 1:2] < 0.3).to(x.dtype)


@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_batch_shaped_mask_operand(batch):
    """A mask computed from the input has the batch dim; it was broadcast against the class dim (61% off, silent
    when B == K or B == 1) and samples= did not subset it."""
    model, _ = body_model(masked)
    x = torch.randn(batch, 3, 7, 6, dtype=torch.double)
    net = assert_matches_autograd(model, x)
    if batch > 1:
        rows = torch.tensor([batch - 1, 0])
        torch.testing.assert_close(net(x, samples=rows).heatmaps, net(x).heatmaps[rows], rtol=1e-12, atol=1e-12)


def test_operand_without_the_batch_dim_in_front_is_refused():
    model, _ = body_model(lambda s, x: x * (x[:, 0] > 0).float())  # (B, H, W) against (B, C, H, W)
    net = unroll.compile(model)
    with pytest.raises(RuntimeError, match="first dim is not the batch"):
        net(torch.randn(1, 3, 7, 6, dtype=torch.double))


@pytest.mark.parametrize("fn", [
    lambda s, x: x[:, [0, 0, 1]],
    lambda s, x: x[:, [2, 0, 2], 1:4],
    lambda s, x: x[:, :, [1, 1, 1, 0]][:, [3, 3]],
], ids=["repeat", "repeat_then_slice", "twice"])
def test_advanced_index_repeats_accumulate(fn):
    """y[:, [0, 0, 1]] was written back by assignment (70% off)."""
    model, x = body_model(fn)
    with torch.no_grad():
        c_out = model.body(F.relu(model.conv(x))).shape[1]
    model.fc = nn.Linear(c_out, K).double()
    assert_matches_autograd(model, x)


class EndsWith(nn.Module):
    def __init__(self, last):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2 * K)
        self.last = last

    def forward(self, x):
        y = self.fc(F.relu(self.conv(x)).mean((2, 3)))
        if isinstance(self.last, nn.Module):
            return self.last(y)
        return self.last(y)


@pytest.mark.parametrize("last", [
    nn.Dropout(0.3), lambda y: F.max_pool1d(y, 2), nn.MaxPool1d(2), lambda y: F.dropout(y, 0.2, False)[:, :K],
], ids=["Dropout", "F.max_pool1d", "MaxPool1d", "F.dropout"])
def test_model_ending_in_a_rewritten_op(last):
    """The node rewrite erased the output node's argument: NameError on the first call."""
    model = randomize(EndsWith(last))
    if isinstance(last, nn.Dropout):
        model.fc = nn.Linear(4, K).double()
    x = torch.randn(2, 3, 5, 4, dtype=torch.double)
    assert_matches_autograd(model, x)


# ------------------------------------------------------------------ F.batch_norm (timm's BatchNormAct2d)


class FunctionalBN(nn.Module):
    def __init__(self, training, keywords, affine=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6, affine=affine)
        self.fc = nn.Linear(6, K)
        self.training_arg, self.keywords = training, keywords

    def forward(self, x):
        z, bn = self.conv(x), self.bn
        if self.keywords:
            y = F.batch_norm(z, running_mean=bn.running_mean, running_var=bn.running_var, weight=bn.weight,
                             bias=bn.bias, training=self.training_arg, momentum=0.0, eps=1e-3)
        else:
            y = F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, self.training_arg, 0.0, 1e-3)
        return self.fc(F.relu(y).mean((2, 3)))


@pytest.mark.parametrize("keywords", [False, True], ids=["positional", "keywords"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_functional_batch_norm_eval(keywords, affine):
    model = randomize(FunctionalBN(False, keywords, affine))
    assert_matches_autograd(model, torch.randn(2, 3, 6, 5, dtype=torch.double))


@pytest.mark.parametrize("keywords", [False, True], ids=["positional", "keywords"])
def test_functional_batch_norm_training_holds_batch_variance_like_the_module_rule(keywords):
    """training=True: the same semantics as the module rule in train mode (batch variance held constant)."""
    model = randomize(FunctionalBN(True, keywords))
    module_model = randomize(FunctionalBN(True, keywords))
    module_model.forward = lambda x: module_model.fc(F.relu(module_model.bn(module_model.conv(x))).mean((2, 3)))

    class ModuleBN(nn.Module):  # the same weights through nn.BatchNorm2d in train mode
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = model.conv, nn.BatchNorm2d(6, eps=1e-3, momentum=0.0).double(), model.fc
            self.bn.load_state_dict(model.bn.state_dict())

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))

    x = torch.randn(3, 3, 6, 5, dtype=torch.double)
    ref = ModuleBN().train()
    ours = unroll.compile(model)(x).heatmaps
    theirs = unroll.compile(ref)(x).heatmaps
    assert relative_error(ours, theirs) < 1e-12
    assert ours.abs().max() > 0


@pytest.mark.parametrize("body", [nn.Dropout2d(0.5), Lambda(lambda s, y: F.dropout2d(y, 0.5, training=True))],
                         ids=["module", "functional"])
def test_channel_dropout_in_train_mode_reuses_the_forward_mask(body):
    """Dropout2d drops whole channels: the decoder's mask is the forward's, one bit per (sample, channel)."""
    model = randomize(Net(body))
    model.train()
    net = unroll.compile(model)
    x = torch.randn(3, 3, 5, 4, dtype=torch.double)
    logits, saved = net.encode(x)
    mask = next(s for s in saved if isinstance(s, torch.Tensor) and s.dtype == torch.bool and s.shape[2:] == (1, 1))
    assert mask.shape == (3, 6, 1, 1)

    def masked_forward(inp):
        return model.fc((F.relu(model.conv(inp)) * mask / 0.5).flatten(2).mean(2))

    torch.testing.assert_close(logits, masked_forward(x), rtol=1e-12, atol=1e-12)
    xr = x.clone().requires_grad_()
    out = masked_forward(xr)
    ref = torch.stack([(torch.autograd.grad(out[:, k].sum(), xr, retain_graph=True)[0] * x).sum(1) for k in range(K)], 1)
    assert relative_error(net.decode(logits, saved), ref) < 1e-10


def test_a_weight_computed_from_the_input_is_refused():
    def dynamic(s, y):
        return F.conv2d(y, s.w * (y.mean() > 0).to(y.dtype), padding=1)

    model, _ = body_model(dynamic, w=nn.Parameter(torch.randn(6, 6, 3, 3, dtype=torch.double)))
    with pytest.raises(unroll.UnsupportedModelError, match="computed from the input"):
        unroll.compile(model)


class ClampedInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, K)

    def forward(self, x):
        return self.fc(F.relu(self.conv(torch.clamp(x, 0.0, 1.0))).mean((2, 3)))


def test_clamp_gate_on_the_bounds_is_autograds():
    """Pixels exactly on a clamp bound (0 and 1 in images): autograd's gradient there is 0, so is the gate's."""
    model = randomize(ClampedInput())
    x = torch.rand(2, 3, 6, 5, dtype=torch.double) * 1.4 - 0.2
    x[:, :, :2] = 1.0
    x[:, :, -1] = 0.0
    assert_matches_autograd(model, x)


@pytest.mark.parametrize("fn", [
    lambda s, x: x.transpose(0, 1).relu().transpose(1, 0),
    lambda s, x: torch.swapaxes(x, -4, 1).relu().swapaxes(1, 0),
    lambda s, x: x.flip(0),
    lambda s, x: x.mean(0, keepdim=True).expand_as(x) + x,
], ids=["transpose", "swapaxes_negative", "flip", "mean"])
def test_ops_along_the_batch_dim_are_refused(fn):
    """An op along the batch dim mixes samples: a clear error when the decoder runs, never a silent answer."""
    model, x = body_model(fn)
    with pytest.raises(RuntimeError, match="batch"):
        unroll.compile(model)(torch.randn(3, 3, 7, 6, dtype=torch.double))


def test_one_constant_used_twice_compiles():
    """A computed constant used by two ops is saved twice under one name (`const_mul`): the decoder's argument
    names must stay unique (it was a SyntaxError)."""
    def twice(s, y):
        c = s.w * 2.0
        return y * c + (y * 3.0) * c

    assert_matches_autograd(*body_model(twice, w=nn.Parameter(torch.rand(1, 6, 1, 1, dtype=torch.double))))


class InPlaceFirst(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.conv, self.fc = fn, nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, K)

    def forward(self, x):
        return self.fc(F.relu(self.conv(self.fn(x))).mean((2, 3)))


@pytest.mark.parametrize("fn", [
    lambda x: F.leaky_relu_(x, 0.1),  # a torch function named like an in-place op (torch._C._nn.leaky_relu_)
    lambda x: F.leaky_relu(x, 0.1, True),  # (fx records the functional's arguments by keyword)
    lambda x: x.mul_(2.0),
], ids=["leaky_relu_", "leaky_relu_inplace", "mul_"])
def test_an_input_modified_in_place_is_cloned_for_the_skip_multiply(fn):
    """The heatmap multiplies the gradient by the input as given: an op modifying the input in place must not
    change it. `F.leaky_relu_(x, s)` was missed (8% off: the skip multiply saw s x where x < 0)."""
    model = randomize(InPlaceFirst(fn))
    reference = randomize(InPlaceFirst(lambda x: fn(x * 1.0)))  # (autograd refuses in-place ops on a leaf)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 6, 5, dtype=torch.double)
    grads, _ = autograd_gradients(reference, x)
    out = unroll.compile(model)(x.clone())
    assert relative_error(out.heatmaps, (grads * x.unsqueeze(1)).sum(2)) < 1e-10
