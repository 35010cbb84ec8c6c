"""Attribution maps for weakly supervised segmentation: CAM, gradient saliency, input x gradient, and stochastic
aggregations of saliency over perturbed copies of the input.

Tensors in, tensors out. Every method returns maps for **all classes at once** (or the classes asked for):

    classes=None                  every class:                           (B, K, H, W)
    classes=[3, 7] (1-D)          the same classes for every image:      (B, 2, H, W)  (in the order given)
    classes=mask (B, K) bool      per-image classes (e.g. image labels): (B, K, H, W), zero maps where mask is False

Gradients come from the unrolled decoder (`unroll.compile`): one pass gives d logit_k / d x for every requested class,
so an aggregation over 50-140 perturbed copies is a few batched encoder + decoder passes (`batch_size` copies at a
time, copies of several images share a pass), never a loop of backward calls. `net` may be an `Unrolled` module or a
plain classifier (compiled once and cached). Put the model in eval mode first (batch norm must not use the statistics
of a batch of perturbed copies).

Maps:
    cam(model, x)        w_c^T A at the last feature map A (the input of the global average pool that feeds the final
                         Linear), ReLU, divided by its max per (image, class), upsampled bilinearly to the input.
    saliency(net, x)     |d S_c / d x|, max over input channels.
    ixg(net, x)          the unrolled heatmaps sum_ch x * d S_c / d x (signed).

Aggregations of saliency (all: n samples, `batch_size`, `generator` (a torch.Generator or an int seed; default seed
0), so the same call gives the same maps bit for bit, whatever `batch_size`):
    smoothgrad           mean saliency over x + N(0, (sigma * (max x - min x))^2), per-image input range
    binary_mask          mean saliency over x * m, m ~ Bernoulli(p) per pixel (shared by the channels), p = keep
    random_crops         n crops (area fraction U(scale), the image's aspect ratio, uniform position), each resized
                         to the input size; its saliency resized back and pasted at the crop, weighted by
                         sigmoid(crop's class score); every pixel averaged over the crops that cover it (0 where none)
    random_patches       mean saliency over inputs whose grid x grid patches are each dropped (set to `fill`) with
                         probability 1 - p
    discriminative_crops random crops, each kept with probability clamp(beta - CAM score, 0, 1), CAM score = mean of
                         the guide CAM over the crop; rejected crops are never run
    discriminative_patches  patches dropped with probability clamp(alpha * CAM score, 0, 1), CAM score = mean guide
                         CAM over the patch
The guide CAM of the discriminative methods is one map per image, shared by all classes (so one perturbed input
serves every class): the pixelwise max of the normalised CAMs of the `guide` classes ((B, K) bool; default: each
image's top-1 predicted class), or a (B, H, W) map given directly.

`perturb(x, kind, generator)` is the same noise as a training-time transform ("model-pert" fine-tuning).
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .compiler import Compiled, LiveGraph, Unrolled
from .compiler import compile as compile_
from .compiler import _reroot, _Snapshot, _snapshot, trace
from .errors import UnsupportedModelError, describe

__all__ = [
    "cam", "saliency", "ixg", "smoothgrad", "binary_mask", "random_crops", "random_patches",
    "discriminative_crops", "discriminative_patches", "perturb", "Perturb", "guide_map", "normalize_maps",
    "METHODS", "AGGREGATIONS",
]

# ------------------------------------------------------------------------------------------------------ helpers


def _generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(0 if generator is None else int(generator))


# model -> its compiled graphs. The graphs hold the model weakly (Compiled / LiveGraph), so an entry never keeps its
# key alive: the cache forgets a model when the model is freed.
_NETS: "weakref.WeakKeyDictionary[nn.Module, Compiled]" = weakref.WeakKeyDictionary()


def _as_net(net: nn.Module) -> Unrolled:
    """An Unrolled module: `net` itself, or `net` compiled once (cached per model object; compiled again if a
    submodule was replaced since)."""
    if isinstance(net, Unrolled):
        return net
    compiled = _NETS.get(net)
    if compiled is None or compiled.stale(net) is not None:
        compiled = _NETS[net] = compile_(net).compiled
    return Unrolled(net, compiled)


def _model_of(net: nn.Module) -> nn.Module:
    return net.model if isinstance(net, Unrolled) else net


@dataclass(frozen=True)
class _Selection:
    """Which classes to compute per image. per_image: None (one `shared` list or all) or a list of index lists."""

    K: int
    shared: tuple[int, ...] | None  # None = all classes
    per_image: list[tuple[int, ...]] | None

    def of(self, i: int) -> tuple[int, ...] | None:
        return self.per_image[i] if self.per_image is not None else self.shared

    def width(self) -> int:
        """The class dimension of the output."""
        if self.per_image is not None or self.shared is None:
            return self.K
        return len(self.shared)

    def slots(self, i: int) -> list[int] | slice:
        """Where image i's computed classes go in the output's class dimension."""
        if self.per_image is not None:
            return list(self.per_image[i])
        return slice(None)


def _select(classes, B: int, K: int) -> _Selection:
    if classes is None:
        return _Selection(K, None, None)
    if isinstance(classes, Tensor) and classes.dim() == 2:
        if tuple(classes.shape) != (B, K):
            raise ValueError(f"a per-image class mask must be (B, K) = ({B}, {K}), got {tuple(classes.shape)}")
        mask = classes.bool().cpu()
        return _Selection(K, None, [tuple(int(k) for k in torch.nonzero(row).flatten()) for row in mask])
    ks = tuple(int(k) for k in (classes.flatten().tolist() if isinstance(classes, Tensor) else classes))
    if any(not 0 <= k < K for k in ks):
        raise ValueError(f"classes {ks} out of range for {K} classes")
    return _Selection(K, ks, None)


def _num_classes(net: Unrolled, x: Tensor) -> int:
    with torch.no_grad():
        return net.encode(x[:1])[0].shape[1]


def saliency_of(gradients: Tensor) -> Tensor:
    """(B, K, C, H, W) input gradients -> (B, K, H, W) saliency: |gradient|, max over channels."""
    return gradients.abs().amax(2)


def normalize_maps(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """ReLU, then divide by the max over the spatial dims of each (image, class) map; all-zero maps stay zero."""
    maps = maps.clamp_min(0)
    peak = maps.flatten(-2).amax(-1)[..., None, None]
    return maps / peak.clamp_min(eps)


# ------------------------------------------------------------------------------------------------------ the engine


@dataclass
class _Job:
    """n perturbed copies of one image. `consume(lo, hi, logits, sal)` gets rows lo:hi of the copies' logits (all K
    classes) and saliency (only `classes`, (hi - lo, K', H, W))."""

    inputs: Tensor
    classes: tuple[int, ...] | None
    consume: Callable[[int, int, Tensor, Tensor], None]


def _run(net: Unrolled, jobs: Iterable[_Job], batch_size: int) -> None:
    """Feed the jobs' copies through encoder + gradient decoder, `batch_size` copies per encoder pass (copies of
    consecutive jobs share a pass); one decoder pass per distinct class list in the batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[tuple[_Job, int, int]] = []
    filled = 0

    def flush():
        nonlocal pending, filled
        if not pending:
            return
        x = torch.cat([job.inputs[lo:hi] for job, lo, hi in pending])
        logits, saved = net.encode(x)
        offsets, start = [], 0
        for job, lo, hi in pending:
            offsets.append(start)
            start += hi - lo
        groups: dict[tuple[int, ...] | None, list[int]] = {}
        for j, (job, _, _) in enumerate(pending):
            groups.setdefault(job.classes, []).append(j)
        for cls, members in groups.items():
            if len(members) == len(pending):
                rows = None
            else:
                rows = torch.cat([torch.arange(offsets[j], offsets[j] + pending[j][2] - pending[j][1])
                                  for j in members]).to(x.device)
            sal = saliency_of(net.decode(logits, saved, classes=cls, samples=rows, gradients=True))
            at = 0
            for j in members:
                job, lo, hi = pending[j]
                m = hi - lo
                job.consume(lo, hi, logits[offsets[j]:offsets[j] + m], sal[at:at + m])
                at += m
        pending, filled = [], 0

    with torch.no_grad():
        for job in jobs:
            n, lo = len(job.inputs), 0
            while lo < n:
                take = min(n - lo, batch_size - filled)
                pending.append((job, lo, lo + take))
                filled += take
                lo += take
                if filled == batch_size:
                    flush()
        flush()


def _aggregate(net, x: Tensor, classes, batch_size: int,
               plan: Callable[[int, Tensor, tuple[int, ...] | None, Tensor], tuple[Tensor, Callable, Callable]]
               ) -> Tensor:
    """Shared driver. plan(i, x_i, classes_i, out_i) -> (inputs (n, C, H, W), consume, finish): consume accumulates a
    slice of results; finish() returns image i's (K', H, W) maps (written into the output at its class slots)."""
    net = _as_net(net)
    B = x.shape[0]
    sel = _select(classes, B, _num_classes(net, x))
    out = x.new_zeros(B, sel.width(), *x.shape[2:])
    finishers: list[tuple[int, Callable]] = []

    def jobs() -> Iterator[_Job]:
        for i in range(B):
            cls = sel.of(i)
            if cls is not None and len(cls) == 0:
                continue
            inputs, consume, finish = plan(i, x[i], cls, out)
            finishers.append((i, finish))
            if len(inputs):
                yield _Job(inputs, cls, consume)

    _run(net, jobs(), batch_size)
    for i, finish in finishers:
        out[i, sel.slots(i)] = finish()
    return out


class _Mean:
    """Running sum of saliency over copies -> mean."""

    def __init__(self, n: int):
        self.n, self.total = n, None

    def consume(self, lo, hi, logits, sal):
        s = sal.sum(0)
        self.total = s if self.total is None else self.total + s

    def finish(self):
        return self.total / self.n


# ------------------------------------------------------------------------------------------------------ plain maps


def saliency(net: nn.Module, x: Tensor, classes=None, batch_size: int = 64) -> Tensor:
    """|d S_c / d x|, max over input channels: (B, K', H, W) (see the module docstring for `classes`)."""
    def plan(i, xi, cls, out):
        acc = _Mean(1)
        return xi[None], acc.consume, acc.finish
    return _aggregate(net, x, classes, batch_size, plan)


def ixg(net: nn.Module, x: Tensor, classes=None) -> Tensor:
    """Input x gradient, the unrolled heatmaps sum_ch x_ch * d S_c / d x_ch (signed): (B, K', H, W)."""
    net = _as_net(net)
    sel = _select(classes, x.shape[0], _num_classes(net, x))
    with torch.no_grad():
        # a per-image mask: one decoder pass, zero maps for the classes an image did not ask for
        return net(x, classes=sel.shared if sel.per_image is None else classes.bool()).heatmaps


# ------------------------------------------------------------------------------------------------------ CAM


@dataclass
class CamHead:
    """Where CAM reads a model: `extractor(x) -> (features A (B, C, h, w), logits (B, K))` (a graph reading the live
    model, held weakly), and `weight(model)` the final Linear's (K, C) weight, read live from the model."""

    extractor: LiveGraph
    weight_path: str
    feature_node: str
    linear_node: str
    snapshot: _Snapshot  # the submodules it calls: a head whose model changed under it is found again

    def weight(self, model: nn.Module) -> Tensor:
        return operator.attrgetter(self.weight_path)(model)


_TRANSPARENT_MODULES = (nn.Flatten, nn.Dropout, nn.Identity)
_TRANSPARENT_FUNCS = {torch.flatten, F.dropout, torch.squeeze, torch.reshape}
_TRANSPARENT_METHODS = {"flatten", "view", "reshape", "squeeze", "contiguous"}
_CAM_HEADS: "weakref.WeakKeyDictionary[nn.Module, CamHead]" = weakref.WeakKeyDictionary()


def _is_global_pool(node: fx.Node, model: nn.Module) -> bool:
    one = (1, (1, 1), [1, 1])
    if node.op == "call_module":
        m = model.get_submodule(node.target)
        return isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in one
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
        return size in one
    if (node.op == "call_function" and node.target is torch.mean) or (node.op == "call_method"
                                                                       and node.target == "mean"):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = set(dim) if isinstance(dim, (tuple, list)) else {dim}
        return dims in ({2, 3}, {-1, -2})
    return False


def _is_transparent(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), _TRANSPARENT_MODULES)
    if node.op == "call_function":
        return node.target in _TRANSPARENT_FUNCS
    return node.op == "call_method" and node.target in _TRANSPARENT_METHODS


def cam_head(model: nn.Module) -> CamHead:
    """Find the CAM layers of a model ending global-average-pool -> (flatten/view/dropout) -> Linear, by torch.fx:
    the feature map is the pool's input, the weight the Linear's. Cached per model object."""
    head = _CAM_HEADS.get(model)
    if head is not None and head.snapshot.stale(model) is None:
        return head
    graph = trace(model)
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0]
    if not isinstance(logits, fx.Node):
        raise UnsupportedModelError("CAM needs a model whose forward() returns the (B, K) logits tensor")
    if logits.op == "call_module" and isinstance(model.get_submodule(logits.target), nn.Linear):
        weight_path = f"{logits.target}.weight"
    elif logits.op == "call_function" and logits.target is F.linear:
        w = logits.kwargs.get("weight", logits.args[1] if len(logits.args) > 1 else None)
        if not (isinstance(w, fx.Node) and w.op == "get_attr"):
            raise UnsupportedModelError(f"CAM: the final linear's weight is not a model attribute "
                                        f"({describe(logits, model)})")
        weight_path = w.target
    else:
        raise UnsupportedModelError(
            f"CAM needs the logits to come from a final Linear layer; they come from {describe(logits, model)}")
    node = logits.args[0]
    while isinstance(node, fx.Node) and _is_transparent(node, model):
        node = node.args[0]
    if not (isinstance(node, fx.Node) and _is_global_pool(node, model)):
        found = describe(node, model) if isinstance(node, fx.Node) else repr(node)
        raise UnsupportedModelError(
            "CAM needs global average pooling -> (flatten) -> Linear at the end of the model (ResNet, SmallVGG, "
            f"PlainConvNet); the Linear's input comes from {found}")
    features = node.args[0]
    output.args = ((features, logits),)
    snapshot = _snapshot(model, [graph])
    head = CamHead(LiveGraph(model, _reroot(graph), "CamExtractor"), weight_path, features.name, logits.name, snapshot)
    _CAM_HEADS[model] = head
    return head


def cam(model: nn.Module, x: Tensor, classes=None, upsample: bool = True, normalize: bool = True) -> Tensor:
    """Class activation maps (B, K', H, W): relu(w_c^T A) at the last feature map A, divided by its max per (image,
    class) at feature resolution (0 where it is all zero), then bilinearly upsampled to the input size
    (align_corners=False; interpolation never exceeds the max, so maps stay in [0, 1]). No bias term.
    normalize=False: the raw w_c^T A (no ReLU, no division). `model`: the classifier or its Unrolled module."""
    model = _model_of(model)
    head = cam_head(model)
    with torch.no_grad():
        feats, logits = head.extractor(x)
        W = head.weight(model).to(feats.dtype)
        sel = _select(classes, x.shape[0], logits.shape[1])
        ks = sel.shared if sel.per_image is None else sorted({k for c in sel.per_image for k in c})
        Wk = W if ks is None else W[list(ks)]
        maps = torch.einsum("kc,bchw->bkhw", Wk, feats)
        if normalize:
            maps = normalize_maps(maps)
        if upsample and maps.shape[-2:] != x.shape[-2:]:
            maps = F.interpolate(maps, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if sel.per_image is None:
            return maps
        out = maps.new_zeros(x.shape[0], sel.K, *maps.shape[-2:])
        for i, cls in enumerate(sel.per_image):
            for k in cls:
                out[i, k] = maps[i, ks.index(k)]
        return out


def guide_map(model: nn.Module, x: Tensor, guide: Tensor | None = None) -> Tensor:
    """The discriminative methods' guide: (B, H, W) in [0, 1]. `guide` (B, K) bool: pixelwise max of those classes'
    normalised CAMs; None: each image's top-1 predicted class; (B, H, W): returned as is (clamped to [0, 1])."""
    if guide is not None and guide.dim() == 3:
        return guide.clamp(0, 1)
    model_ = _model_of(model)
    with torch.no_grad():
        if guide is None:
            logits = cam_head(model_).extractor(x)[1]
            guide = F.one_hot(logits.argmax(1), logits.shape[1]).bool()
        maps = cam(model_, x, classes=guide.bool())
    return maps.amax(1)


# ------------------------------------------------------------------------------------------------------ perturbations


def perturb(x: Tensor, kind: str = "gaussian", generator: torch.Generator | int | None = None,
            sigma: float = 0.15, p: float = 0.9) -> Tensor:
    """One perturbed copy of each image of x (B, C, H, W) -- the model-pert training transform, and the noise of
    SmoothGrad / BinaryMask.

    kind="gaussian": x + N(0, (sigma * r)^2), r = max - min of that image (noise relative to the input range).
    kind="binary":   x * m, m ~ Bernoulli(p) per pixel, shared by the channels (p = probability a pixel is kept).
    kind="none":     x unchanged.
    Random numbers are drawn on the CPU from `generator` (or a seed), then moved to x's device.
    """
    if kind == "none":
        return x
    g = _generator(generator)
    B, C, H, W = x.shape
    if kind == "gaussian":
        r = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(B, 1, 1, 1)
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
        return x + noise * (sigma * r)
    if kind == "binary":
        keep = (torch.rand((B, 1, H, W), generator=g) < p).to(device=x.device, dtype=x.dtype)
        return x * keep
    raise ValueError(f"perturbation kind must be 'gaussian', 'binary' or 'none', got {kind!r}")


class Perturb(nn.Module):
    """`perturb` as a transform: Perturb("binary", p=0.9, seed=0)(x); its generator advances with every call."""

    def __init__(self, kind: str = "gaussian", sigma: float = 0.15, p: float = 0.9, seed: int = 0):
        super().__init__()
        if kind not in ("gaussian", "binary", "none"):
            raise ValueError(f"perturbation kind must be 'gaussian', 'binary' or 'none', got {kind!r}")
        self.kind, self.sigma, self.p = kind, sigma, p
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        return perturb(x, self.kind, self.generator, sigma=self.sigma, p=self.p)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, sigma={self.sigma}, p={self.p}"


# ------------------------------------------------------------------------------------------------------ aggregations


def smoothgrad(net: nn.Module, x: Tensor, classes=None, n: int = 50, sigma: float = 0.15, batch_size: int = 64,
               generator: torch.Generator | int | None = None) -> Tensor:
    """SmoothGrad: mean saliency over n copies x + N(0, (sigma * (max x_i - min x_i))^2). sigma=0, n=1: saliency."""
    g = _generator(generator)

    def plan(i, xi, cls, out):
        copies = perturb(xi[None].expand(n, *xi.shape), "gaussian", g, sigma=sigma)
        acc = _Mean(n)
        return copies, acc.consume, acc.finish
    return _aggregate(net, x, classes, batch_size, plan)


def binary_mask(net: nn.Module, x: Tensor, classes=None, n: int = 50, p: float = 0.9, batch_size: int = 64,
                generator: torch.Generator | int | None = None) -> Tensor:
    """Mean saliency over n copies x * m, m ~ Bernoulli(p) per pixel (kept with probability p). p=1, n=1: saliency."""
    g = _generator(generator)

    def plan(i, xi, cls, out):
        copies = perturb(xi[None].expand(n, *xi.shape), "binary", g, p=p)
        acc = _Mean(n)
        return copies, acc.consume, acc.finish
    return _aggregate(net, x, classes, batch_size, plan)


def _grid_cells(size: int, grid: int, device) -> Tensor:
    """Which of `grid` cells each of `size` pixels falls into: floor(i * grid / size)."""
    return torch.arange(size, device=device) * grid // size


def _patch_scores(guide: Tensor, grid: int) -> Tensor:
    """Mean of a (H, W) map over each cell of a grid x grid partition: (grid, grid)."""
    H, W = guide.shape
    R = F.one_hot(_grid_cells(H, grid, guide.device), grid).to(guide.dtype)  # (H, g)
    C = F.one_hot(_grid_cells(W, grid, guide.device), grid).to(guide.dtype)  # (W, g)
    return (R.T @ guide @ C) / (R.sum(0)[:, None] * C.sum(0)[None, :])


def _patch_inputs(xi: Tensor, keep: Tensor, fill: float) -> Tensor:
    """Copies of xi (C, H, W) with grid cells where keep (n, g, g) is False set to `fill`."""
    H, W = xi.shape[-2:]
    g = keep.shape[-1]
    rows, cols = _grid_cells(H, g, keep.device), _grid_cells(W, g, keep.device)
    mask = keep[:, rows][:, :, cols].unsqueeze(1).to(xi.dtype)  # (n, 1, H, W)
    return xi[None] * mask + fill * (1 - mask)


def random_patches(net: nn.Module, x: Tensor, classes=None, n: int = 50, grid: int = 16, p: float = 0.9,
                   fill: float = 0.0, batch_size: int = 64, generator: torch.Generator | int | None = None) -> Tensor:
    """Mean saliency over n copies whose grid x grid patches are each dropped (set to `fill`) with probability 1 - p.
    p=1, n=1: saliency."""
    g = _generator(generator)

    def plan(i, xi, cls, out):
        keep = (torch.rand((n, grid, grid), generator=g) < p).to(xi.device)
        acc = _Mean(n)
        return _patch_inputs(xi, keep, fill), acc.consume, acc.finish
    return _aggregate(net, x, classes, batch_size, plan)


def discriminative_patches(net: nn.Module, x: Tensor, classes=None, n: int = 50, grid: int = 16,
                           alpha: float = 0.4, guide: Tensor | None = None, fill: float = 0.0, batch_size: int = 64,
                           generator: torch.Generator | int | None = None) -> Tensor:
    """Mean saliency over n copies whose patches are each dropped with probability clamp(alpha * s, 0, 1), s = mean of
    the guide CAM over the patch (see `guide_map`). alpha=0, n=1: saliency."""
    g = _generator(generator)
    guides = guide_map(net, x, guide)

    def plan(i, xi, cls, out):
        drop = (alpha * _patch_scores(guides[i], grid)).clamp(0, 1).cpu()
        keep = (torch.rand((n, grid, grid), generator=g) >= drop).to(xi.device)
        acc = _Mean(n)
        return _patch_inputs(xi, keep, fill), acc.consume, acc.finish
    return _aggregate(net, x, classes, batch_size, plan)


def _crop_boxes(n: int, H: int, W: int, scale: tuple[float, float], g: torch.Generator) -> Tensor:
    """(n, 4) int boxes (top, left, h, w): area fraction ~ U(scale), the image's aspect ratio, uniform position."""
    lo, hi = scale
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    u = torch.rand((n, 3), generator=g, dtype=torch.float64)
    side = (lo + (hi - lo) * u[:, 0]).sqrt()
    h = (side * H).round().clamp(1, H).long()
    w = (side * W).round().clamp(1, W).long()
    top = (u[:, 1] * (H - h + 1)).floor().long().clamp_max(H - h)
    left = (u[:, 2] * (W - w + 1)).floor().long().clamp_max(W - w)
    return torch.stack([top, left, h, w], 1)


class _CropPaste:
    """Pastes each crop's saliency back at its box; per-pixel average over the crops that cover the pixel."""

    def __init__(self, boxes: Tensor, H: int, W: int, width: int, weight: str | None, cls, like: Tensor):
        self.boxes, self.H, self.W, self.weight, self.cls = boxes.tolist(), H, W, weight, cls
        self.total = like.new_zeros(width, H, W)
        self.count = like.new_zeros(H, W)

    def consume(self, lo, hi, logits, sal):
        if self.weight == "sigmoid":
            scores = logits if self.cls is None else logits[:, list(self.cls)]
            w = torch.sigmoid(scores)
        for j in range(hi - lo):
            top, left, h, w_ = self.boxes[lo + j]
            s = sal[j]
            if (h, w_) != (self.H, self.W):
                s = F.interpolate(s[None], size=(h, w_), mode="bilinear", align_corners=False, antialias=True)[0]
            if self.weight == "sigmoid":
                s = s * w[j][:, None, None]
            self.total[:, top:top + h, left:left + w_] += s
            self.count[top:top + h, left:left + w_] += 1

    def finish(self):
        return self.total / self.count.clamp_min(1)


def _crop_inputs(xi: Tensor, boxes: Tensor) -> Tensor:
    H, W = xi.shape[-2:]
    out = []
    for top, left, h, w in boxes.tolist():
        c = xi[None, :, top:top + h, left:left + w]
        if (h, w) != (H, W):
            c = F.interpolate(c, size=(H, W), mode="bilinear", align_corners=False)
        out.append(c)
    return torch.cat(out) if out else xi.new_zeros(0, *xi.shape)


def _check_weight(weight):
    if weight not in ("sigmoid", None):
        raise ValueError(f"weight must be 'sigmoid' or None, got {weight!r}")


def random_crops(net: nn.Module, x: Tensor, classes=None, n: int = 140, scale: tuple[float, float] = (0.1, 1.0),
                 weight: str | None = "sigmoid", batch_size: int = 64,
                 generator: torch.Generator | int | None = None) -> Tensor:
    """n random crops (area fraction ~ U(scale), the image's aspect ratio, uniform position), each resized to the input
    size; its saliency is resized back (bilinear, antialiased) and pasted at the crop, times sigmoid(the crop's class
    score) when weight="sigmoid"; each pixel is the mean over the crops covering it (0 if none does).
    scale=(1, 1), weight=None: saliency exactly; weight="sigmoid": sigmoid(S_c(x)) * saliency."""
    _check_weight(weight)
    g = _generator(generator)
    H, W = x.shape[-2:]

    def plan(i, xi, cls, out):
        boxes = _crop_boxes(n, H, W, scale, g)
        acc = _CropPaste(boxes, H, W, out.shape[1] if cls is None else len(cls), weight, cls, xi)
        return _crop_inputs(xi, boxes), acc.consume, acc.finish
    return _aggregate(net, x, classes, batch_size, plan)


def discriminative_crops(net: nn.Module, x: Tensor, classes=None, n: int = 140,
                         scale: tuple[float, float] = (0.1, 1.0), beta: float = 0.7, guide: Tensor | None = None,
                         weight: str | None = "sigmoid", batch_size: int = 64,
                         generator: torch.Generator | int | None = None) -> Tensor:
    """Random crops as in `random_crops`, each kept with probability clamp(beta - s, 0, 1), s = mean of the guide CAM
    over the crop (see `guide_map`): crops dominated by the discriminative region are mostly rejected (and never run).
    n is the number of proposals; the kept ones are averaged per pixel. beta >= 2, scale=(1, 1), weight=None:
    saliency exactly."""
    _check_weight(weight)
    g = _generator(generator)
    H, W = x.shape[-2:]
    guides = guide_map(net, x, guide)

    def plan(i, xi, cls, out):
        boxes = _crop_boxes(n, H, W, scale, g)
        gi = guides[i].double().cpu()
        integral = F.pad(gi.cumsum(0).cumsum(1), (1, 0, 1, 0))  # summed-area table: mean over a box in O(1)
        t, l_, h, w = boxes.unbind(1)
        s = (integral[t + h, l_ + w] - integral[t, l_ + w] - integral[t + h, l_] + integral[t, l_]) / (h * w)
        keep = torch.rand(n, generator=g, dtype=torch.float64) < (beta - s).clamp(0, 1)
        kept = boxes[keep]
        acc = _CropPaste(kept, H, W, out.shape[1] if cls is None else len(cls), weight, cls, xi)
        return _crop_inputs(xi, kept), acc.consume, acc.finish
    return _aggregate(net, x, classes, batch_size, plan)


# Name -> function, for the benchmarks. Plain maps take (net, x, classes); aggregations also n, batch_size, generator.
METHODS = {"cam": cam, "saliency": saliency, "ixg": ixg}
AGGREGATIONS = {
    "smoothgrad": smoothgrad,
    "binary_mask": binary_mask,
    "random_crops": random_crops,
    "random_patches": random_patches,
    "discriminative_crops": discriminative_crops,
    "discriminative_patches": discriminative_patches,
}
