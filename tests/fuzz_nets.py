"""Random piecewise-linear classifiers for differential fuzzing (tests/test_fuzz.py).

`nets()` is a hypothesis strategy for a `NetSpec`: an input shape, a number of classes, train/eval mode and a list
of ops, each drawn for the shape the previous one produced (shape bookkeeping), so every drawn net is valid and
ends in (B, K) logits. Each op is spelled one of the ways a user writes it (module, `F.`, `torch.`, method,
in-place). `NetSpec.build()` turns the spec into an `nn.Module` whose weights come from the spec's seed.

Shrinking works on the draws, so a failing example shrinks to few ops with small shapes; its repr lists the ops.

Ops whose rule does not exist yet are generated only once `unroll.rules` has one (looked up in the registry), and
spellings that hit known bugs only once their flag in `ENABLED` is on, so the default run stays green while the
regression tests in test_fuzz.py record the bugs.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from unroll import rules
from unroll.verify import randomize_batch_norm

# Spellings behind known bugs (see the regression tests in test_fuzz.py): switched on once branch `rules` fixed them
# (all merged now), like a batch-shaped input-independent operand with `samples=` (test_batch_shaped_constant).
ENABLED = {
    "alpha": True,  # torch.add / torch.sub / .add / .sub with alpha != 1
    "negative_part_index": True,  # x.chunk(2, 1)[-1]
    "batch_constant": True,  # an input-independent operand with a batch dimension (w.expand(B, ...))
    "repeated_index": True,  # x[:, [0, 0, 1]]
    "last_dropout": True,  # nn.Dropout (or a max pool) producing the logits
    "ellipsis_index": True,  # x[..., 1:3]: slice_back refuses at run time (found by this fuzzer)
}


def has_rule(*targets) -> bool:
    return all(t in rules.RULES for t in targets)


MAX_NUMEL = 1024  # per sample, for every tensor a net computes (keeps an example at a few milliseconds)
MAX_CH = 6

# ---------------------------------------------------------------------------------------------- specs and modules


class Lambda(nn.Module):
    """An op as a traced function `fn(self, x)` plus the modules / parameters / buffers it uses."""

    def __init__(self, fn: Callable, **members):
        super().__init__()
        self.fn = fn
        for name, value in members.items():
            setattr(self, name, value)

    def forward(self, x):
        return self.fn(self, x)


class BatchNormOp(nn.Module):
    """BatchNorm (module or F.batch_norm spelling). With `frozen` set (for the reference only, never while
    tracing) the batch statistics are detached: the gradient unroll documents for BN on batch statistics."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, functional: bool):
        super().__init__()
        self.bn, self.functional, self.frozen = bn, functional, False

    def forward(self, x):
        bn = self.bn
        batch_stats = bn.training or bn.running_var is None
        if self.frozen:
            # torch's BN backward is wrong on some permuted inputs (test_batch_norm_after_permute_matches_finite_
            # differences): the reference gets a contiguous copy, the same values
            x = x.contiguous()
        if self.frozen and batch_stats:
            dims = [0] + list(range(2, x.dim()))
            shape = [1, -1] + [1] * (x.dim() - 2)
            mean = x.mean(dims).detach().view(shape)
            var = x.var(dims, unbiased=False).detach().view(shape)
            y = (x - mean) * torch.rsqrt(var + bn.eps)
            if bn.weight is not None:
                y = y * bn.weight.view(shape) + bn.bias.view(shape)
            # the values of the real BN (bit for bit: a later gate may sit on a value that is 0 up to round-off),
            # the gradient of the frozen one
            return self._forward(x).detach() + (y - y.detach())
        return self._forward(x)

    def _forward(self, x):
        bn = self.bn
        batch_stats = bn.training or bn.running_var is None
        if self.functional:
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, batch_stats, bn.momentum,
                                bn.eps)
        return bn(x)


@dataclass
class Op:
    kind: str
    spelling: str
    args: dict
    out: tuple  # output shape without the batch dim
    fresh: bool  # output may be modified in place (autograd does not save it, it is no view of the input)
    make: Callable[[], nn.Module] = field(repr=False, compare=False)
    # output may be .view()ed: None = as the input (elementwise ops, convs keep a permuted layout); False after
    # permutes, slices and other views; True after .contiguous() and linear layers
    dense: bool | None = None

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.args.items())
        return f"{self.kind}.{self.spelling}({args}) -> {self.out}"

    def _repr_pretty_(self, p, cycle):  # hypothesis prints failing examples with this
        p.text(repr(self))


@dataclass
class NetSpec:
    batch: int
    shape: tuple  # input shape without the batch dim
    classes: int
    train: bool
    seed: int
    ops: list

    def __repr__(self):
        ops = "".join(f"\n    {op!r}," for op in self.ops)
        return (f"NetSpec(input={(self.batch, *self.shape)}, classes={self.classes}, train={self.train}, "
                f"seed={self.seed}, ops=[{ops}\n])")

    def _repr_pretty_(self, p, cycle):
        p.text(repr(self))

    def build(self) -> "Net":
        torch.manual_seed(self.seed)
        net = Net([op.make() for op in self.ops]).double()
        randomize_batch_norm(net, self.seed)
        net.train(self.train)
        for m in net.modules():  # dropout stays off: the reference could not redraw the forward's mask
            if isinstance(m, nn.Dropout):
                m.eval()
        return net

    def input(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(self.batch, *self.shape, generator=g, dtype=torch.double) * 2


class Net(nn.Module):
    def __init__(self, ops):
        super().__init__()
        self.ops = nn.ModuleList(ops)

    def forward(self, x):
        for op in self.ops:
            x = op(x)
        return x



def param(*shape, fan_in=1):
    return nn.Parameter(torch.randn(*shape, dtype=torch.double) / math.sqrt(fan_in))


def numel(shape):
    return math.prod(shape)


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def neg_dim(draw, d, rank):
    """Dim d of a (B, *shape) tensor of `rank` non-batch dims, spelled positive or negative."""
    return draw(st.sampled_from([d, d - rank - 1]))


def spell_tuple(draw, values):
    """(3, 3) may be written 3."""
    if len(set(values)) == 1 and draw(st.booleans()):
        return values[0]
    return tuple(values)


# ---------------------------------------------------------------------------------------------- op drawers
# Each drawer takes (draw, state) and returns an Op; `applies(state)` says whether it can follow that state.


@dataclass
class State:
    shape: tuple
    fresh: bool
    batch: int
    train: bool
    dense: bool = True

    @property
    def rank(self):
        return len(self.shape)


def conv_out(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def draw_conv(draw, s: State, same_shape=False) -> Op:
    nd = s.rank - 1
    c_in, sp = s.shape[0], s.shape[1:]
    groups = draw(st.sampled_from(divisors(c_in)))
    c_out = c_in if same_shape else groups * draw(st.integers(1, max(1, MAX_CH // groups)))
    if same_shape:
        k = [draw(st.sampled_from([1, 3])) for _ in sp]
        stride, dilation = [1] * nd, [draw(st.integers(1, 2)) for _ in sp]
        padding = draw(st.sampled_from(["same", "int"]))
        pads = [dd * (kk - 1) // 2 for kk, dd in zip(k, dilation)]
    else:
        k = [draw(st.integers(1, min(4, n))) for n in sp]
        dilation = [draw(st.integers(1, 2)) if 2 * (kk - 1) + 1 <= n else 1 for kk, n in zip(k, sp)]
        padding = draw(st.sampled_from(["int", "same", "valid"]))
        stride = [1] * nd if padding == "same" else [draw(st.integers(1, 3)) for _ in sp]
        pads = [draw(st.integers(0, kk)) if padding == "int" else 0 for kk in k]
    out_sp = tuple(n if padding == "same" else conv_out(n, kk, ss, p, dd)
                   for n, kk, ss, p, dd in zip(sp, k, stride, pads, dilation))
    pad_arg = spell_tuple(draw, pads) if padding == "int" else padding
    k_arg, s_arg, d_arg = spell_tuple(draw, k), spell_tuple(draw, stride), spell_tuple(draw, dilation)
    bias = draw(st.booleans())
    spelling = draw(st.sampled_from(["module", "F", "F_kw"]))
    mode = "zeros"
    if spelling == "module" and padding == "int" and any(pads) and draw(st.booleans()):
        modes = ["replicate"] + (["circular"] if all(p <= n for p, n in zip(pads, sp)) else []) + \
            (["reflect"] if all(p < n for p, n in zip(pads, sp)) else [])
        mode = draw(st.sampled_from(modes))
    args = dict(c_in=c_in, c_out=c_out, kernel=k_arg, stride=s_arg, padding=pad_arg, dilation=d_arg, groups=groups,
                bias=bias, **({"padding_mode": mode} if mode != "zeros" else {}))
    conv_f = (F.conv1d, F.conv2d)[nd - 1]
    fan_in = c_in // groups * numel(k)

    def make():
        if spelling == "module":
            return (nn.Conv1d, nn.Conv2d)[nd - 1](c_in, c_out, k_arg, s_arg, pad_arg, d_arg, groups, bias, mode)
        members = dict(weight=param(c_out, c_in // groups, *k, fan_in=fan_in))
        members["b"] = param(c_out) if bias else None
        if spelling == "F":
            return Lambda(lambda m, x: conv_f(x, m.weight, m.b, s_arg, pad_arg, d_arg, groups), **members)
        return Lambda(lambda m, x: conv_f(x, m.weight, bias=m.b, stride=s_arg, padding=pad_arg, dilation=d_arg,
                                          groups=groups), **members)

    return Op("conv", spelling + ("" if mode == "zeros" else f"_{mode}"), args, (c_out, *out_sp), True, make)


def draw_linear(draw, s: State, same_shape=False, n_out=None) -> Op:
    n = s.shape[-1]
    rest = numel(s.shape[:-1])
    m = n if same_shape else n_out or draw(st.integers(1, max(1, min(8, MAX_NUMEL // rest))))
    bias = draw(st.booleans())
    spelling = draw(st.sampled_from(["module", "F", "F_kw", "F_nobias"]))

    def make():
        if spelling == "module":
            return nn.Linear(n, m, bias)
        w = param(m, n, fan_in=n)
        if spelling == "F_nobias":
            return Lambda(lambda mod, x: F.linear(x, mod.weight), weight=w)
        b = param(m) if bias else None
        if spelling == "F":
            return Lambda(lambda mod, x: F.linear(x, mod.weight, mod.b), weight=w, b=b)
        return Lambda(lambda mod, x: F.linear(x, weight=mod.weight, bias=mod.b), weight=w, b=b)

    return Op("linear", spelling, dict(n_in=n, n_out=m, bias=bias and spelling != "F_nobias"),
              (*s.shape[:-1], m), True, make, dense=True)


ACTIVATIONS = {
    # family -> {spelling: (in place?, fn(params) -> module-or-function)}
    "relu": ["module", "module_inplace", "F", "F_inplace", "torch", "torch_", "method", "method_"],
    "leaky_relu": ["module", "module_inplace", "F", "F_kw_inplace", "F_"],
    "relu6": ["module", "module_inplace", "F", "F_inplace"],
    "hardtanh": ["module", "module_inplace", "F", "F_kw", "F_"],
}
if has_rule(torch.clamp, "clamp", "clamp_", "clamp_min", torch.clip):
    ACTIVATIONS["clamp"] = ["method", "torch_kw", "clip", "clamp_min", "method_"]


def draw_activation(draw, s: State, allow_inplace=None) -> Op:
    allow_inplace = s.fresh if allow_inplace is None else allow_inplace
    family = draw(st.sampled_from(list(ACTIVATIONS)))
    spellings = [sp for sp in ACTIVATIONS[family] if allow_inplace or not (sp.endswith("_") or "inplace" in sp)]
    spelling = draw(st.sampled_from(spellings))
    args = {}
    if family == "relu":
        fns = {"module": lambda: nn.ReLU(), "module_inplace": lambda: nn.ReLU(inplace=True),
               "F": lambda: Lambda(lambda m, x: F.relu(x)), "F_inplace": lambda: Lambda(lambda m, x: F.relu(x, True)),
               "torch": lambda: Lambda(lambda m, x: torch.relu(x)), "torch_": lambda: Lambda(lambda m, x: torch.relu_(x)),
               "method": lambda: Lambda(lambda m, x: x.relu()), "method_": lambda: Lambda(lambda m, x: x.relu_())}
    elif family == "leaky_relu":
        slope = draw(st.sampled_from([0.01, 0.0, 0.2, 1.5]))
        args = dict(slope=slope)
        fns = {"module": lambda: nn.LeakyReLU(slope), "module_inplace": lambda: nn.LeakyReLU(slope, inplace=True),
               "F": lambda: Lambda(lambda m, x: F.leaky_relu(x, slope)),
               "F_kw_inplace": lambda: Lambda(lambda m, x: F.leaky_relu(x, negative_slope=slope, inplace=True)),
               "F_": lambda: Lambda(lambda m, x: F.leaky_relu_(x, slope))}
    elif family == "relu6":
        fns = {"module": lambda: nn.ReLU6(), "module_inplace": lambda: nn.ReLU6(inplace=True),
               "F": lambda: Lambda(lambda m, x: F.relu6(x)), "F_inplace": lambda: Lambda(lambda m, x: F.relu6(x, True))}
    elif family == "clamp":
        lo = draw(st.sampled_from([-1.0, -0.5, 0.0]))
        hi = draw(st.sampled_from([0.5, 1.0, 2.0]))
        args = dict(min=lo, max=hi)
        fns = {"method": lambda: Lambda(lambda m, x: x.clamp(lo, hi)),
               "torch_kw": lambda: Lambda(lambda m, x: torch.clamp(x, min=lo, max=hi)),
               "clip": lambda: Lambda(lambda m, x: torch.clip(x, lo, hi)),
               "clamp_min": lambda: Lambda(lambda m, x: x.clamp_min(lo)),
               "method_": lambda: Lambda(lambda m, x: x.clamp_(lo, hi))}
    else:
        lo = draw(st.sampled_from([-1.0, -0.5, 0.0]))
        hi = draw(st.sampled_from([0.5, 1.0, 2.0]))
        args = dict(min_val=lo, max_val=hi)
        fns = {"module": lambda: nn.Hardtanh(lo, hi), "module_inplace": lambda: nn.Hardtanh(lo, hi, inplace=True),
               "F": lambda: Lambda(lambda m, x: F.hardtanh(x, lo, hi)),
               "F_kw": lambda: Lambda(lambda m, x: F.hardtanh(x, min_val=lo, max_val=hi)),
               "F_": lambda: Lambda(lambda m, x: F.hardtanh_(x, lo, hi))}
    return Op(family, spelling, args, s.shape, False, fns[spelling])


def pool_out(n, k, s, p, d, ceil):
    eff = d * (k - 1) + 1
    if ceil:
        out = -(-(n + 2 * p - eff) // s) + 1
        if (out - 1) * s >= n + p:  # the last window must start inside the input or the left padding
            out -= 1
        return out
    return (n + 2 * p - eff) // s + 1


def draw_max_pool(draw, s: State) -> Op:
    nd, sp = s.rank - 1, s.shape[1:]
    k = [draw(st.integers(1, min(3, n))) for n in sp]
    stride = draw(st.none() | st.just([draw(st.integers(1, 3)) for _ in sp]))
    dil = [draw(st.integers(1, 2)) if 2 * (kk - 1) + 1 <= n else 1 for kk, n in zip(k, sp)]
    pads = [draw(st.integers(0, kk // 2)) for kk in k]
    ceil = draw(st.booleans())
    strides = stride or k
    out = tuple(pool_out(n, kk, ss, p, dd, ceil) for n, kk, ss, p, dd in zip(sp, k, strides, pads, dil))
    k_arg, p_arg, d_arg = spell_tuple(draw, k), spell_tuple(draw, pads), spell_tuple(draw, dil)
    s_arg = None if stride is None else spell_tuple(draw, stride)
    spelling = draw(st.sampled_from(["module", "F", "F_kw"]))
    pool_f = (F.max_pool1d, F.max_pool2d)[nd - 1]

    def make():
        if spelling == "module":
            return (nn.MaxPool1d, nn.MaxPool2d)[nd - 1](k_arg, s_arg, p_arg, d_arg, ceil_mode=ceil)
        if spelling == "F":
            return Lambda(lambda m, x: pool_f(x, k_arg, s_arg, p_arg, d_arg, ceil))
        return Lambda(lambda m, x: pool_f(x, kernel_size=k_arg, stride=s_arg, padding=p_arg, dilation=d_arg,
                                          ceil_mode=ceil))

    return Op("max_pool", spelling, dict(kernel=k_arg, stride=s_arg, padding=p_arg, dilation=d_arg, ceil_mode=ceil),
              (s.shape[0], *out), True, make)


def draw_avg_pool(draw, s: State) -> Op:
    sp, nd = s.shape[1:], s.rank - 1
    k = [draw(st.integers(1, min(3, n))) for n in sp]
    stride = draw(st.none() | st.just([draw(st.integers(1, 3)) for _ in sp]))
    pads = [draw(st.integers(0, kk // 2)) for kk in k]
    ceil, count_pad = draw(st.booleans()), draw(st.booleans())
    divisor = draw(st.none() | st.integers(1, 5))
    out = tuple(pool_out(n, kk, ss, p, 1, ceil) for n, kk, ss, p in zip(sp, k, stride or k, pads))
    k_arg, p_arg = spell_tuple(draw, k), spell_tuple(draw, pads)
    s_arg = None if stride is None else spell_tuple(draw, stride)
    spelling = draw(st.sampled_from(["module", "F"]))
    if nd == 1:
        divisor = None  # avg_pool1d has no divisor_override

    def make():
        if nd == 1:
            if spelling == "module":
                return nn.AvgPool1d(k_arg, s_arg, p_arg, ceil, count_pad)
            return Lambda(lambda m, x: F.avg_pool1d(x, k_arg, s_arg, p_arg, ceil, count_pad))
        if spelling == "module":
            return nn.AvgPool2d(k_arg, s_arg, p_arg, ceil, count_pad, divisor)
        return Lambda(lambda m, x: F.avg_pool2d(x, k_arg, s_arg, p_arg, ceil, count_pad, divisor))

    return Op("avg_pool", spelling, dict(kernel=k_arg, stride=s_arg, padding=p_arg, ceil_mode=ceil,
                                         count_include_pad=count_pad, divisor_override=divisor),
              (s.shape[0], *out), True, make)


def draw_adaptive_pool(draw, s: State) -> Op:
    nd, sp = s.rank - 1, s.shape[1:]
    kind = draw(st.sampled_from(["avg", "max"]))
    size = [draw(st.integers(1, n + 1)) for n in sp]
    size_arg = spell_tuple(draw, size)
    spelling = draw(st.sampled_from(["module", "F"]))
    mod = {"avg": (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d), "max": (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)}
    fn = {"avg": (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d), "max": (F.adaptive_max_pool1d,
                                                                         F.adaptive_max_pool2d)}[kind][nd - 1]

    def make():
        if spelling == "module":
            return mod[kind][nd - 1](size_arg)
        return Lambda(lambda m, x: fn(x, size_arg))

    return Op(f"adaptive_{kind}_pool", spelling, dict(output_size=size_arg), (s.shape[0], *size), True, make)


def draw_mean(draw, s: State) -> Op:
    r = s.rank
    dims = sorted(draw(st.sets(st.integers(1, r), min_size=1, max_size=r)))
    keepdim = draw(st.booleans()) if len(dims) < r else True  # (B,) would not be a feature map
    dim_arg = [neg_dim(draw, d, r) for d in dims]
    dim_arg = dim_arg[0] if len(dim_arg) == 1 and draw(st.booleans()) else tuple(dim_arg)
    spelling = draw(st.sampled_from(["method", "torch", "torch_kw"]))
    out = tuple(1 if i + 1 in dims else n for i, n in enumerate(s.shape) if keepdim or i + 1 not in dims)
    fns = {"method": lambda m, x: x.mean(dim_arg, keepdim=keepdim),
           "torch": lambda m, x: torch.mean(x, dim_arg, keepdim),
           "torch_kw": lambda m, x: torch.mean(x, dim=dim_arg, keepdim=keepdim)}
    return Op("mean", spelling, dict(dim=dim_arg, keepdim=keepdim), out, True, lambda: Lambda(fns[spelling]))


def draw_batch_norm(draw, s: State) -> Op:
    c = s.shape[0]
    affine, track = draw(st.booleans()), draw(st.booleans())
    # batch statistics need more than one value per channel
    if s.batch * numel(s.shape[1:]) < 2:
        track = True
        assert not s.train
    spellings = ["module"] + (["F"] if has_rule(F.batch_norm) else [])
    spelling = draw(st.sampled_from(spellings))
    bn_cls = nn.BatchNorm2d if s.rank == 3 else nn.BatchNorm1d
    return Op("batch_norm", spelling, dict(affine=affine, track_running_stats=track), s.shape, True,
              lambda: BatchNormOp(bn_cls(c, affine=affine, track_running_stats=track), spelling == "F"))


def body_kinds(s: State):
    """Shape-preserving bodies f for residuals x + f(x)."""
    kinds = ["linear", "activation", "scale"]
    if s.rank in (2, 3):
        kinds.append("conv")
    if s.rank <= 3 and (not s.train or s.batch * numel(s.shape[1:]) >= 2):
        kinds.append("batch_norm")
    return kinds


def draw_body(draw, s: State):
    """(make, name, output may be modified in place)"""
    kind = draw(st.sampled_from(body_kinds(s)))
    inner = State(s.shape, False, s.batch, s.train)  # x itself is reused: never in place
    if kind == "conv":
        ops = [draw_conv(draw, inner, same_shape=True)]
        if draw(st.booleans()):
            ops.append(draw_activation(draw, State(s.shape, True, s.batch, s.train)))
    elif kind == "linear":
        ops = [draw_linear(draw, inner, same_shape=True)]
    elif kind == "activation":
        ops = [draw_activation(draw, inner)]
    elif kind == "batch_norm":
        ops = [draw_batch_norm(draw, inner)]
    else:
        ops = [draw_constant(draw, inner, mul_only=True)]
    return ops, ops[-1].fresh


def draw_residual(draw, s: State) -> Op:
    body, fresh = draw_body(draw, s)
    combos = ["add", "radd", "torch_add", "method_add", "sub", "rsub", "torch_sub", "method_sub"]
    if fresh:
        combos += ["iadd", "isub", "method_add_"]
    if ENABLED["alpha"]:
        combos += ["torch_add_alpha", "torch_sub_alpha", "method_add_alpha", "method_sub_alpha"]
    combo = draw(st.sampled_from(combos))
    alpha = draw(st.sampled_from([2.0, -0.5, 3])) if "alpha" in combo else None
    fns = {
        "add": lambda x, y: x + y, "radd": lambda x, y: y + x, "torch_add": lambda x, y: torch.add(x, y),
        "method_add": lambda x, y: x.add(y), "sub": lambda x, y: x - y, "rsub": lambda x, y: y - x,
        "torch_sub": lambda x, y: torch.sub(x, y), "method_sub": lambda x, y: x.sub(y),
        "iadd": _iadd, "isub": _isub, "method_add_": lambda x, y: y.add_(x),
        "torch_add_alpha": lambda x, y: torch.add(x, y, alpha=alpha),
        "torch_sub_alpha": lambda x, y: torch.sub(x, y, alpha=alpha),
        "method_add_alpha": lambda x, y: x.add(y, alpha=alpha), "method_sub_alpha": lambda x, y: y.sub(x, alpha=alpha),
    }
    combine = fns[combo]

    def make():
        return Lambda(lambda m, x: combine(x, m.body(x)), body=nn.Sequential(*[op.make() for op in body]))

    args = dict(body=body, **({} if alpha is None else dict(alpha=alpha)))
    return Op("residual", combo, args, s.shape, True, make)


def _iadd(x, y):
    y += x
    return y


def _isub(x, y):
    y -= x
    return y


def draw_broadcast(draw, s: State) -> Op:
    """x +- a reduced copy of x (a slice or a mean with size-1 dims): fan-out with broadcasting."""
    r = s.rank
    d = draw(st.integers(1, r))
    kind = draw(st.sampled_from(["slice", "mean"]))
    op = draw(st.sampled_from(["add", "sub", "rsub"]))
    idx = (slice(None),) * d + (slice(-1, None) if draw(st.booleans()) else slice(0, 1),)

    def reduced(x):
        return x[idx] if kind == "slice" else x.mean(d, keepdim=True)

    fn = {"add": lambda m, x: x + reduced(x), "sub": lambda m, x: x - reduced(x),
          "rsub": lambda m, x: reduced(x) - x}[op]
    return Op("broadcast", f"{kind}_{op}", dict(dim=d, index=idx if kind == "slice" else None), s.shape, True,
              lambda: Lambda(fn))


def draw_constant(draw, s: State, mul_only=False) -> Op:
    """Arithmetic with input-independent operands: parameters of several broadcastable shapes, numbers, values
    computed from parameters inside forward."""
    r = s.rank
    shapes = {"scalar": (), "one": (1,), "channel": (s.shape[0],) + (1,) * (r - 1),
              "batch1_channel": (1, s.shape[0]) + (1,) * (r - 1), "full": s.shape, "batch1_full": (1, *s.shape),
              "last": (s.shape[-1],)}
    kinds = ["mul", "div_number"] if mul_only else ["mul", "div_number", "div_param", "add", "neg", "computed"]
    if ENABLED["batch_constant"] and not mul_only:
        kinds.append("batch_shaped")
    kind = draw(st.sampled_from(kinds))
    shape_name = draw(st.sampled_from(list(shapes)))
    shape = shapes[shape_name]
    inplace_ok = s.fresh and not mul_only
    if kind == "mul":
        spelling = draw(st.sampled_from(["op", "rop", "torch", "method"] + (["iop", "method_"] if inplace_ok else [])))
        fn = {"op": lambda m, x: x * m.c, "rop": lambda m, x: m.c * x, "torch": lambda m, x: torch.mul(x, m.c),
              "method": lambda m, x: x.mul(m.c), "iop": _imul, "method_": lambda m, x: x.mul_(m.c)}[spelling]
    elif kind == "div_number":
        number = draw(st.sampled_from([2.0, -0.5, 3]))
        shape_name, shape = "number", None
        spelling = draw(st.sampled_from(["op", "torch", "method", "mul_number"] + (["iop"] if inplace_ok else [])))
        fn = {"op": lambda m, x: x / number, "torch": lambda m, x: torch.div(x, number),
              "method": lambda m, x: x.div(number), "mul_number": lambda m, x: number * x,
              "iop": lambda m, x: _idiv_number(x, number)}[spelling]
    elif kind == "div_param":
        spelling = draw(st.sampled_from(["op", "torch", "method"]))
        fn = {"op": lambda m, x: x / (m.c.abs() + 0.5), "torch": lambda m, x: torch.div(x, m.c.abs() + 0.5),
              "method": lambda m, x: x.div(m.c.abs() + 0.5)}[spelling]
    elif kind == "add":
        spelling = draw(st.sampled_from(["op", "rop", "sub", "rsub", "torch_add", "torch_sub", "method_add",
                                         "method_sub"]))
        fn = {"op": lambda m, x: x + m.c, "rop": lambda m, x: m.c + x, "sub": lambda m, x: x - m.c,
              "rsub": lambda m, x: m.c - x, "torch_add": lambda m, x: torch.add(x, m.c),
              "torch_sub": lambda m, x: torch.sub(x, m.c), "method_add": lambda m, x: x.add(m.c),
              "method_sub": lambda m, x: x.sub(m.c)}[spelling]
    elif kind == "neg":
        shape_name, shape = None, None
        spelling = draw(st.sampled_from(["op", "torch", "method"]))
        fn = {"op": lambda m, x: -x, "torch": lambda m, x: torch.neg(x), "method": lambda m, x: x.neg()}[spelling]
    elif kind == "computed":  # a constant computed in forward from parameters only
        spelling = draw(st.sampled_from(["sigmoid_mul", "exp_add", "buffer_mul"]))
        fn = {"sigmoid_mul": lambda m, x: x * torch.sigmoid(m.c), "exp_add": lambda m, x: x + m.c.exp() - 1,
              "buffer_mul": lambda m, x: x * (m.buf * 2 + 1)}[spelling]
    else:  # batch_shaped: an input-independent operand that has the batch dimension
        spelling = draw(st.sampled_from(["expand_mul", "expand_add", "repeat_add", "rows_mul", "rows_add"]))
        shape_name = draw(st.sampled_from(["batch1_channel", "batch1_full"]))
        shape = (4, *shapes[shape_name][1:]) if spelling.startswith("rows") else shapes[shape_name]  # 4 >= batch
        rest = shape[1:]
        fn = {"expand_mul": lambda m, x: x * m.c.expand(x.shape[0], *rest),
              "expand_add": lambda m, x: x + m.c.expand(x.shape[0], *rest),
              "repeat_add": lambda m, x: x + m.c.repeat(x.shape[0], *[1] * len(rest)),
              "rows_mul": lambda m, x: x * m.c[:x.shape[0]],  # a different operand per sample
              "rows_add": lambda m, x: m.c[:x.shape[0]] + x}[spelling]

    def make():
        if shape is None:
            return Lambda(fn)
        members = dict(c=nn.Parameter(torch.rand(shape, dtype=torch.double) + 0.5))
        if kind == "computed":
            members["buf"] = torch.randn(shape, dtype=torch.double)  # a plain tensor attribute (a constant)
        return Lambda(fn, **members)

    # out of place: a new tensor autograd does not keep; in place: x itself, which was fresh
    return Op(f"const_{kind}", spelling, dict(operand=shape_name), s.shape, True, make)


def _imul(m, x):
    x *= m.c
    return x


def _idiv_number(x, number):
    x /= number
    return x


def draw_dropout(draw, s: State) -> Op:
    spelling = draw(st.sampled_from(["module", "F_eval", "identity", "contiguous", "clone", "torch_clone"]))
    p = draw(st.sampled_from([0.0, 0.3]))
    fns = {"module": lambda: nn.Dropout(p), "F_eval": lambda: Lambda(lambda m, x: F.dropout(x, p, training=False)),
           "identity": lambda: nn.Identity(), "contiguous": lambda: Lambda(lambda m, x: x.contiguous()),
           "clone": lambda: Lambda(lambda m, x: x.clone()), "torch_clone": lambda: Lambda(lambda m, x: torch.clone(x))}
    fresh = True if spelling in ("clone", "torch_clone") else s.fresh  # the others return x itself (or a view)
    return Op("identity", spelling, dict(p=p) if spelling in ("module", "F_eval") else {}, s.shape, fresh,
              fns[spelling], dense=True if spelling == "contiguous" else None)


def chunk_sizes(n, chunks):
    size = -(-n // chunks)
    return [size] * (n // size) + ([n % size] if n % size else [])


def draw_split(draw, s: State) -> Op:
    """Split/chunk/unbind along a dim, transform some parts, put them back together (cat or sum)."""
    r = s.rank
    dims = [d for d in range(1, r + 1) if s.shape[d - 1] >= 2]
    d = draw(st.sampled_from(dims))
    n = s.shape[d - 1]
    how = draw(st.sampled_from(["chunk", "torch_chunk", "split_int", "split_list", "tensor_split", "unbind"]))
    dim_arg = neg_dim(draw, d, r)
    if how in ("chunk", "torch_chunk"):
        k = draw(st.integers(2, min(3, n)))
        sizes = chunk_sizes(n, k)
    elif how == "split_int":
        k = draw(st.integers(1, n - 1))
        sizes = chunk_sizes(n, -(-n // k)) if n % k == 0 else [k] * (n // k) + [n % k]
    elif how == "split_list":
        cut = draw(st.integers(1, n - 1))
        k = [cut, n - cut]
        sizes = k
    elif how == "tensor_split":
        k = draw(st.integers(2, min(3, n)))
        sizes = [n // k + 1] * (n % k) + [n // k] * (k - n % k)
    else:
        k = None
        sizes = [1] * n
    if how == "unbind" and r == 1:
        how, sizes, k = "chunk", chunk_sizes(n, 2), 2
    part_shapes = [tuple(s.shape[:d - 1]) + ((sz,) if how != "unbind" else ()) + tuple(s.shape[d:]) for sz in sizes]
    n_parts = len(sizes)
    used = sorted(draw(st.sets(st.integers(0, n_parts - 1), min_size=1, max_size=n_parts)))
    order = draw(st.permutations(used))
    transforms = [draw(st.sampled_from(["id", "relu", "scale", "neg"])) for _ in order]
    negative = ENABLED["negative_part_index"] and draw(st.booleans())
    index_of = {i: (i - n_parts if negative else i) for i in order}
    same = len({part_shapes[i] for i in order}) == 1
    combine = draw(st.sampled_from((["cat"] if how != "unbind" else []) + (["sum"] if same else [])
                                   + (["cat_other"] if how == "unbind" and r >= 2 else [])))
    other = None
    if combine == "cat_other":  # unbind removed dim d: concatenate along another remaining dim
        other = draw(st.integers(1, r - 1))
    if combine == "cat":
        out = list(s.shape)
        out[d - 1] = sum(sizes[i] for i in order)
    elif combine == "sum":
        out = list(part_shapes[order[0]])
    else:
        out = list(part_shapes[order[0]])
        out[other - 1] *= len(order)
    cat_dim = dim_arg if combine == "cat" else other

    def split(x):
        return {"chunk": lambda: x.chunk(k, dim_arg), "torch_chunk": lambda: torch.chunk(x, k, dim=dim_arg),
                "split_int": lambda: x.split(k, dim=dim_arg), "split_list": lambda: torch.split(x, k, dim_arg),
                "tensor_split": lambda: torch.tensor_split(x, k, dim=dim_arg),
                "unbind": lambda: x.unbind(dim_arg)}[how]()

    def transform(t, p):
        if t == "relu":
            return F.relu(p)
        if t == "scale":
            return p * 0.5
        return -p if t == "neg" else p

    def fn(m, x):
        parts = split(x)
        picked = [transform(t, parts[index_of[i]]) for i, t in zip(order, transforms)]
        if combine == "sum":
            total = picked[0]
            for p in picked[1:]:
                total = total + p
            return total
        return torch.cat(picked, cat_dim)

    args = dict(how=how, dim=dim_arg, arg=k, parts=[index_of[i] for i in order], transforms=transforms,
                combine=combine, **({"cat_dim": other} if other else {}))
    # not fresh: a part of a split is one of several views, which autograd forbids modifying in place
    return Op("split", how, args, tuple(out), False, lambda: Lambda(fn), dense=False)


def draw_cat(draw, s: State) -> Op:
    """cat([x, f(x)]) or cat([x, x]) or cat([x, x[slice]]): fan-out through a concatenation."""
    r = s.rank
    d = draw(st.integers(1, r))
    dim_arg = neg_dim(draw, d, r)
    with_ = draw(st.sampled_from(["self", "relu", "slice"]))
    spelling = draw(st.sampled_from(["cat", "cat_kw", "concat", "concatenate"]))
    extra = s.shape[d - 1] if with_ != "slice" else 1
    out = list(s.shape)
    out[d - 1] += extra
    idx = (slice(None),) * d + (slice(0, 1),)

    def other(x):
        if with_ == "relu":
            return F.relu(x)
        return x[idx] if with_ == "slice" else x

    fn = {"cat": lambda m, x: torch.cat([x, other(x)], dim_arg),
          "cat_kw": lambda m, x: torch.cat((other(x), x), dim=dim_arg),
          "concat": lambda m, x: torch.concat([x, other(x)], dim_arg),
          "concatenate": lambda m, x: torch.concatenate([other(x), x], dim_arg)}[spelling]
    return Op("cat", spelling, dict(dim=dim_arg, other=with_), tuple(out), True, lambda: Lambda(fn))


def draw_index(draw, s: State) -> Op:
    r = s.rank
    kinds = ["slice", "multi_slice", "list"]
    if r >= 2:
        kinds.append("int")
    if r <= 2:
        kinds.append("none")
    kind = draw(st.sampled_from(kinds))
    out = list(s.shape)
    fresh = s.fresh
    if kind in ("slice", "multi_slice"):
        dims = [draw(st.integers(1, r))] if kind == "slice" else list(range(1, r + 1))
        index = [slice(None)] * (r + 1)
        for d in dims:
            n = s.shape[d - 1]
            start = draw(st.integers(0, n - 1))
            stop = draw(st.integers(start + 1, n))
            step = draw(st.integers(1, 2))
            a = draw(st.sampled_from([start, start - n])) if start else draw(st.sampled_from([0, None]))
            b = draw(st.sampled_from([stop, stop - n])) if stop < n else draw(st.sampled_from([None, n]))
            index[d] = slice(a, b, step if step > 1 else None)
            out[d - 1] = len(range(start, stop, step))
        if ENABLED["ellipsis_index"] and draw(st.booleans()) and all(i == slice(None) for i in index[:-1]):
            index = (Ellipsis, index[-1])
        index = tuple(index)
    elif kind == "int":
        d = draw(st.integers(1, r))
        n = s.shape[d - 1]
        i = draw(st.integers(0, n - 1))
        index = (slice(None),) * d + (draw(st.sampled_from([i, i - n])),)
        del out[d - 1]
    elif kind == "list":
        d = draw(st.integers(1, r))
        n = s.shape[d - 1]
        elems = st.integers(0, n - 1)
        if ENABLED["repeated_index"]:
            picks = draw(st.lists(elems, min_size=1, max_size=4))
        else:
            picks = draw(st.lists(elems, min_size=1, max_size=n, unique=True))
        picks = [draw(st.sampled_from([p, p - n])) for p in picks]
        index = (slice(None),) * d + (picks,)
        out[d - 1] = len(picks)
        fresh = True  # advanced indexing copies
    else:
        d = draw(st.integers(1, r + 1))
        index = (slice(None),) * d + (None,)
        out.insert(d - 1, 1)
    return Op("index", kind, dict(index=index), tuple(out), fresh, lambda: Lambda(lambda m, x: x[index]),
              dense=None if kind == "list" else False)


def draw_reshape(draw, s: State) -> Op:
    r = s.rank
    kinds = ["flatten"]
    if r == 3:
        kinds.append("flatten_spatial")
    if r <= 2 and len(divisors(s.shape[-1])) > 2:
        kinds.append("unflatten")
    if r >= 2:
        kinds += ["permute", "transpose"]
        if len(divisors(s.shape[0])) > 2 and s.dense:
            kinds.append("shuffle")
    kind = draw(st.sampled_from(kinds))
    fresh = s.fresh
    if kind == "flatten":
        out = (numel(s.shape),)
        spelling = draw(st.sampled_from(["method", "torch", "module", "reshape"] + (["view", "view_neg"] if s.dense else [])))
        fns = {"method": lambda m, x: x.flatten(1), "torch": lambda m, x: torch.flatten(x, 1),
               "module": None, "view": lambda m, x: x.view(x.shape[0], -1),
               "reshape": lambda m, x: x.reshape(x.size(0), -1), "view_neg": lambda m, x: x.view(-1, out[0])}
        make = (lambda: nn.Flatten()) if spelling == "module" else (lambda: Lambda(fns[spelling]))
        args = {}
    elif kind == "flatten_spatial":
        c = s.shape[0]
        out = (c, numel(s.shape[1:]))
        spelling = draw(st.sampled_from(["method", "torch_kw", "module"] + (["view"] if s.dense else [])))
        fns = {"method": lambda m, x: x.flatten(2), "torch_kw": lambda m, x: torch.flatten(x, start_dim=2),
               "view": lambda m, x: x.view(x.shape[0], c, -1)}
        make = (lambda: nn.Flatten(2)) if spelling == "module" else (lambda: Lambda(fns[spelling]))
        args = {}
    elif kind == "unflatten":
        n = s.shape[-1]
        a = draw(st.sampled_from(divisors(n)[1:-1]))
        out = (*s.shape[:-1], a, n // a)
        spelling = draw(st.sampled_from(["reshape"] + (["view"] if s.dense else [])))
        make = (lambda: Lambda(lambda m, x: x.view(x.shape[0], *out))) if spelling == "view" else \
            (lambda: Lambda(lambda m, x: x.reshape(-1, *out)))
        args = dict(to=out)
    elif kind == "permute":
        perm = draw(st.permutations(list(range(1, r + 1))))
        out = tuple(s.shape[p - 1] for p in perm)
        dims = [0] + [neg_dim(draw, p, r) for p in perm]
        spelling = draw(st.sampled_from(["method", "method_tuple", "torch"]))
        fn = {"method": lambda m, x: x.permute(*dims), "method_tuple": lambda m, x: x.permute(dims),
              "torch": lambda m, x: torch.permute(x, dims)}[spelling]
        if draw(st.booleans()):
            inner = fn
            fn = lambda m, x: inner(m, x).contiguous()  # noqa: E731
            spelling += "_contiguous"
        make = lambda: Lambda(fn)  # noqa: E731
        args = dict(dims=dims)
    elif kind == "transpose":
        a, b = draw(st.permutations(list(range(1, r + 1))))[:2]
        out = list(s.shape)
        out[a - 1], out[b - 1] = out[b - 1], out[a - 1]
        da, db = neg_dim(draw, a, r), neg_dim(draw, b, r)
        spelling = draw(st.sampled_from(["method", "torch"] + (["method_"] if s.fresh else [])))
        fn = {"method": lambda m, x: x.transpose(da, db), "torch": lambda m, x: torch.transpose(x, da, db),
              "method_": lambda m, x: x.transpose_(da, db)}[spelling]
        make = lambda: Lambda(fn)  # noqa: E731
        args = dict(dims=(da, db))
        out = tuple(out)
    else:  # channel shuffle, as in ShuffleNet
        c, sp = s.shape[0], s.shape[1:]
        g = draw(st.sampled_from(divisors(c)[1:-1]))
        out = s.shape
        spelling = "view_transpose"
        make = lambda: Lambda(lambda m, x: torch.transpose(x.view(x.shape[0], g, c // g, *sp), 1, 2)  # noqa: E731
                              .contiguous().view(x.shape[0], -1, *sp))
        args = dict(groups=g)
        fresh = True
    dense = {"permute": False, "transpose": False, "shuffle": True}.get(kind)
    if kind == "permute" and spelling.endswith("contiguous"):
        dense = True
    return Op(kind, spelling, args, tuple(out), fresh, make, dense=dense)


def draw_head(draw, s: State, classes: int) -> list[Op]:
    """From the last feature map to (B, K) logits, then maybe one op on the logits."""
    r = s.rank
    heads = ["flatten_linear"] + (["pool_linear", "conv_pool"] if r in (2, 3) else [])
    head = draw(st.sampled_from(heads))
    ops = []
    if head == "pool_linear":
        ops.append(draw_adaptive_pool_to_one(draw, s))
    if head == "conv_pool":
        c = s.shape[0]
        nd = r - 1
        ops.append(Op("conv", "module", dict(c_in=c, c_out=classes, kernel=1), (classes, *s.shape[1:]), True,
                      lambda: (nn.Conv1d, nn.Conv2d)[nd - 1](c, classes, 1)))
        ops.append(draw_adaptive_pool_to_one(draw, State(ops[-1].out, True, s.batch, s.train)))
        ops.append(flatten_op((classes,)))
    else:
        shape = ops[-1].out if ops else s.shape
        if len(shape) > 1:
            ops.append(flatten_op((numel(shape),)))
        ops.append(draw_linear(draw, State((numel(shape),), True, s.batch, s.train), n_out=classes))
    tails = ["none", "activation", "constant", "index"] + (["dropout", "max_pool"] if ENABLED["last_dropout"] else [])
    tail = draw(st.sampled_from(tails))
    if tail == "max_pool" and ops[-1].kind != "linear":
        tail = "dropout"
    if tail == "max_pool":  # MaxPool1d on (B, 2K) (an unbatched 1-d signal to torch) gives the (B, K) logits
        pre = ops[-1]
        ops[-1] = draw_linear(draw, State((pre.args["n_in"],), True, s.batch, s.train), n_out=2 * classes)
        ops.append(Op("max_pool", "module", dict(kernel=2), (classes,), True, lambda: nn.MaxPool1d(2)))
    logits = State((classes,), True, s.batch, s.train)
    if tail == "activation":
        ops.append(draw_activation(draw, logits, allow_inplace=False))
    elif tail == "constant":
        ops.append(draw_constant(draw, logits))
    elif tail == "index":  # a permutation of the logits
        perm = draw(st.permutations(list(range(classes))))
        ops.append(Op("index", "list", dict(index=(slice(None), perm)), (classes,), True,
                      lambda: Lambda(lambda m, x: x[:, perm])))
    elif tail == "dropout":
        ops.append(Op("identity", "module", dict(p=0.3), (classes,), True, lambda: nn.Dropout(0.3)))
    return ops


def draw_adaptive_pool_to_one(draw, s: State) -> Op:
    nd = s.rank - 1
    kind = draw(st.sampled_from(["adaptive_avg", "adaptive_max", "mean"]))
    out = (s.shape[0],) + (1,) * nd
    if kind == "mean":
        dims = tuple(range(2, 2 + nd))
        return Op("mean", "method", dict(dim=dims, keepdim=True), out, True,
                  lambda: Lambda(lambda m, x: x.mean(dims, keepdim=True)))
    cls = {"adaptive_avg": (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d),
           "adaptive_max": (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)}[kind][nd - 1]
    return Op(f"{kind}_pool", "module", dict(output_size=1), out, True, lambda: cls(1))


def flatten_op(out):
    return Op("flatten", "method", {}, out, True, lambda: Lambda(lambda m, x: x.flatten(1)))


# ---------------------------------------------------------------------------------------------- ops added by `rules`


def draw_interpolate(draw, s: State) -> Op:
    nd, sp = s.rank - 1, s.shape[1:]
    modes = ["nearest", "nearest-exact", "area"] + (["linear"] if nd == 1 else ["bilinear", "bicubic"])
    mode = draw(st.sampled_from(modes))
    align = draw(st.booleans()) if mode in ("linear", "bilinear", "bicubic") else None
    by = draw(st.sampled_from(["size", "scale_factor"]))
    budget = MAX_NUMEL // s.shape[0]
    if by == "size":
        size = [draw(st.integers(1, min(2 * n + 1, 12))) for n in sp]
        arg, out = spell_tuple(draw, size), tuple(size)
    else:
        factor = draw(st.sampled_from([2.0, 0.5, 1.5, 3.0]))
        out = tuple(int(math.floor(n * factor)) for n in sp)
        arg = factor
    if min(out) < 1 or numel(out) > budget:
        out, by, arg = tuple(sp), "size", tuple(sp)
    spelling = draw(st.sampled_from(["F", "module"]))
    kw = {by: arg, "mode": mode, **({"align_corners": align} if align is not None else {})}

    def make():
        if spelling == "module":
            return nn.Upsample(**kw)
        return Lambda(lambda m, x: F.interpolate(x, **kw))

    return Op("interpolate", f"{mode}_{spelling}", kw, (s.shape[0], *out), True, make)


def draw_pad(draw, s: State) -> Op:
    nd, sp = s.rank - 1, s.shape[1:]
    mode = draw(st.sampled_from(["constant", "reflect", "replicate", "circular"]))
    # F.pad may pad only the last dim of a 2-d map in constant mode; the other modes pad every spatial dim
    padded = sp if nd == 1 or mode != "constant" else sp[-draw(st.integers(1, 2)):]
    pads, out = [], list(s.shape)
    for i, n in enumerate(reversed(padded)):  # F.pad lists the last dim first
        hi_bound = {"constant": 3, "reflect": n - 1, "replicate": 3, "circular": n}[mode]
        lo_bound = -(n - 1) // 2 if mode == "constant" else 0  # negative pads crop
        a, b = draw(st.integers(lo_bound, hi_bound)), draw(st.integers(lo_bound, hi_bound))
        pads += [a, b]
        out[len(out) - 1 - i] = n + a + b
    value = draw(st.sampled_from([0.0, 0.5])) if mode == "constant" else None
    spellings = ["F", "F_kw"] + (["module"] if len(pads) == 2 * nd and min(pads) >= 0 else [])
    spelling = draw(st.sampled_from(spellings))
    modules = {"constant": (nn.ConstantPad1d, nn.ConstantPad2d), "reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d),
               "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d),
               "circular": (nn.CircularPad1d, nn.CircularPad2d)}
    pads = tuple(pads)

    def make():
        if spelling == "module":
            cls = modules[mode][nd - 1]
            return cls(pads, value) if mode == "constant" else cls(pads)
        if spelling == "F":
            return Lambda(lambda m, x: F.pad(x, pads, mode, value) if mode == "constant" else F.pad(x, pads, mode))
        return Lambda(lambda m, x: F.pad(x, pad=pads, mode=mode, **({"value": value} if mode == "constant" else {})))

    if min(out) < 1 or numel(out) > MAX_NUMEL:
        return draw_dropout(draw, s)
    return Op("pad", f"{mode}_{spelling}", dict(pad=pads, value=value), tuple(out), True, make)


def draw_repeat(draw, s: State) -> Op:
    r = s.rank
    reps = [draw(st.integers(1, 2)) for _ in range(r)]
    while numel(s.shape) * math.prod(reps) > MAX_NUMEL:
        reps[reps.index(max(reps))] = 1
    spelling = draw(st.sampled_from(["repeat", "repeat_tuple", "tile", "torch_tile"]
                                    + (["expand"] if 1 in s.shape else [])))
    out = tuple(n * k for n, k in zip(s.shape, reps))
    fresh = True
    if spelling == "expand":  # a view: size-1 dims grow
        sizes = [draw(st.sampled_from([-1, 2])) if n == 1 else draw(st.sampled_from([-1, n])) for n in s.shape]
        out = tuple(2 if n == 1 and k == 2 else n for n, k in zip(s.shape, sizes))
        make, args, fresh = (lambda: Lambda(lambda m, x: x.expand(x.shape[0], *sizes))), dict(sizes=sizes), False
        return Op("repeat", spelling, args, out, fresh, make, dense=False)
    else:
        fn = {"repeat": lambda m, x: x.repeat(1, *reps), "repeat_tuple": lambda m, x: x.repeat((1, *reps)),
              "tile": lambda m, x: x.tile((1, *reps)), "torch_tile": lambda m, x: torch.tile(x, (1, *reps))}[spelling]
        make, args = (lambda: Lambda(fn)), dict(reps=reps)
    return Op("repeat", spelling, args, out, fresh, make)


def draw_sum(draw, s: State) -> Op:
    op = draw_mean(draw, s)
    dim, keepdim = op.args["dim"], op.args["keepdim"]
    spelling = draw(st.sampled_from(["method", "torch", "torch_kw"]))
    fn = {"method": lambda m, x: x.sum(dim, keepdim=keepdim), "torch": lambda m, x: torch.sum(x, dim, keepdim),
          "torch_kw": lambda m, x: torch.sum(x, dim=dim, keepdim=keepdim)}[spelling]
    return Op("sum", spelling, op.args, op.out, True, lambda: Lambda(fn))


def draw_stack(draw, s: State) -> Op:
    r = s.rank
    d = draw(st.integers(1, r + 1))
    dim_arg = draw(st.sampled_from([d, d - r - 2]))
    out = list(s.shape)
    out.insert(d - 1, 2)
    spelling = draw(st.sampled_from(["self", "relu"]))
    fn = (lambda m, x: torch.stack([x, x], dim_arg)) if spelling == "self" else \
        (lambda m, x: torch.stack((F.relu(x), x), dim=dim_arg))
    return Op("stack", spelling, dict(dim=dim_arg), tuple(out), True, lambda: Lambda(fn))


def draw_move(draw, s: State) -> Op:
    """flip / roll / narrow / movedim / swapaxes / unsqueeze / squeeze."""
    r = s.rank
    kinds = ["flip", "roll", "narrow"] + (["movedim", "swapaxes"] if r >= 2 else []) + \
        (["unsqueeze"] if r <= 2 else []) + (["squeeze"] if 1 in s.shape and r >= 2 else [])
    kind = draw(st.sampled_from(kinds))
    d = draw(st.integers(1, r))
    dim = neg_dim(draw, d, r)
    out, fresh = list(s.shape), s.fresh
    if kind == "flip":
        fn, args, fresh = (lambda m, x: x.flip(dim)) if draw(st.booleans()) else \
            (lambda m, x: torch.flip(x, (dim,))), dict(dim=dim), True
    elif kind == "roll":
        shift = draw(st.integers(-3, 3))
        fn, args, fresh = (lambda m, x: torch.roll(x, shift, dim)), dict(shift=shift, dim=dim), True
    elif kind == "narrow":
        n = s.shape[d - 1]
        start = draw(st.integers(0, n - 1))
        length = draw(st.integers(1, n - start))
        fn, args = (lambda m, x: x.narrow(dim, start, length)), dict(dim=dim, start=start, length=length)
        out[d - 1] = length
    elif kind in ("movedim", "swapaxes"):
        e = draw(st.sampled_from([i for i in range(1, r + 1) if i != d]))
        if kind == "movedim":
            fn = (lambda m, x: x.movedim(dim, e)) if draw(st.booleans()) else (lambda m, x: torch.movedim(x, dim, e))
            moved = out.pop(d - 1)
            out.insert(e - 1, moved)
        else:
            fn = lambda m, x: x.swapaxes(dim, e)  # noqa: E731
            out[d - 1], out[e - 1] = out[e - 1], out[d - 1]
        args = dict(dims=(dim, e))
    elif kind == "unsqueeze":
        d = draw(st.integers(1, r + 1))
        fn, args = (lambda m, x: x.unsqueeze(d)), dict(dim=d)
        out.insert(d - 1, 1)
    else:
        d = draw(st.sampled_from([i + 1 for i, n in enumerate(s.shape) if n == 1]))
        fn, args = (lambda m, x: x.squeeze(d)), dict(dim=d)
        del out[d - 1]
    return Op(kind, "method", args, tuple(out), fresh, lambda: Lambda(fn),
              dense=False if kind in ("narrow", "movedim", "swapaxes", "squeeze", "unsqueeze") else None)


# ---------------------------------------------------------------------------------------------- the net strategy


def _spatial(s):
    return s.rank in (2, 3)


DRAWERS: dict[str, tuple[Callable, Callable[[State], bool]]] = {
    # kind -> (drawer, applies to this state?); listed simplest first (hypothesis shrinks towards the front)
    "activation": (draw_activation, lambda s: True),
    "constant": (draw_constant, lambda s: True),
    "identity": (draw_dropout, lambda s: True),
    "linear": (draw_linear, lambda s: True),
    "conv": (draw_conv, _spatial),
    "batch_norm": (draw_batch_norm, lambda s: s.rank <= 3 and (not s.train or s.batch * numel(s.shape[1:]) >= 2)),
    "max_pool": (draw_max_pool, _spatial),
    "avg_pool": (draw_avg_pool, lambda s: s.rank == 3 or s.rank == 2 and has_rule(nn.AvgPool1d)),
    "adaptive_pool": (draw_adaptive_pool, _spatial),
    "mean": (draw_mean, lambda s: s.rank >= 2),
    "residual": (draw_residual, lambda s: True),
    "broadcast": (draw_broadcast, lambda s: True),
    "split": (draw_split, lambda s: max(s.shape) >= 2),
    "cat": (draw_cat, lambda s: 2 * numel(s.shape) <= MAX_NUMEL),
    "index": (draw_index, lambda s: True),
    "reshape": (draw_reshape, lambda s: True),
}
if has_rule(F.interpolate, nn.Upsample):
    DRAWERS["interpolate"] = (draw_interpolate, _spatial)
if has_rule(F.pad, nn.ConstantPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.CircularPad2d):
    DRAWERS["pad"] = (draw_pad, _spatial)
if has_rule("repeat", "tile", torch.tile, "expand"):
    DRAWERS["repeat"] = (draw_repeat, lambda s: True)
if has_rule("sum", torch.sum):
    DRAWERS["sum"] = (draw_sum, lambda s: s.rank >= 2)
if has_rule(torch.stack):
    DRAWERS["stack"] = (draw_stack, lambda s: s.rank <= 2 and 2 * numel(s.shape) <= MAX_NUMEL)
if has_rule("flip", torch.flip, torch.roll, "narrow", "movedim", torch.movedim, "swapaxes", "unsqueeze", "squeeze"):
    DRAWERS["move"] = (draw_move, lambda s: True)


def op_kinds(s: State):
    return [k for k, (_, applies) in DRAWERS.items() if applies(s)]


@st.composite
def nets(draw, max_ops: int = 6) -> NetSpec:
    rank = draw(st.sampled_from([3, 2, 1]))  # 2-d maps, 1-d signals, vectors
    c = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 9 if rank == 3 else 16)) for _ in range(rank - 1)]
    batch = draw(st.integers(1, 3))
    classes = draw(st.integers(1, 4))
    train = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    s = State((c, *sizes), False, batch, train)  # the input is not fresh: in-place ops on it are not for autograd
    ops = []
    for _ in range(draw(st.integers(0, max_ops))):
        kind = draw(st.sampled_from(op_kinds(s)))
        op = DRAWERS[kind][0](draw, s)
        if numel(op.out) > MAX_NUMEL or len(op.out) > 3 or min(op.out) < 1:
            continue  # too big (or a generator bug, caught by test_generated_shapes): skip this op
        ops.append(op)
        s = State(op.out, op.fresh, batch, train, s.dense if op.dense is None else op.dense)
    ops += draw_head(draw, s, classes)
    return NetSpec(batch, (c, *sizes), classes, train, seed, ops)


def op_names(spec: NetSpec):
    """'kind.spelling' of every op (nested residual bodies too), for coverage statistics."""
    names = []
    for op in spec.ops:
        names.append(f"{op.kind}.{op.spelling}")
        for inner in op.args.get("body", []):
            names.append(f"{inner.kind}.{inner.spelling}")
    return names
