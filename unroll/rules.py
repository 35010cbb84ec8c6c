"""One rule per operation: how the cotangent q of an op's output becomes the cotangent of its inputs.

A rule gets a `Step` (see `unroll.compiler`): `r.q` is the cotangent of the node's output, shaped (B, K, ...);
`r.x` the node's main input; `r.save(...)` records something from the encoder's forward pass (a gate, pool
indices) and returns it inside the decoder; `r.param(...)` reads a weight of the model itself (tied, never
copied). A rule returns the cotangent of `r.x`, or a list of (input node, cotangent) pairs.

Adding an op = one `@rule(...)` function here and one test in tests/test_rules.py.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

from . import ops

RULES: dict[object, Callable] = {}
LAYERS: set[object] = set()  # ops whose output is a layer output z for LRP-epsilon (conv, linear, batch norm)
ACTIVATIONS: dict[object, Callable] = {}  # op -> its out-of-place function of (step, z), for LRP-epsilon
NON_DIFFERENTIABLE: set[object] = {"size", "dim", "numel", "type", "__eq__", "__ne__", operator.eq, operator.ne,
                                   operator.gt, operator.lt, operator.ge, operator.le, torch.argmax, "argmax"}


def rule(*ops_: object, activation: Callable | None = None, layer: bool = False):
    """Register a rule for ops spelled as module classes, functions, or Tensor method names (strings).

    `activation=f(step, z)` marks an elementwise activation (its out-of-place function, for LRP-epsilon);
    `layer=True` marks a linear layer whose output is where LRP-epsilon stabilises.
    """

    def register(fn):
        for op in ops_:
            RULES[op] = fn
            if activation is not None:
                ACTIVATIONS[op] = activation
            if layer:
                LAYERS.add(op)
        return fn

    return register


def _find(table, target, module):
    if module is not None:  # a module: its class or the nearest registered base class
        return next((table[c] for c in type(module).__mro__ if c in table), None)
    try:
        return table.get(target)
    except TypeError:  # unhashable target
        return None


def lookup(target: object, module: nn.Module | None = None, overrides: dict | None = None):
    """The rule for a node: by module class (walking its bases) or by function / method name."""
    return _find(overrides or {}, target, module) or _find(RULES, target, module)


def activation_fn(target: object, module: nn.Module | None = None):
    return _find(ACTIVATIONS, target, module)


def is_layer(target: object, module: nn.Module | None = None) -> bool:
    if module is not None:
        return any(c in LAYERS for c in type(module).__mro__)
    return target in LAYERS


# ------------------------------------------------------------------ linear layers (weights tied)


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, layer=True)
def conv_module(r):
    """z = conv(a, W) + b  ->  q_a = conv_transpose(q_z, W): the same weight tensor, stride, padding, groups."""
    m = r.module
    if m.padding_mode != "zeros":
        r.unsupported(f"padding_mode={m.padding_mode!r} (only zero padding is a plain linear map here)")
    return ops.conv_transpose(r.q, r.param("weight"), m.stride, m.padding, m.dilation, m.groups, r.shape(r.x))


@rule(F.conv1d, F.conv2d, F.conv3d, layer=True)
def conv_function(r):
    nd = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[r.node.target]
    tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd  # noqa: E731
    weight = r.param(r.arg(1, "weight"))
    stride, dilation = tup(r.arg(3, "stride", 1)), tup(r.arg(5, "dilation", 1))
    padding = r.arg(4, "padding", 0)
    padding = padding if isinstance(padding, str) else tup(padding)
    return ops.conv_transpose(r.q, weight, stride, padding, dilation, r.arg(6, "groups", 1), r.shape(r.x))


@rule(nn.Linear, layer=True)
def linear_module(r):
    """z = a W^T + b  ->  q_a = q_z W. For the classifier's last layer this is the per-class 1x1 bottleneck."""
    return r.q @ r.param("weight")


@rule(F.linear, layer=True)
def linear_function(r):
    return r.q @ r.param(r.arg(1, "weight"))


@rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, layer=True)
def batch_norm(r):
    """y = (z - mean) * gamma / sqrt(var + eps) + beta  ->  q_z = q_y * gamma / sqrt(var + eps), per channel."""
    scale = r.save(ops.batch_norm_scale, r.x, r.module_ref(), name="bn_scale", batched=False)
    return ops.channel_scale(r.q, scale)


# ------------------------------------------------------------------ activations: tied gates


def _relu_act(r, z):
    return F.relu(z)


@rule(nn.ReLU, F.relu, torch.relu, torch.relu_, "relu", "relu_", activation=_relu_act)
def relu(r):
    """a = relu(z)  ->  q_z = q_a * [z > 0], the Heaviside gate saved as bool (read off a: a > 0 iff z > 0)."""
    gate = r.save(operator.gt, r.node, 0, name="gate", after=True)
    return r.q * gate.unsqueeze(1)


def _leaky_slope(r):
    return r.module.negative_slope if r.module is not None else r.arg(1, "negative_slope", 0.01)


def _leaky_act(r, z):
    return F.leaky_relu(z, _leaky_slope(r))


@rule(nn.LeakyReLU, F.leaky_relu, F.leaky_relu_, "leaky_relu", activation=_leaky_act)
def leaky_relu(r):
    """a = max(z, s z)  ->  q_z = q_a * (1 if z > 0 else s)."""
    slope = _leaky_slope(r)
    if slope < 0:
        r.unsupported("a negative slope (the gate could not be read off the output)")
    gate = r.save(operator.gt, r.node, 0, name="gate", after=True).unsqueeze(1)
    return torch.where(gate, r.q, r.q * slope)


def _hardtanh_range(r):
    m = r.module
    if m is not None:
        return m.min_val, m.max_val
    if r.node.target in (F.relu6, "relu6"):
        return 0.0, 6.0
    return r.arg(1, "min_val", -1.0), r.arg(2, "max_val", 1.0)


def _hardtanh_act(r, z):
    lo, hi = _hardtanh_range(r)
    return F.hardtanh(z, lo, hi)


@rule(nn.Hardtanh, nn.ReLU6, F.hardtanh, F.hardtanh_, F.relu6, activation=_hardtanh_act)
def hardtanh(r):
    """a = clamp(z, lo, hi)  ->  q_z = q_a * [lo < z < hi] (read off a: clamped values sit exactly on a bound)."""
    lo, hi = _hardtanh_range(r)
    gate = r.save(ops.inside, r.node, lo, hi, name="gate", after=True)
    return r.q * gate.unsqueeze(1)


# ------------------------------------------------------------------ pooling


def _pool_args(r, names_defaults):
    if r.module is not None:
        return {n: getattr(r.module, n) for n, _ in names_defaults}
    return {n: r.arg(i + 1, n, d) for i, (n, d) in enumerate(names_defaults)}


def _spatial_dims(r) -> int:
    name = type(r.module).__name__ if r.module is not None else r.node.target.__name__
    return int(name.rstrip("d")[-1])  # MaxPool2d / max_pool2d / AdaptiveMaxPool1d -> 2 / 2 / 1


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_MAX_POOL_ARGS = [("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False)]


@rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d)
def max_pool(r):
    """p = maxpool(a)  ->  q_a = q_p scattered to the encoder's argmax indices (overlapping windows add up)."""
    kw = _pool_args(r, _MAX_POOL_ARGS)
    if r.module is not None and r.module.return_indices or r.arg(6, "return_indices", False) and r.module is None:
        r.unsupported("max pooling that already returns indices")
    indices = r.rewrite_with_indices(_MAX_POOL[_spatial_dims(r)], r.x, **kw)
    return ops.unpool(r.q, indices, r.shape(r.x))


_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


@rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d)
def adaptive_max_pool(r):
    """Adaptive max pooling: the same unpooling with the encoder's indices."""
    size = r.module.output_size if r.module is not None else r.arg(1, "output_size")
    indices = r.rewrite_with_indices(_ADAPTIVE_MAX[_spatial_dims(r)], r.x, output_size=size)
    return ops.unpool(r.q, indices, r.shape(r.x))


@rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
def adaptive_avg_pool(r):
    """g = adaptive_avg_pool(a)  ->  q_a = each window's q spread evenly (GAP: q / (H W) broadcast)."""
    return ops.adaptive_avg_pool_transpose(r.q, r.shape(r.x))


@rule(nn.AvgPool2d, F.avg_pool2d)
def avg_pool(r):
    """p = avg_pool(a)  ->  q_a = conv_transpose(q_p / window size, ones): the transposed box filter."""
    kw = _pool_args(r, [("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
                        ("count_include_pad", True), ("divisor_override", None)])
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    k = pair(kw["kernel_size"])
    s = pair(kw["stride"] or k)
    return ops.avg_pool_transpose(r.q, k, s, pair(kw["padding"]), kw["ceil_mode"], kw["count_include_pad"],
                                  kw["divisor_override"], r.shape(r.x))


@rule(torch.mean, "mean")
def mean(r):
    """m = mean(a, dims)  ->  q_a = q_m / count, broadcast back over dims."""
    dims = r.arg(1, "dim", None)
    if dims is None:
        r.unsupported("a mean over all dimensions, batch included")
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    return ops.mean_transpose(r.q, dims, r.arg(2, "keepdim", False), r.shape(r.x))


# ------------------------------------------------------------------ regularisers


@rule(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
def dropout_module(r):
    """Dropout: identity in eval; in train the decoder reuses the forward's own mask."""
    if type(r.module) is not nn.Dropout:
        r.unsupported("only elementwise nn.Dropout keeps its mask here; use nn.Dropout or eval mode")
    mask = r.rewrite_with_mask(ops.module_dropout, r.x, r.module_ref())
    return ops.dropout_back(r.q, mask, r.module.p)


@rule(F.dropout, "dropout")
def dropout_function(r):
    p, training = r.arg(1, "p", 0.5), r.arg(2, "training", True)
    mask = r.rewrite_with_mask(ops.dropout_mask, r.x, p, training)
    return ops.dropout_back(r.q, mask, p)


@rule(nn.Identity, "contiguous", "clone", torch.clone)
def identity(r):
    """Ops that move no values: the cotangent passes unchanged."""
    return r.q


# ------------------------------------------------------------------ fan-out and arithmetic with constants


def _sum_to_inputs(r, q, operands, signs):
    pairs = []
    for node, sign in zip(operands, signs):
        if r.active(node):
            pairs.append((node, ops.sum_to(q if sign > 0 else -q, r.shape(node))))
    return pairs


@rule(operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__")
def add(r):
    """s = u + v  ->  q_u = q_s, q_v = q_s: fan-out (summed over dims where u or v was broadcast)."""
    alpha = r.arg(2, "alpha", 1) if not isinstance(r.node.target, type(operator.add)) else 1
    if alpha != 1:
        r.unsupported("add with alpha")
    return _sum_to_inputs(r, r.q, r.node.args[:2], (1, 1))


@rule(operator.sub, operator.isub, torch.sub, "sub", "sub_")
def sub(r):
    """s = u - v  ->  q_u = q_s, q_v = -q_s."""
    return _sum_to_inputs(r, r.q, r.node.args[:2], (1, -1))


@rule(operator.neg, torch.neg, "neg")
def neg(r):
    return -r.q


@rule(operator.mul, operator.imul, torch.mul, "mul", "mul_")
def mul(r):
    """s = u * c with c not input-dependent  ->  q_u = q_s * c. (A product of two input-dependent tensors is
    attention-like gating, outside the piecewise-linear networks unroll compiles.)"""
    u, c = r.node.args[:2]
    if r.active(c):
        u, c = c, u
    if r.active(c):
        r.unsupported("a product of two input-dependent tensors (gating/attention)")
    return [(u, ops.sum_to(r.q * r.constant(c), r.shape(u)))]


@rule(operator.truediv, operator.itruediv, torch.div, "div", "div_")
def div(r):
    u, c = r.node.args[:2]
    if r.active(c) or len(r.node.args) > 2 or r.node.kwargs:
        r.unsupported("division by an input-dependent tensor, or with rounding_mode")
    return [(u, ops.sum_to(r.q / r.constant(c), r.shape(u)))]


# ------------------------------------------------------------------ shape ops: their inverses


@rule(torch.flatten, "flatten", "view", "reshape", torch.reshape, nn.Flatten, "view_as", "reshape_as")
def reshape(r):
    """A reshape moves no values: reshape q back to the input's shape."""
    return ops.reshape_back(r.q, r.shape(r.x), r.shape(r.node))


@rule(torch.transpose, "transpose", "transpose_")
def transpose(r):
    d0, d1 = r.arg(1, "dim0"), r.arg(2, "dim1")
    return r.q.transpose(*(d + 1 if d >= 0 else d for d in (d0, d1)))


@rule(torch.permute, "permute")
def permute(r):
    dims = r.node.args[1:] if r.node.op == "call_method" and not isinstance(r.node.args[1], (tuple, list)) \
        else r.arg(1, "dims")
    rank = len(dims)
    dims = [d % rank for d in dims]
    if dims[0] != 0:
        r.unsupported("a permutation that moves the batch dimension")
    inverse = [0] * rank
    for i, d in enumerate(dims):
        inverse[d] = i
    return r.q.permute(0, 1, *(d + 1 for d in inverse[1:]))


@rule(torch.cat, torch.concat, torch.concatenate)
def cat(r):
    """c = cat([u, v, ...], dim)  ->  q_u, q_v, ... = split(q_c) at the inputs' sizes."""
    parts, dim = r.arg(0, "tensors"), r.arg(1, "dim", 0)
    pieces = ops.split_back(r.q, [r.shape(p) for p in parts], dim)
    return [(p, pieces[i]) for i, p in enumerate(parts) if r.active(p)]


TUPLE_OPS = {torch.chunk, "chunk", torch.split, "split", torch.tensor_split, "tensor_split", torch.unbind, "unbind"}


@rule(*TUPLE_OPS)
def split(r):
    """[u_1, u_2, ...] = split(x, dim)  ->  q_x = cat(q_u_1, q_u_2, ...), zeros for the parts nobody used."""
    unbind = r.node.target in (torch.unbind, "unbind")
    dim = r.arg(1 if unbind else 2, "dim", 0)
    shapes = r.save(ops.part_shapes, r.node, name="part_shapes", batched=False, after=True)
    parts = [r.q.get(i) for i in range(max(r.q) + 1)]  # r.q: {index: cotangent} of the parts that were used
    return ops.join_parts(parts, shapes, dim, unbind)


@rule(operator.getitem)
def getitem(r):
    """x[index]: q goes back to where the slice came from. (Parts of a split are handled by the split's rule.)"""
    index = r.node.args[1]
    if any(isinstance(i, fx.Node) for i in (index if isinstance(index, tuple) else (index,))):
        r.unsupported("indexing with input-dependent or traced indices")
    return ops.slice_back(r.q, index, r.shape(r.x))
