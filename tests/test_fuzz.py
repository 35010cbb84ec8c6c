"""Differential fuzzing: random piecewise-linear classifiers (tests/fuzz_nets.py), compiled, against autograd.

For every drawn net, in float64: the logits, the heatmaps (per-class autograd input x gradient), the input
gradients (`net.gradients`), class / sample selection with one class per chunk, and the parameter gradients of a
heatmap loss (decoder backprop vs autograd double backprop). BatchNorm on batch statistics (train mode, or no
running stats) is compared with autograd through a BN whose batch statistics are detached, the gradient unroll
documents (README, "Semantics worth knowing").

Profiles (registered in tests/conftest.py): the default run uses `fuzz-ci` (100 derandomised examples: the same
every run, no example database; ~12 s on one thread); `HYPOTHESIS_PROFILE=fuzz-long python -m pytest
tests/test_fuzz.py -m fuzz` draws fresh examples for a long run (FUZZ_EXAMPLES=N, default 5000, about 20 per second
on one thread; add --hypothesis-show-statistics for op coverage). A failure prints the shrunk NetSpec
and the emitted decoder; each one found becomes a named test in the regressions section below.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import event, given, note
from hypothesis.control import currently_in_test_context

import unroll

from fuzz_nets import BatchNormOp, Lambda, NetSpec, nets, op_names

pytestmark = pytest.mark.fuzz

TOL_MAPS = 1e-10  # heatmaps and input gradients, relative to their largest value
TOL_LOGITS = 1e-12
TOL_PARAMS = 1e-9  # parameter gradients of the heatmap loss, per parameter
# Where the reference is structurally zero (a mean subtracted, then averaged; x - 3 * (x / 3)) both sides hold
# round-off, amplified by later layers (a BN scale of 200 gave 3e-15): errors are relative to at least FLOOR, so
# such nets pass with absolute errors below tol * FLOOR (1e-14 for maps). Real maps here are O(0.1 .. 10).
FLOOR = 1e-4


def error(ours: torch.Tensor, ref: torch.Tensor, floor: float = FLOOR) -> float:
    """max |ours - ref| / max(max |ref|, floor)"""
    ours, ref = ours.detach(), ref.detach()
    return float((ours - ref).abs().max() / max(float(ref.abs().max()), floor))


def reference_gradients(model: nn.Module, x: torch.Tensor, create_graph: bool):
    """d logit_k / d x per class by autograd, with BN batch statistics held constant (the documented gradient)."""
    bns = [m for m in model.modules() if isinstance(m, BatchNormOp)]
    for m in bns:
        m.frozen = True
    try:
        xr = x.detach().clone().requires_grad_(True)
        logits = model(xr)
        grads = [torch.autograd.grad(logits[:, k].sum(), xr, retain_graph=True, create_graph=create_graph)[0]
                 for k in range(logits.shape[1])]
    finally:
        for m in bns:
            m.frozen = False
    return torch.stack(grads, 1)


def check_equivalence(model: nn.Module, x: torch.Tensor, seed: int = 0, check_samples: bool = True):
    """Every number unroll computes for `model` at `x` equals autograd's (float64)."""
    net = unroll.compile(model)
    if currently_in_test_context():  # (the regression tests call this outside hypothesis)
        note(f"decoder:\n{net.decoder.code}")
    out = net(x)
    with torch.no_grad():
        logits = model(x)
    assert out.logits.shape == logits.shape
    assert (e := error(out.logits, logits)) < TOL_LOGITS, f"logits differ ({e:.2e})"

    ref_grads = reference_gradients(model, x, create_graph=True)
    ref_heat = (ref_grads * x.unsqueeze(1)).sum(2)
    if ref_heat.abs().max() == 0 and currently_in_test_context():
        event("all heatmaps zero")
    assert out.heatmaps.shape == ref_heat.shape
    assert (e := error(out.heatmaps, ref_heat)) < TOL_MAPS, f"heatmaps differ from autograd ({e:.2e})"
    with torch.no_grad():
        grads = net.gradients(x)
    assert (e := error(grads, ref_grads)) < TOL_MAPS, f"input gradients differ from autograd ({e:.2e})"

    # selection: classes in another order, a subset of the samples, one class per decoder pass
    B, K = logits.shape
    classes, samples = list(range(K))[::-1], torch.arange(B)[::2]
    net.classes_per_chunk = 1
    with torch.no_grad():
        some = net(x, classes=classes).heatmaps if not check_samples else \
            net(x, classes=classes, samples=samples).heatmaps
    if not check_samples:
        samples = slice(None)
    assert some.shape == out.heatmaps[samples][:, classes].shape
    assert (e := error(some, out.heatmaps[samples][:, classes])) < TOL_MAPS, f"classes=/samples= differ ({e:.2e})"

    # training: parameter gradients of a heatmap loss, decoder backprop vs autograd double backprop
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ref_heat.shape, generator=g, dtype=torch.double)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return
    ref = torch.autograd.grad((ref_heat * w).sum() + ref_heat.square().sum(), params, allow_unused=True)
    ours = torch.autograd.grad((out.heatmaps * w).sum() + out.heatmaps.square().sum(), params, allow_unused=True)
    ref = [torch.zeros_like(p) if r is None else r for p, r in zip(params, ref)]
    ours = [torch.zeros_like(p) if o is None else o for p, o in zip(params, ours)]
    scale = max(float(r.abs().max()) for r in ref)
    for (name, _), r, o in zip(((n, p) for n, p in model.named_parameters() if p.requires_grad), ref, ours):
        # relative to the parameter's own gradient, or to 1e-6 of the largest one where that is ~0 (round-off)
        err = error(o, r, max(FLOOR * scale, FLOOR))
        assert err < TOL_PARAMS, f"heatmap-loss gradient of {name} differs from double backprop ({err:.2e})"


def check_shapes(spec: NetSpec):
    """The generator's shape bookkeeping: each op produces the shape the spec says (a generator bug otherwise)."""
    model, x = spec.build(), spec.input()
    with torch.no_grad():
        for op, module in zip(spec.ops, model.ops):
            x = module(x)
            assert tuple(x.shape) == (spec.batch, *op.out), f"generator bug at {op!r}: got {tuple(x.shape)}"


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@given(spec=nets())
def test_random_nets_equal_autograd(spec):
    for name in op_names(spec):
        event(name)
    event(f"{len(spec.ops)} ops, {'train' if spec.train else 'eval'}")
    check_shapes(spec)
    check_equivalence(spec.build(), spec.input(), spec.seed)


# ---------------------------------------------------------------------------------------------- regressions
# One minimal model per bug the fuzzer (or the issue) found. Each was checked to fail on the code it was found on.

K = 3


class Classifier(nn.Module):
    """conv -> relu -> body(op under test) -> spatial mean -> linear, or the body on the logits (`last`)."""

    def __init__(self, body, c_body=4, last=False, **members):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.body, self.last = body, last
        self.fc = nn.Linear(4 if last else c_body, 2 * K if last else K)
        for name, value in members.items():
            setattr(self, name, value)

    def forward(self, x):
        y = F.relu(self.conv(x))
        if self.last:
            return self.body(self, self.fc(y.mean((2, 3))))
        return self.fc(self.body(self, y).mean((2, 3)))


def regression(body, batch=2, **kwargs):
    torch.manual_seed(0)
    model = Classifier(body, **kwargs).double().eval()
    check_equivalence(model, torch.randn(batch, 3, 5, 4, dtype=torch.double))


def test_negative_part_index():
    regression(lambda m, y: y.chunk(2, 1)[-1], c_body=2)


def test_split_part_by_positive_and_negative_index():
    regression(lambda m, y: torch.split(y, 2, 1)[0] + F.relu(torch.split(y, 2, 1)[-2]), c_body=2)


@pytest.mark.parametrize("combine", [
    lambda y: torch.add(y, F.relu(y - 0.1), alpha=2), lambda y: torch.sub(y, y[:, 1:2], alpha=0.5),
    lambda y: y.add(y * 3, alpha=-0.5), lambda y: y.sub(F.relu(y), alpha=3),
], ids=["torch.add", "torch.sub", "Tensor.add", "Tensor.sub"])
def test_alpha(combine):
    regression(lambda m, y: combine(y))


@pytest.mark.parametrize("batch", [3, 2], ids=["B=K", "B!=K"])
@pytest.mark.parametrize("operand", [lambda m, y: m.w[:y.shape[0]], lambda m, y: m.w[:1].expand(y.shape[0], -1, -1, -1)],
                         ids=["rows", "expand"])
def test_batch_shaped_constant(batch, operand):
    """samples= with an input-independent operand that has the batch dim (w[:B], w[:1].expand(B, ...)): it was
    saved unbatched, so not subset -- B=K with rows differing per sample was silently wrong, the other cases failed
    in the decoder. unroll.batchness now finds both built with the batch size (expand: branch rules2; the first B
    rows of a parameter: branch integrate), so they are saved per sample."""
    regression(lambda m, y: y * operand(m, y), batch=batch, w=nn.Parameter(torch.rand(4, 4, 1, 1) + 0.5))


def test_repeated_advanced_index():
    regression(lambda m, y: y[:, [0, 0, 1]], c_body=3)


@pytest.mark.parametrize("last", [nn.Dropout(0.3), nn.MaxPool1d(2), lambda y: F.dropout(y, 0.3, False)],
                         ids=["Dropout", "MaxPool1d", "F.dropout"])
def test_last_op_rewritten(last):
    regression(lambda m, y: m.tail(y), last=True, tail=last if isinstance(last, nn.Module) else Lambda(lambda m, y: last(y)))


def test_ellipsis_index():
    regression(lambda m, y: y[..., 1:3])
