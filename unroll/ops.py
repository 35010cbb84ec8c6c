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
def unpool(q, indices, in_shape, nd=None):
    """Transpose of max pooling: each cotangent goes to its window's argmax; overlapping windows accumulate.
    `nd` spatial dims (default: all but batch and channel); an unbatched pool (C, *spatial), which pools a
    (B, features) tensor with the batch as channels, has one leading dim."""
    lead = len(in_shape) - nd if nd else 2
    plane = math.prod(in_shape[lead:])
    index = indices.flatten(lead).unsqueeze(1).expand(*q.shape[:lead + 1], -1)  # shared across classes, no copy
    out = q.new_zeros(*q.shape[:lead + 1], plane).scatter_add(lead + 1, index, q.flatten(lead + 1))
    return out.unflatten(lead + 1, tuple(in_shape[lead:]))


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


def _avg_pool(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    """avg_poolNd for N = 1, 2, 3 (1d through the 2d pool on a height-1 map: avg_pool1d has no divisor_override)."""
    nd = x.dim() - 2
    if nd == 1:
        y = F.avg_pool2d(x.unsqueeze(2), (1, *kernel_size), (1, *stride), (0, *padding), ceil_mode,
                         count_include_pad, divisor_override)
        return y.squeeze(2)
    return (F.avg_pool2d if nd == 2 else F.avg_pool3d)(x, kernel_size, stride, padding, ceil_mode,
                                                        count_include_pad, divisor_override)


@graph_op
def avg_pool_transpose(q, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override, in_shape):
    """Transpose of `avg_poolNd`: q / divisor, spread over each window by a depthwise all-ones transposed conv."""
    C, size = in_shape[1], tuple(in_shape[2:])
    if divisor_override:
        divisor = divisor_override
    else:  # the forward's per-window divisor, border windows included: (#valid inputs) / (their mean of ones)
        ones = q.new_ones(1, 1, *size)
        pool = functools.partial(_avg_pool, ones, kernel_size, stride, padding, ceil_mode, count_include_pad)
        divisor = pool(1) / pool(None)
    weight = q.new_ones(C, 1, *kernel_size)
    return conv_transpose(q / divisor, weight, stride, padding, (1,) * len(size), C, in_shape)


@graph_op
def mean_transpose(q, dims, keepdim, in_shape, divide=True):
    """Transpose of `x.mean(dims)` (or `x.sum(dims)`, divide=False): broadcast back (a view), divide by the count."""
    rank = len(in_shape)
    dims = sorted(d % rank for d in dims)
    if 0 in dims:
        raise RuntimeError("a reduction over the batch dimension; unroll needs every op to keep samples apart")
    if not keepdim:
        for d in dims:
            q = q.unsqueeze(d + 1)
    out = q.expand(*q.shape[:2], *in_shape[1:])
    return out / math.prod(in_shape[d] for d in dims) if divide else out


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


def _expand_ellipsis(index: tuple, rank: int) -> tuple:
    """`...` spelled out as the slices it stands for, so the batch dim's entry can be checked."""
    if not any(i is Ellipsis for i in index):
        return index
    at = next(n for n, i in enumerate(index) if i is Ellipsis)
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    return index[:at] + (slice(None),) * (rank - consumed) + index[at + 1:]


def _is_advanced(i) -> bool:
    return isinstance(i, (list, torch.Tensor)) or isinstance(i, tuple)


@graph_op
def slice_back(q, index, in_shape):
    """Transpose of `x[index]`: zeros of x's shape with q added where its entries came from. Basic indexing
    (ints, slices, None, ...) never repeats an entry: written in place. Advanced indexing (`x[:, [0, 0, 1]]`)
    can: each entry's flat position, then index_add, so repeats accumulate."""
    index = _expand_ellipsis(index if isinstance(index, tuple) else (index,), len(in_shape))
    if not index or index[0] != slice(None):
        raise RuntimeError(f"indexing {index} selects along the batch dimension; unroll needs samples kept apart")
    if not any(_is_advanced(i) for i in index):
        out = q.new_zeros(*q.shape[:2], *in_shape[1:])
        out[(slice(None),) + index] = q
        return out
    n = math.prod(in_shape[1:])
    where = torch.arange(n, device=q.device).view(1, *in_shape[1:])[index]
    if where.shape[0] != 1 or tuple(where.shape[1:]) != tuple(q.shape[2:]):
        raise RuntimeError(f"indexing {index} moves the batch dimension (advanced indices apart from each "
                           "other go first); unroll needs samples kept apart")
    out = q.new_zeros(*q.shape[:2], n).index_add(2, where.flatten(), q.flatten(2))
    return out.view(*q.shape[:2], *in_shape[1:])


def _feature_dim(dim: int, rank: int) -> int:
    """Encoder dim -> the same dim of a cotangent (which has the class dim in front of the features)."""
    dim = dim % rank
    if dim == 0:
        raise RuntimeError("this op works along the batch dimension; unroll needs every op to keep samples apart")
    return dim + 1


@graph_op
def join_parts(parts, indices, shapes, dim, stack=False):
    """Transpose of split/chunk/unbind: put the parts' cotangents back together; unused parts are zeros.
    `indices` are the parts' indices as the model wrote them; -1 is the last part, known only now."""
    n = len(shapes)
    full = [None] * n
    for i, p in zip(indices, parts):
        if not -n <= i < n:
            raise RuntimeError(f"part {i} of a split into {n} parts")
        i %= n
        full[i] = p if full[i] is None else full[i] + p
    ref = next(p for p in full if p is not None)
    full = [p if p is not None else ref.new_zeros(*ref.shape[:2], *s[1:]) for p, s in zip(full, shapes)]
    rank = len(shapes[0]) + (1 if stack else 0)
    return torch.stack(full, _feature_dim(dim, rank)) if stack else torch.cat(full, _feature_dim(dim, rank))


@graph_op
def unstack(q, dim):
    """Transpose of torch.stack: the stacked dim's slices, one per input."""
    return q.unbind(_feature_dim(dim, q.dim() - 1))


def _feature_dims(dims, rank: int) -> list[int]:
    return [_feature_dim(d, rank) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))]


@graph_op
def transpose_back(q, dim0, dim1):
    """Transpose of transpose(dim0, dim1): the same swap of feature dims (swapping the batch dim is refused)."""
    rank = q.dim() - 1
    return q.transpose(_feature_dim(dim0, rank), _feature_dim(dim1, rank))


@graph_op
def flip_back(q, dims):
    """Transpose of flip: the same flip (an involution)."""
    return q.flip(_feature_dims(dims, q.dim() - 1))


@graph_op
def roll_back(q, shifts, dims):
    """Transpose of roll: roll back by the opposite shifts."""
    if dims is None or (isinstance(dims, (tuple, list)) and not dims):
        raise RuntimeError("roll without dims rolls the flattened tensor, batch included; pass dims=")
    shifts = [-s for s in (shifts if isinstance(shifts, (tuple, list)) else (shifts,))]
    return q.roll(shifts, _feature_dims(dims, q.dim() - 1))


@graph_op
def movedim_back(q, source, destination):
    """Transpose of movedim(source, destination): move the dims back."""
    rank = q.dim() - 1
    return q.movedim(_feature_dims(destination, rank), _feature_dims(source, rank))


@graph_op
def narrow_back(q, dim, start, in_shape):
    """Transpose of narrow(dim, start, length): zeros of x's shape with q written into the window."""
    d = _feature_dim(dim, len(in_shape))
    out = q.new_zeros(*q.shape[:2], *in_shape[1:])
    out.narrow(d, start % in_shape[d - 1], q.shape[d]).copy_(q)
    return out


@graph_op
def split_back(q, shapes, dim):
    """Transpose of cat: cut q at the inputs' sizes along the concatenated dim."""
    dim = _feature_dim(dim, len(shapes[0]))
    return q.split([s[dim - 1] for s in shapes], dim)


@graph_op
def constant_broadcast(c, q, name: str):
    """`class_broadcast` for an operand the compiler found to have no batch dim (nothing of the input, nor its
    batch size, went into building it). Broadcasting would still pair a first dim of size B with the samples --
    and samples= would not subset it -- so a full-rank operand must have a size-1 first dim."""
    if isinstance(c, torch.Tensor) and c.dim() == q.dim() - 1 and c.shape[0] != 1:
        raise RuntimeError(
            f"unroll: the operand {name} has shape {tuple(c.shape)}: its first dim ({c.shape[0]}) meets the batch "
            "dim, but it was not built from the input or its batch size, so unroll cannot keep it per sample. "
            "Build it with the batch size (torch.ones((x.size(0), ...)), x.new_zeros(x.shape), "
            "torch.ones_like(x)) or give it a size-1 first dim.")
    return class_broadcast(c, q)


@graph_op
def class_broadcast(c, q):
    """An operand c of an elementwise op, ready to meet the cotangent q (B, K, ...): where c has as many dims as
    the op's output it has the batch dim in front (size B or 1), so the class dim goes after it; a c with fewer
    dims lines up with trailing feature dims and broadcasts as is."""
    if isinstance(c, torch.Tensor) and c.dim() == q.dim() - 1:
        return c.unsqueeze(1)
    return c


@graph_op
def expand_back(q, in_shape, out_shape):
    """Transpose of expand / expand_as / broadcasting: sum over the dims x was expanded along."""
    if len(in_shape) != len(out_shape) or in_shape[0] != out_shape[0]:
        raise RuntimeError(f"an expand from {tuple(in_shape)} to {tuple(out_shape)} moves or grows the batch "
                           "dimension; unroll needs every op to keep samples apart")
    return sum_to(q, in_shape)


@graph_op
def repeat_transpose(q, sizes, in_shape):
    """Transpose of `x.repeat(*sizes)` (and torch.tile): every tile's cotangent summed back onto x."""
    rank = len(in_shape)
    sizes = (1,) * (rank - len(sizes)) + tuple(sizes)  # tile pads its dims with 1s in front
    if len(sizes) != rank or sizes[0] != 1:
        raise RuntimeError(f"repeat{tuple(sizes)} of a {rank}-d tensor repeats or adds a batch dimension; unroll "
                           "needs every op to keep samples apart")
    split = [v for s, n in zip(sizes[1:], in_shape[1:]) for v in (s, n)]
    tiles = q.reshape(*q.shape[:2], *split)
    return tiles.sum(tuple(range(2, 2 + 2 * (rank - 1), 2)))


@graph_op
def padded_shape(in_shape, pad):
    """x's shape after F.pad(x, pad) (pad lists (low, high) per dim from the last one)."""
    shape = list(in_shape)
    for i in range(len(pad) // 2):
        shape[-1 - i] += pad[2 * i] + pad[2 * i + 1]
    return shape


def _pad_source(t: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """For positions t (relative to x's first entry, outside [0, n) in the padding) the entry of x they copy."""
    if mode == "replicate":
        return t.clamp(0, n - 1)
    if mode == "circular":
        return t.remainder(n)
    if mode == "reflect":  # mirror without repeating the edge: period 2 (n - 1)
        period = 2 * (n - 1)
        if period == 0:
            return t.clamp(0, 0)
        t = t.remainder(period)
        return torch.where(t >= n, period - t, t)
    raise RuntimeError(f"padding mode {mode!r}")


@graph_op
def pad_transpose(q, pad, mode, in_shape):
    """Transpose of F.pad(x, pad, mode). Constant padding: crop q (negative pads, which crop, become zero pads).
    reflect / replicate / circular copy entries of x into the border, dim by dim: their transpose adds each
    border entry's cotangent back onto the entry it copies (index_add along that dim), the same dims in turn."""
    if len(pad) // 2 >= len(in_shape):
        raise RuntimeError(f"padding {tuple(pad)} of a {len(in_shape)}-d tensor pads the batch dimension")
    if mode == "constant":
        return F.pad(q, [-p for p in pad])
    for i in range(len(pad) // 2):
        d, n, lo = q.dim() - 1 - i, in_shape[len(in_shape) - 1 - i], pad[2 * i]
        source = _pad_source(torch.arange(q.shape[d], device=q.device) - lo, n, mode)
        q = q.new_zeros(*q.shape[:d], n, *q.shape[d + 1:]).index_add(d, source, q)
    return q


_UPSAMPLE_BACKWARD = {
    ("nearest", 1): "upsample_nearest1d_backward", ("nearest", 2): "upsample_nearest2d_backward",
    ("nearest", 3): "upsample_nearest3d_backward", ("nearest-exact", 1): "_upsample_nearest_exact1d_backward",
    ("nearest-exact", 2): "_upsample_nearest_exact2d_backward",
    ("nearest-exact", 3): "_upsample_nearest_exact3d_backward", ("linear", 1): "upsample_linear1d_backward",
    ("bilinear", 2): "upsample_bilinear2d_backward", ("bicubic", 2): "upsample_bicubic2d_backward",
    ("trilinear", 3): "upsample_trilinear3d_backward", ("bilinear-aa", 2): "_upsample_bilinear2d_aa_backward",
    ("bicubic-aa", 2): "_upsample_bicubic2d_aa_backward",
}


def interpolate_modes() -> set[str]:
    return {mode for mode, _ in _UPSAMPLE_BACKWARD} | {"area"}


@graph_op
def interpolate_transpose(q, in_shape, mode, align_corners, scales, antialias):
    """Transpose of F.interpolate / nn.Upsample: the very adjoint autograd uses (aten's upsample_*_backward, a
    linear map with its own derivative, so training through it works), on the classes folded into the batch.
    `scales` are the scale factors F.interpolate passes on (None when it computed the size)."""
    qf = _fold(q)
    nd = qf.dim() - 2
    if mode == "area":  # F.interpolate's area mode is adaptive average pooling to the output size
        return adaptive_avg_pool_transpose(q, in_shape)
    name = _UPSAMPLE_BACKWARD.get((mode + ("-aa" if antialias else ""), nd))
    if name is None:
        raise RuntimeError(f"interpolate mode {mode!r} (antialias={antialias}) on {nd} spatial dims")
    if scales is None:
        scales = [None] * nd
    elif not isinstance(scales, (tuple, list)):
        scales = [scales] * nd  # a scalar scale factor acts on every spatial dim, as in F.interpolate
    sizes = (list(qf.shape[2:]), [qf.shape[0], qf.shape[1], *in_shape[2:]])
    fn = getattr(torch.ops.aten, name)
    if mode.startswith("nearest"):
        out = fn(qf, *sizes, *scales)
    else:
        out = fn(qf, *sizes, bool(align_corners), *scales)
    return out.unflatten(0, q.shape[:2])


@graph_op
def conv_adjoint(q, weight, stride, padding, dilation, groups):
    """Transpose of `conv_transposeNd(x, weight, ...)`: the convolution with the same weight and settings (its
    output_padding only added rows the convolution does not reach)."""
    fn = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
    return fn(_fold(q), weight, None, stride, padding, dilation, groups).unflatten(0, q.shape[:2])


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


def cast_source(x, y):
    """What the transpose of a cast needs: x's dtype and device (the cotangent goes back to them)."""
    if not y.is_floating_point():
        raise RuntimeError(f"unroll: a cast of an input-dependent tensor to {y.dtype} (no gradient flows through it)")
    return x.dtype, x.device


@graph_op
def cast_back(q, source):
    dtype, device = source
    return q.to(device=device, dtype=dtype)


@graph_op
def masked(q, condition, keep: bool):
    """The transpose of one side of torch.where(condition, a, b): q where that side was chosen, else 0."""
    zero = q.new_zeros(())
    return torch.where(condition, q, zero) if keep else torch.where(condition, zero, q)


def clamp_gate(z, lo, hi):
    """The gate of clamp(z, lo, hi) as autograd defines it: lo < z < hi, bounds excluded (None: no bound)."""
    gate = torch.ones_like(z, dtype=torch.bool)
    if lo is not None:
        gate &= z > lo
    if hi is not None:
        gate &= z < hi
    return gate


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


def functional_batch_norm_scale(z, running_var, weight, training, eps):
    """`batch_norm_scale` for F.batch_norm: batch variance (held constant) in training, else the running one."""
    if training:
        dims = [0] + list(range(2, z.dim()))
        var = z.detach().var(dim=dims, unbiased=False)
    else:
        var = running_var
    scale = torch.rsqrt(var + eps)
    return scale if weight is None else weight * scale


def batch_operand(c: torch.Tensor, partner: torch.Tensor) -> torch.Tensor:
    """An operand computed from the input's values (a mask `y > 0.1`), kept per sample for the decoder: it must
    line up with the active operand's batch dim, so that `samples=` can select its rows. Size-1 batch dims are
    expanded (a view) to the batch size for that selection."""
    if not isinstance(c, torch.Tensor):
        return c
    B = partner.shape[0]
    if c.dim() != partner.dim() or c.shape[0] not in (1, B):
        raise RuntimeError(
            f"unroll: an operand computed from the input has shape {tuple(c.shape)} next to the input-dependent "
            f"operand's {tuple(partner.shape)}: its first dim is not the batch, so broadcasting mixes samples. "
            "Give it the batch dim in front (e.g. keepdim=True, or unsqueeze).")
    return c.expand(B, *c.shape[1:]) if c.shape[0] != B else c


def dropout_mask(x: torch.Tensor, p: float, training: bool, channels: bool = False):
    """Dropout that also returns what the decoder needs: the keep-mask (None in eval: identity). `channels`:
    Dropout1d/2d/3d, one keep-bit per (sample, channel), broadcast over the map."""
    if not training or p == 0:
        return x, None
    shape = (*x.shape[:2], *[1] * (x.dim() - 2)) if channels else x.shape
    mask = x.new_empty(shape, dtype=torch.bool).bernoulli_(1 - p)
    return x * mask / (1 - p), mask


def module_dropout(x: torch.Tensor, module: torch.nn.Module):
    """`dropout_mask` reading p and train/eval from the live module, so `.train()` / `.eval()` still act.
    Dropout1d/2d/3d drop whole channels: one keep-bit per (sample, channel), broadcast over the map."""
    if not module.training or module.p == 0:
        return x, None
    if type(module) is torch.nn.Dropout:
        return dropout_mask(x, module.p, True)
    if isinstance(module, (torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d)):
        return dropout_mask(x, module.p, True, channels=True)
    raise RuntimeError(f"unroll: {type(module).__name__} in train mode is not unrolled (its affine noise is not a "
                       "mask); call .eval(), or use nn.Dropout")


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
