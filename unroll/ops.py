"""The few tensor operations the emitted graphs call that torch does not spell directly.

Decoder convention: a cotangent `q` has shape (B, K, *feature) where the encoder tensor has (B, *feature):
the classes live in a second batch dimension, so gates and indices (B, *feature) broadcast with `unsqueeze(1)`
and nothing is copied per class.

Every function here is a `graph_op`: called on fx Proxies (while a rule emits the decoder) it records one
readable call node instead of being traced through; called on tensors it just runs.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F


def graph_op(fn):
    """Make `fn` a single opaque node when called with fx Proxies (like `torch.fx.wrap`, but for any graph)."""

    @functools.wraps(fn)
    def op(*args, **kwargs):
        for a in (*args, *kwargs.values()):
            for leaf in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(leaf, fx.Proxy):
                    return leaf.tracer.create_proxy("call_function", op, args, kwargs)
        return fn(*args, **kwargs)

    return op


def _fold(q: torch.Tensor) -> torch.Tensor:
    return q.flatten(0, 1)  # (B, K, ...) -> (B*K, ...): a view, classes become batch entries


def _same_padding(kernel: Sequence[int], dilation: Sequence[int]) -> list[tuple[int, int]]:
    # torch's padding="same": total d*(k-1), the odd pixel goes to the end
    out = []
    for k, d in zip(kernel, dilation):
        total = d * (k - 1)
        out.append((total // 2, total - total // 2))
    return out


@graph_op
def conv_transpose(q, weight, stride, padding, dilation, groups, in_shape):
    """The transpose of `convNd(x, weight, stride, padding, dilation, groups)` applied to q: d/dx of <q, conv(x)>.

    Uses the very same `weight` (conv_transpose flips it spatially and swaps in/out channels by definition).
    `in_shape` is x's shape; it decides `output_padding`, which strides can make ambiguous.
    """
    nd = weight.dim() - 2
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    kernel = weight.shape[2:]
    size = tuple(in_shape[2:])
    o = q.shape[3:]
    if isinstance(padding, str):
        pads = [(0, 0)] * nd if padding == "valid" else _same_padding(kernel, dilation)
    else:
        pads = [(p, p) for p in padding]
    natural = [(oi - 1) * s - lo - hi + d * (k - 1) + 1 for oi, s, (lo, hi), d, k in zip(o, stride, pads, dilation, kernel)]
    extra = [n - nat for n, nat in zip(size, natural)]
    symmetric = all(lo == hi for lo, hi in pads)
    if symmetric and all(0 <= e < max(s, d) for e, s, d in zip(extra, stride, dilation)):
        y = fn(_fold(q), weight, None, stride, [lo for lo, _ in pads], extra, groups, dilation)
    else:
        # Asymmetric padding (padding='same' with even kernels) or a window past the end (ceil_mode pools):
        # transpose without padding, then crop/zero-pad to exactly x's extent.
        y = fn(_fold(q), weight, None, stride, 0, 0, groups, dilation)
        crop = []
        for (lo, _), n, full in zip(reversed(pads), reversed(size), reversed(y.shape[2:])):
            crop += [-lo, n + lo - full]
        y = F.pad(y, crop)
    return y.unflatten(0, q.shape[:2])


@graph_op
def unpool(q, indices, in_shape):
    """Transpose of max pooling: each cotangent goes to its window's argmax; overlapping windows accumulate."""
    B, K, C = q.shape[:3]
    plane = math.prod(in_shape[2:])
    index = indices.flatten(2).unsqueeze(1).expand(B, K, C, -1)  # shared across classes, no copy
    out = q.new_zeros(B, K, C, plane).scatter_add(3, index, q.flatten(3))
    return out.unflatten(3, tuple(in_shape[2:]))


def _adaptive_pool_matrix(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    # Row j averages x[floor(j*n_in/n_out) : ceil((j+1)*n_in/n_out)] -- torch's adaptive windows.
    m = like.new_zeros(n_out, n_in)
    for j in range(n_out):
        lo, hi = (j * n_in) // n_out, -((-(j + 1) * n_in) // n_out)
        m[j, lo:hi] = 1.0 / (hi - lo)
    return m


@graph_op
def adaptive_avg_pool_transpose(q, in_shape):
    """Transpose of adaptive average pooling to q's spatial size (global average pooling when that is 1x1)."""
    size = tuple(in_shape[2:])
    if all(o == 1 for o in q.shape[3:]):
        return q.expand(*q.shape[:3], *size) / math.prod(size)  # a broadcast view: nothing materialised
    if len(size) == 1:
        return q @ _adaptive_pool_matrix(size[0], q.shape[3], q)
    mh = _adaptive_pool_matrix(size[0], q.shape[3], q)
    mw = _adaptive_pool_matrix(size[1], q.shape[4], q)
    return mh.t() @ q @ mw  # out = Mh x Mw^T per plane, so its transpose is Mh^T q Mw


@graph_op
def avg_pool_transpose(q, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, in_shape):
    """Transpose of `avg_pool2d`: q / divisor, spread over each window by a depthwise all-ones transposed conv."""
    C, size = in_shape[1], tuple(in_shape[2:])
    pool = functools.partial(F.avg_pool2d, kernel_size=kernel_size, stride=stride, padding=padding, ceil_mode=ceil_mode,
                             count_include_pad=count_include_pad)
    if divisor_override:
        divisor = divisor_override
    else:  # the forward's per-window divisor, border windows included: (#valid inputs) / (their mean of ones)
        ones = q.new_ones(1, 1, *size)
        divisor = pool(ones, divisor_override=1) / pool(ones)
    weight = q.new_ones(C, 1, *kernel_size)
    return conv_transpose(q / divisor, weight, stride, padding, (1, 1), C, in_shape)


@graph_op
def mean_transpose(q, dims, keepdim, in_shape):
    """Transpose of `x.mean(dims)`: broadcast back (a view) and divide by the count."""
    rank = len(in_shape)
    dims = sorted(d % rank for d in dims)
    if not keepdim:
        for d in dims:
            q = q.unsqueeze(d + 1)
    size = math.prod(in_shape[d] for d in dims)
    return q.expand(*q.shape[:2], *in_shape[1:]) / size


@graph_op
def sum_to(q, in_shape):
    """Fan-out through a broadcasting op: sum q over the dims that x was broadcast along."""
    if tuple(q.shape[2:]) == tuple(in_shape[1:]):
        return q
    return q.sum_to_size(*q.shape[:2], *in_shape[1:])


@graph_op
def reshape_back(q, in_shape, out_shape):
    """Transpose of view/reshape/flatten: the same elements, back in x's shape (the batch dim must not move)."""
    if in_shape[0] != out_shape[0]:
        raise RuntimeError(f"a reshape from {tuple(in_shape)} to {tuple(out_shape)} mixes the batch dimension; "
                           "unroll needs every op to keep samples apart")
    return q.reshape(*q.shape[:2], *in_shape[1:])


@graph_op
def slice_back(q, index, in_shape):
    """Transpose of `x[index]`: zeros of x's shape with q written where the slice came from."""
    index = index if isinstance(index, tuple) else (index,)
    if not index or index[0] != slice(None):
        raise RuntimeError(f"indexing {index} selects along the batch dimension; unroll needs samples kept apart")
    out = q.new_zeros(*q.shape[:2], *in_shape[1:])
    out[(slice(None),) + index] = q
    return out


def _feature_dim(dim: int, rank: int) -> int:
    """Encoder dim -> the same dim of a cotangent (which has the class dim in front of the features)."""
    dim = dim % rank
    if dim == 0:
        raise RuntimeError("this op works along the batch dimension; unroll needs every op to keep samples apart")
    return dim + 1


@graph_op
def join_parts(parts, shapes, dim, stack=False):
    """Transpose of split/chunk/unbind: put the parts' cotangents back together; unused parts are zeros."""
    parts = list(parts) + [None] * (len(shapes) - len(parts))
    ref = next(p for p in parts if p is not None)
    parts = [p if p is not None else ref.new_zeros(*ref.shape[:2], *s[1:]) for p, s in zip(parts, shapes)]
    rank = len(shapes[0]) + (1 if stack else 0)
    return torch.stack(parts, _feature_dim(dim, rank)) if stack else torch.cat(parts, _feature_dim(dim, rank))


@graph_op
def split_back(q, shapes, dim):
    """Transpose of cat: cut q at the inputs' sizes along the concatenated dim."""
    dim = _feature_dim(dim, len(shapes[0]))
    return q.split([s[dim - 1] for s in shapes], dim)


@graph_op
def scale_out_channels(weight, scale):
    """A conv weight (out, in / groups, *k) with each output channel scaled: BN folded into the tied weight."""
    return weight * scale.view(-1, *[1] * (weight.dim() - 1))


@graph_op
def channel_scale(q, scale):
    """q * scale[c] for a per-channel scale (dim 2 of a cotangent)."""
    return q * scale.view(-1, *[1] * (q.dim() - 3))


# ---------------------------------------------------------------- encoder-side helpers


def part_shapes(parts):
    return [p.shape for p in parts]


def inside(a, lo, hi):
    """The gate of clamp(z, lo, hi), read off its output: lo < a < hi iff lo < z < hi."""
    return (a > lo) & (a < hi)


def batch_norm_scale(z: torch.Tensor, bn: torch.nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """d bn(z) / dz per channel: gamma / sqrt(var + eps).

    Eval mode uses the running variance. Train mode (or no running stats) uses this batch's variance, *held
    constant*: the heatmap is then the gradient with the batch statistics frozen, not autograd's gradient through
    them (which would couple samples in the batch).
    """
    if bn.training or bn.running_var is None:
        dims = [0] + list(range(2, z.dim()))
        var = z.detach().var(dim=dims, unbiased=False)
    else:
        var = bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    return scale if bn.weight is None else bn.weight * scale


def dropout_mask(x: torch.Tensor, p: float, training: bool):
    """Dropout that also returns what the decoder needs: the scaled keep-mask (None in eval: identity)."""
    if not training or p == 0:
        return x, None
    mask = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
    return x * mask / (1 - p), mask


def module_dropout(x: torch.Tensor, module: torch.nn.Module):
    """`dropout_mask` reading p and train/eval from the live module, so `.train()` / `.eval()` still act."""
    return dropout_mask(x, module.p, module.training)


@graph_op
def dropout_back(q, mask, p):
    return q if mask is None else q * mask.unsqueeze(1) / (1 - p)


def stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps * sign(z), with sign(0) = +1 (zennit's convention)."""
    return z + eps * ((z >= 0).to(z.dtype) * 2 - 1)


def epsilon_ratio(a: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """LRP-epsilon in gradient form: the cotangent at layer output z is scaled by f(z) / (z + eps sign z)."""
    return a / stabilize(z, eps)


@graph_op
def skip_multiply(q, x):
    """The heatmap: sum over input channels of x * d logit_k / dx (input x gradient = LRP-0)."""
    return (q * x.unsqueeze(1)).sum(2)
