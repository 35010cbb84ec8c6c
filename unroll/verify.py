"""Check an unrolled model against plain autograd: the reference every claim of exactness rests on."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


def autograd_gradients(model: nn.Module, x: torch.Tensor, classes=None, create_graph: bool = False):
    """d logit_k / d x for each class k, one autograd backward per class: (B, K', *x.shape[1:]); and the logits."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    ks = range(logits.shape[1]) if classes is None else [int(k) for k in classes]
    grads = [torch.autograd.grad(logits[:, k].sum(), x, retain_graph=True, create_graph=create_graph)[0] for k in ks]
    return torch.stack(grads, 1), logits


def autograd_heatmaps(model: nn.Module, x: torch.Tensor, classes=None, create_graph: bool = False):
    """Input x gradient per class by autograd: (B, K', *spatial)."""
    grads, logits = autograd_gradients(model, x, classes, create_graph)
    return (grads * x.detach().unsqueeze(1)).sum(2), logits


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| / max |reference| (0 when both are exactly zero)."""
    ours, reference = ours.detach(), reference.detach()
    scale = reference.abs().max()
    diff = (ours - reference).abs().max()
    if scale == 0:
        return float(diff)
    return float(diff / scale)


@dataclass
class Report:
    logits: float
    heatmaps: float
    gradients: float
    max_abs_heatmap: float

    @property
    def max_error(self) -> float:
        return max(self.logits, self.heatmaps, self.gradients)

    def __str__(self) -> str:
        return (f"relative errors vs autograd: logits {self.logits:.2e}, heatmaps {self.heatmaps:.2e}, "
                f"gradients {self.gradients:.2e} (max |heatmap| {self.max_abs_heatmap:.3g})")



def randomize_batch_norm(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm running statistics and affines far from their identity defaults (in place; returns the model), so
    an equivalence check really tests BatchNorm: at torchvision's / timm's init a BN is close to the identity, and
    timm zero-initialises the last BN of a residual block, which hides whatever flows through it."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                n, kw = m.num_features, {"generator": g, "dtype": torch.double}
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, **kw) * 0.2)
                    m.running_var.copy_(torch.rand(n, **kw) * 1.5 + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, **kw) + 0.5)
                    m.bias.copy_(torch.randn(n, **kw) * 0.2)
    return model

def verify(model: nn.Module, x: torch.Tensor, classes=None, net=None, verbose: bool = True) -> Report:
    """Compare unroll's heatmaps and input gradients with per-class autograd on `x`.

    Errors are relative (max abs error / max abs value). Run in float64 (`model.double()`, `x.double()`) to see
    ~1e-15; float32 gives ~1e-6. Pass `net` to check an already compiled module (else the model is compiled
    with `example=x`, so models whose forward branches on shapes are checked at x's shape).
    """
    from .compiler import compile as compile_

    # example=x: a model whose forward branches on shapes is specialised to x (ignored by symbolic traces)
    net = compile_(model, example=x) if net is None else net
    if not net.rules.gradient:
        raise ValueError(f"verify compares with autograd input x gradient; this module's rules {net.rules!r} compute "
                         "something else")
    with torch.no_grad():
        out = net(x, classes=classes)
        grads = net.gradients(x, classes=classes)
    ref_heat, ref_logits = autograd_heatmaps(model, x, classes)
    ref_grads, _ = autograd_gradients(model, x, classes)
    report = Report(relative_error(out.logits, ref_logits.detach()), relative_error(out.heatmaps, ref_heat),
                    relative_error(grads, ref_grads), float(ref_heat.abs().max()))
    if verbose:
        print(f"unroll.verify({type(model).__name__}, x{tuple(x.shape)} {x.dtype}): {report}")
    return report
