"""One rule per operation: how the cotangent q of an op's output becomes the cotangent of its inputs.

A rule gets a `Step` (see `unroll.compiler`): `r.q` is the cotangent of the node's output, shaped (B, K, ...);
`r.x` the node's main input; `r.arg(name)` an argument by name, however it was passed (unroll.schema); `r.save(...)` records something from the encoder's forward pass (a gate, pool
indices) and returns it inside the decoder; `r.param(...)` reads a weight of the model itself (tied, never
copied). A rule returns the cotangent of `r.x`, or a list of (input node, cotangent) pairs.

Adding an op = one `@rule(...)` function here and one row in tests/test_spellings.py (every registered key must
have one).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.nn as nn
import torch.fx as fx
import torch.nn.functional as F

from . import ops
from .batchness import LIKE, NEW_FACTORIES

RULES: dict[object, Callable] = {}
LAYERS: set[object] = set()  # ops whose output is a layer output z for LRP-epsilon (conv, linear, batch norm)
ACTIVATIONS: dict[object, Callable] = {}  # op -> its out-of-place function of (step, z), for LRP-epsilon
NON_DIFFERENTIABLE: set[object] = {"size", "dim", "numel", "__eq__", "__ne__", operator.eq, operator.ne,
                                   operator.gt, operator.lt, operator.ge, operator.le, torch.argmax, "argmax",
                                   *LIKE, *NEW_FACTORIES}  # (factories read only shapes: torch.ones_like(y))


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


# ------------------------------------------------------------------ helpers


def _tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


_CONV_DIMS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3, F.conv_transpose1d: 1, F.conv_transpose2d: 2,
              F.conv_transpose3d: 3}


# ------------------------------------------------------------------ linear layers (weights tied)


@rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, layer=True)
def conv_module(r):
    """z = conv(a, W) + b  ->  q_a = conv_transpose(q_z, W): the same weight tensor, stride, padding, groups.
    padding_mode reflect / replicate / circular: the module pads first, then convolves without padding."""
    m = r.module
    if m.padding_mode == "zeros":
        return ops.conv_transpose(r.q, r.param("weight"), m.stride, m.padding, m.dilation, m.groups, r.shape(r.x))
    pad = list(m._reversed_padding_repeated_twice)  # what nn.ConvNd hands to F.pad
    padded = ops.padded_shape(r.shape(r.x), pad)
    q = ops.conv_transpose(r.q, r.param("weight"), m.stride, (0,) * len(m.stride), m.dilation, m.groups, padded)
    return ops.pad_transpose(q, pad, m.padding_mode, r.shape(r.x))


@rule(F.conv1d, F.conv2d, F.conv3d, layer=True)
def conv_function(r):
    nd = _CONV_DIMS[r.node.target]
    padding = r.arg("padding")
    padding = padding if isinstance(padding, str) else _tuple(padding, nd)
    return ops.conv_transpose(r.q, r.param(r.arg("weight")), _tuple(r.arg("stride"), nd), padding,
                              _tuple(r.arg("dilation"), nd), r.arg("groups"), r.shape(r.x))


@rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, layer=True)
def conv_transpose_module(r):
    """z = conv_transpose(a, W)  ->  q_a = conv(q_z, W): the adjoint of the adjoint, same weight and settings."""
    m = r.module
    return ops.conv_adjoint(r.q, r.param("weight"), m.stride, m.padding, m.dilation, m.groups)


@rule(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, layer=True)
def conv_transpose_function(r):
    nd = _CONV_DIMS[r.node.target]
    return ops.conv_adjoint(r.q, r.param(r.arg("weight")), _tuple(r.arg("stride"), nd),
                            _tuple(r.arg("padding"), nd), _tuple(r.arg("dilation"), nd), r.arg("groups"))


@rule(nn.Linear, layer=True)
def linear_module(r):
    """z = a W^T + b  ->  q_a = q_z W. For the classifier's last layer this is the per-class 1x1 bottleneck."""
    return r.q @ r.param("weight")


@rule(F.linear, layer=True)
def linear_function(r):
    return r.q @ r.param(r.arg("weight"))


@rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, layer=True)
def batch_norm(r):
    """y = (z - mean) * gamma / sqrt(var + eps) + beta  ->  q_z = q_y * gamma / sqrt(var + eps), per channel."""
    scale = r.save(ops.batch_norm_scale, r.x, r.module_ref(), name="bn_scale", batched=False)
    return ops.channel_scale(r.q, scale)


@rule(F.batch_norm, layer=True)
def batch_norm_function(r):
    """F.batch_norm (timm's BatchNormAct2d): the module rule's scale, from the call's own arguments. training=True
    uses this batch's variance held constant, as the module rule does in train mode."""
    if r.derived(r.arg("running_var")) or r.derived(r.arg("weight")):
        r.unsupported("batch-norm statistics or weight computed from the input")
    scale = r.save(ops.functional_batch_norm_scale, r.x, r.arg("running_var"), r.arg("weight"), r.arg("training"),
                   r.arg("eps"), name="bn_scale", batched=False)
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
    return r.module.negative_slope if r.module is not None else r.arg("negative_slope")


def _leaky_act(r, z):
    return F.leaky_relu(z, _leaky_slope(r))


@rule(nn.LeakyReLU, F.leaky_relu, F.leaky_relu_, activation=_leaky_act)
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
    if r.node.target is F.relu6:
        return 0.0, 6.0
    return r.arg("min_val"), r.arg("max_val")


def _hardtanh_act(r, z):
    lo, hi = _hardtanh_range(r)
    return F.hardtanh(z, lo, hi)


@rule(nn.Hardtanh, nn.ReLU6, F.hardtanh, F.hardtanh_, F.relu6, activation=_hardtanh_act)
def hardtanh(r):
    """a = clamp(z, lo, hi)  ->  q_z = q_a * [lo < z < hi] (read off a: clamped values sit exactly on a bound)."""
    lo, hi = _hardtanh_range(r)
    gate = r.save(ops.inside, r.node, lo, hi, name="gate", after=True)
    return r.q * gate.unsqueeze(1)


def _clamp_range(r):
    lo = r.kw.get("min") if r.kw else None
    hi = r.kw.get("max") if r.kw else None
    if isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
        r.unsupported("clamp bounds that are tensors")
    return lo, hi


def _clamp_act(r, z):
    return torch.clamp(z, *_clamp_range(r))


@rule(torch.clamp, "clamp", "clamp_", torch.clip, "clip", "clip_", torch.clamp_min, "clamp_min", "clamp_min_",
      torch.clamp_max, "clamp_max", "clamp_max_", activation=_clamp_act)
def clamp(r):
    """a = clamp(z, lo, hi)  ->  q_z = q_a * [lo < z < hi] (autograd's gradient is 0 on a bound), read off z
    before the op (which may work in place); a missing bound is no bound."""
    lo, hi = _clamp_range(r)
    gate = r.save(ops.clamp_gate, r.x, lo, hi, name="gate")
    return r.q * gate.unsqueeze(1)


def _threshold_act(r, z):
    th, value = (getattr(r.module, n) if r.module is not None else r.arg(n) for n in ("threshold", "value"))
    return F.threshold(z, th, value)


@rule(nn.Threshold, F.threshold, F.threshold_, activation=_threshold_act)
def threshold(r):
    """a = z if z > t else v  ->  q_z = q_a * [z > t], read off z before the op (a = v may itself exceed t)."""
    t = r.module.threshold if r.module is not None else r.arg("threshold")
    gate = r.save(operator.gt, r.x, t, name="gate")
    return r.q * gate.unsqueeze(1)


# ------------------------------------------------------------------ pooling


def _pool_args(r, names):
    source = (lambda n: getattr(r.module, n)) if r.module is not None else r.arg
    return {n: source(n) for n in names}


def _spatial_dims(r) -> int:
    name = type(r.module).__name__ if r.module is not None else r.node.target.__name__
    return int(name.rstrip("d")[-1])  # MaxPool2d / max_pool2d / AdaptiveMaxPool1d -> 2 / 2 / 1


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@rule(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d)
def max_pool(r):
    """p = maxpool(a)  ->  q_a = q_p scattered to the encoder's argmax indices (overlapping windows add up)."""
    kw = _pool_args(r, ["kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"])
    if kw.pop("return_indices"):
        r.unsupported("max pooling that already returns indices")
    nd = _spatial_dims(r)
    indices = r.rewrite_with_indices(_MAX_POOL[nd], r.x, **kw)
    return ops.unpool(r.q, indices, r.shape(r.x), nd)


_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


@rule(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d)
def adaptive_max_pool(r):
    """Adaptive max pooling: the same unpooling with the encoder's indices."""
    kw = _pool_args(r, ["output_size", "return_indices"])
    if kw["return_indices"]:
        r.unsupported("max pooling that already returns indices")
    nd = _spatial_dims(r)
    indices = r.rewrite_with_indices(_ADAPTIVE_MAX[nd], r.x, output_size=kw["output_size"])
    return ops.unpool(r.q, indices, r.shape(r.x), nd)


@rule(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)
def adaptive_avg_pool(r):
    """g = adaptive_avg_pool(a)  ->  q_a = each window's q spread evenly (GAP: q / (H W) broadcast)."""
    return ops.adaptive_avg_pool_transpose(r.q, r.shape(r.x))


@rule(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
def avg_pool(r):
    """p = avg_pool(a)  ->  q_a = conv_transpose(q_p / window size, ones): the transposed box filter."""
    nd = _spatial_dims(r)
    names = ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"]
    kw = _pool_args(r, names + ([] if nd == 1 else ["divisor_override"]))
    k = _tuple(kw["kernel_size"], nd)
    s = _tuple(kw["stride"] or k, nd)  # stride None / [] (the schema's default): the kernel size
    return ops.avg_pool_transpose(r.q, k, s, _tuple(kw["padding"], nd), kw["ceil_mode"], kw["count_include_pad"],
                                  kw.get("divisor_override"), r.shape(r.x))


def _reduce(r, divide: bool):
    dims = r.arg("dim")
    if dims is None or dims == () or dims == []:
        r.unsupported("a reduction over all dimensions, batch included")
    dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
    return ops.mean_transpose(r.q, dims, r.arg("keepdim"), r.shape(r.x), divide)


@rule(torch.mean, "mean")
def mean(r):
    """m = mean(a, dims)  ->  q_a = q_m / count, broadcast back over dims."""
    return _reduce(r, divide=True)


@rule(torch.sum, "sum")
def sum_(r):
    """s = sum(a, dims)  ->  q_a = q_s broadcast back over dims."""
    return _reduce(r, divide=False)


# ------------------------------------------------------------------ resampling and padding


def _interpolate_args(r) -> dict:
    if r.module is not None:
        m = r.module
        return dict(size=m.size, scale_factor=m.scale_factor, mode=m.mode, align_corners=m.align_corners,
                    recompute_scale_factor=m.recompute_scale_factor, antialias=False)
    return _pool_args(r, ["size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias"])


def _has_node(value) -> bool:
    return isinstance(value, fx.Node) or isinstance(value, (tuple, list)) and any(isinstance(v, fx.Node) for v in value)


@rule(nn.Upsample, F.interpolate)
def interpolate(r):
    """y = interpolate(x) is linear in x  ->  q_x = its adjoint (aten's upsample backward) applied to q_y."""
    kw = _interpolate_args(r)
    if kw["mode"] not in ops.interpolate_modes():
        r.unsupported(f"interpolation mode {kw['mode']!r}")
    # (a size computed in forward(), e.g. `size=x.shape[-2:]`, is fine: the adjoint reads both sizes off q and x)
    scale = kw["scale_factor"]
    if _has_node(scale) and not (kw["size"] is not None or kw["recompute_scale_factor"]):
        r.unsupported("a scale factor computed in forward() (pass size= instead)")
    if kw["size"] is not None or kw["recompute_scale_factor"] or scale is None:
        scale = None  # F.interpolate then works from the output size and passes no scale factor on
    elif isinstance(scale, (tuple, list)):
        scale = tuple(float(s) for s in scale)
    else:
        scale = float(scale)
    return ops.interpolate_transpose(r.q, r.shape(r.x), kw["mode"], kw["align_corners"], scale, kw["antialias"])


_PAD_MODULES = {nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ZeroPad3d: "constant",
                nn.ConstantPad1d: "constant", nn.ConstantPad2d: "constant", nn.ConstantPad3d: "constant",
                nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect", nn.ReflectionPad3d: "reflect",
                nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate",
                nn.ReplicationPad3d: "replicate", nn.CircularPad1d: "circular", nn.CircularPad2d: "circular",
                nn.CircularPad3d: "circular"}


@rule(F.pad, *_PAD_MODULES)
def pad(r):
    """y = pad(x): constant padding crops back; reflect / replicate / circular also add the border's cotangent
    onto the entries it copies."""
    if r.module is not None:
        mode = next(v for c, v in _PAD_MODULES.items() if isinstance(r.module, c))
        pads = list(r.module.padding)
    else:
        mode, pads = r.arg("mode"), r.arg("pad")
        if isinstance(pads, fx.Node):
            r.unsupported("a padding list traced as one value (write it out: [left, right, ...])")
        # amounts computed from shapes (timm's pad_same) reach the decoder as run-time inputs
        pads = [r.constant(p) for p in pads]
    if mode not in ("constant", "reflect", "replicate", "circular"):
        r.unsupported(f"padding mode {mode!r}")
    return ops.pad_transpose(r.q, pads, mode, r.shape(r.x))


# ------------------------------------------------------------------ regularisers


@rule(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
def dropout_module(r):
    """Dropout: identity in eval; in train the decoder reuses the forward's own mask (per channel for
    Dropout1d/2d/3d). AlphaDropout: eval only (refused at run time in train mode)."""
    mask = r.rewrite_with_mask(ops.module_dropout, r.x, r.module_ref())
    return ops.dropout_back(r.q, mask, r.module.p)


_CHANNEL_DROPOUT = {F.dropout1d, F.dropout2d, F.dropout3d}


@rule(F.dropout, torch.dropout, *_CHANNEL_DROPOUT, F.alpha_dropout, F.feature_alpha_dropout)
def dropout_function(r):
    """Functional dropout: `training` is fixed when fx traces (like any Python value); in training the decoder
    reuses the forward's mask (per channel for dropout1d/2d/3d). Alpha dropout: eval only."""
    p = r.arg("p")
    training = r.arg("train") if r.node.target is torch.dropout else r.arg("training")
    if training and r.node.target in (F.alpha_dropout, F.feature_alpha_dropout):
        r.unsupported("alpha dropout in training (its affine noise is not a mask)")
    channels = r.node.target in _CHANNEL_DROPOUT
    mask = r.rewrite_with_mask(ops.dropout_mask, r.x, p, training, channels)
    return ops.dropout_back(r.q, mask, p)


@rule(nn.Identity, "contiguous", "clone", torch.clone)
def identity(r):
    """Ops that move no values: the cotangent passes unchanged."""
    return r.q


@rule("float", "double", "half", "bfloat16", "to", "type_as", "type")
def cast(r):
    """A floating-point cast (or device move): the cotangent goes back to the input's dtype and device, as in
    autograd. A cast to an integer or bool dtype is refused when it runs."""
    if any(isinstance(a, fx.Node) for a in r.node.args[1:] if r.node.target != "type_as"):
        r.unsupported("a cast to a dtype computed in forward()")
    source = r.save(ops.cast_source, r.x, r.node, name="cast", batched=False, after=True)
    return ops.cast_back(r.q, source)


# ------------------------------------------------------------------ fan-out and arithmetic with constants


def _alpha(r):
    alpha = (r.kw or {}).get("alpha", 1)  # operator.add / __add__ have none
    if isinstance(alpha, fx.Node):
        r.unsupported("an alpha computed in forward()")
    return alpha


def _fan_out(r, scales):
    """s = c_1 u_1 + c_2 u_2: q_u_i = c_i q_s, summed over the dims where u_i was broadcast."""
    pairs = []
    for name, c in zip(("input", "other"), scales):
        node = r.arg(name)
        if r.active(node):
            pairs.append((node, ops.sum_to(r.q if c == 1 else r.q * c, r.shape(node))))
    return pairs


@rule(operator.add, torch.add, "add", "add_")
def add(r):
    """s = u + alpha v  ->  q_u = q_s, q_v = alpha q_s: fan-out (summed over dims where u or v was broadcast)."""
    return _fan_out(r, (1, _alpha(r)))


@rule(operator.sub, torch.sub, "sub", "sub_")
def sub(r):
    """s = u - alpha v  ->  q_u = q_s, q_v = -alpha q_s."""
    return _fan_out(r, (1, -_alpha(r)))


@rule(operator.neg, torch.neg, "neg")
def neg(r):
    return -r.q


@rule(operator.mul, torch.mul, "mul", "mul_")
def mul(r):
    """s = u * c with c not input-dependent  ->  q_u = q_s * c. (A product of two input-dependent tensors is
    attention-like gating, outside the piecewise-linear networks unroll compiles.) A c computed from the input's
    values (a mask `y > 0.1`) has the batch dim: it is saved per sample, and meets q with the class dim inserted."""
    u, c = r.arg("input"), r.arg("other")
    if r.active(c):
        u, c = c, u
    if r.active(c):
        r.unsupported("a product of two input-dependent tensors (gating/attention)")
    return [(u, ops.sum_to(r.q * r.operand(c, u), r.shape(u)))]


@rule(operator.truediv, torch.div, "div", "div_")
def div(r):
    u, c = r.arg("input"), r.arg("other")
    if r.active(c):
        r.unsupported("division by an input-dependent tensor")
    if (r.kw or {}).get("rounding_mode") is not None:
        r.unsupported("division with rounding_mode (piecewise constant: no gradient)")
    return [(u, ops.sum_to(r.q / r.operand(c, u), r.shape(u)))]


@rule(torch.where, "where")
def where(r):
    """w = where(m, a, b) with the mask m not input-dependent (a comparison is not)  ->  q_a = q_w where m,
    q_b = q_w elsewhere (each summed over the dims it was broadcast along)."""
    m = r.arg("condition")
    if r.active(m):
        r.unsupported("a condition that carries gradients")
    sides = [(r.arg(name), keep) for name, keep in (("input", True), ("other", False)) if r.active(r.arg(name))]
    mask = r.operand(m, sides[0][0])
    return [(node, ops.sum_to(ops.masked(r.q, mask, keep), r.shape(node))) for node, keep in sides]


# ------------------------------------------------------------------ shape ops: their inverses


@rule(torch.flatten, "flatten", "view", "reshape", torch.reshape, nn.Flatten, "view_as", "reshape_as",
      torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze", torch.unflatten, "unflatten", nn.Unflatten)
def reshape(r):
    """A reshape moves no values: reshape q back to the input's shape."""
    return ops.reshape_back(r.q, r.shape(r.x), r.shape(r.node))


@rule("expand", "expand_as")
def expand(r):
    """y = x.expand(...)  ->  q_x = q_y summed over the expanded dims."""
    return ops.expand_back(r.q, r.shape(r.x), r.shape(r.node))


@rule("repeat", torch.tile, "tile")
def repeat(r):
    """y = x.repeat(*sizes)  ->  q_x = the sum of the tiles' cotangents."""
    sizes = r.arg("sizes") if "sizes" in (r.kw or {}) else r.arg("dims")
    if any(isinstance(s, fx.Node) for s in sizes):
        r.unsupported("repeat counts computed in forward()")
    return ops.repeat_transpose(r.q, tuple(sizes), r.shape(r.x))


@rule(torch.transpose, "transpose", "transpose_", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims")
def transpose(r):
    names = ("axis0", "axis1") if "axis0" in (r.kw or {}) else ("dim0", "dim1")
    return ops.transpose_back(r.q, *(r.arg(n) for n in names))


@rule(torch.flip, "flip")
def flip(r):
    return ops.flip_back(r.q, r.arg("dims"))


@rule(torch.roll, "roll")
def roll(r):
    return ops.roll_back(r.q, r.arg("shifts"), r.arg("dims"))


@rule(torch.movedim, "movedim", torch.moveaxis, "moveaxis")
def movedim(r):
    return ops.movedim_back(r.q, r.arg("source"), r.arg("destination"))


@rule(torch.narrow, "narrow")
def narrow(r):
    if any(isinstance(r.arg(n), fx.Node) for n in ("dim", "start")):
        r.unsupported("a narrow window computed in forward()")
    return ops.narrow_back(r.q, r.arg("dim"), r.arg("start"), r.shape(r.x))


@rule(torch.permute, "permute")
def permute(r):
    dims = r.arg("dims")
    rank = len(dims)
    dims = [d % rank for d in dims]
    if dims[0] != 0:
        r.unsupported("a permutation that moves the batch dimension")
    inverse = [0] * rank
    for i, d in enumerate(dims):
        inverse[d] = i
    return r.q.permute(0, 1, *(d + 1 for d in inverse[1:]))


def _tensor_list(r):
    parts = r.arg("tensors")
    if not isinstance(parts, (list, tuple)):
        r.unsupported("a list of tensors built in forward() as one traced value (write the list out: [a, b])")
    return parts


@rule(torch.cat, torch.concat, torch.concatenate)
def cat(r):
    """c = cat([u, v, ...], dim)  ->  q_u, q_v, ... = split(q_c) at the inputs' sizes."""
    parts, dim = _tensor_list(r), r.arg("dim")
    pieces = ops.split_back(r.q, [r.shape(p) for p in parts], dim)
    return [(p, pieces[i]) for i, p in enumerate(parts) if r.active(p)]


@rule(torch.stack)
def stack(r):
    """s = stack([u, v, ...], dim)  ->  q_u, q_v, ... = unbind(q_s, dim)."""
    parts = _tensor_list(r)
    pieces = ops.unstack(r.q, r.arg("dim"))
    return [(p, pieces[i]) for i, p in enumerate(parts) if r.active(p)]


TUPLE_OPS = {torch.chunk, "chunk", torch.split, "split", torch.tensor_split, "tensor_split", torch.unbind, "unbind"}


@rule(*TUPLE_OPS)
def split(r):
    """[u_1, u_2, ...] = split(x, dim)  ->  q_x = cat(q_u_1, q_u_2, ...), zeros for the parts nobody used."""
    unbind = r.node.target in (torch.unbind, "unbind")
    shapes = r.save(ops.part_shapes, r.node, name="part_shapes", batched=False, after=True)
    indices = sorted(r.q)  # r.q: {index as written (-1 too): cotangent} of the parts that were used
    return ops.join_parts([r.q[i] for i in indices], indices, shapes, r.arg("dim"), unbind)


@rule(operator.getitem)
def getitem(r):
    """x[index]: q goes back to where the slice came from, accumulated where an index repeats. (Parts of a split
    are handled by the split's rule.)"""
    index = r.arg("index")
    if isinstance(r.x, fx.Node) and r.x.target in TUPLE_OPS:
        r.unsupported("a slice of a split's parts (index them one by one)")
    if any(isinstance(i, fx.Node) for i in (index if isinstance(index, tuple) else (index,))):
        r.unsupported("indexing with input-dependent or traced indices")
    return ops.slice_back(r.q, index, r.shape(r.x))
