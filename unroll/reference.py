"""The reference implementation's training gradient, as an explicit option (never the default).

The paper's public code (Kainmueller-Lab/TW-autoencoder) does not train with the gradient of its heatmaps. Its
decoder is an LRP-epsilon relevance pass written as ordinary torch ops on the encoder's *live* activations, so
autograd differentiates the relevance formulas themselves -- including the parts that are constant in the math
(``a / z`` ratios) -- and it ties weights through a second ``nn.Parameter``. ``unroll.compile(model)`` gives the exact
gradient instead (input x gradient, gates constant, one tensor per weight). This module rebuilds the reference's
computation with the compiler's rule machinery, one named switch per difference, so that its effect can be measured
(docs/reference_gradient.md) and a reference run reproduced (``bench.voc --protocol reference``):

    net = unroll.reference.compile(model)                               # every switch as the reference has it
    net = unroll.reference.compile(model, ReferenceGradient(tie="shared", encoder_path=False))   # pieces off

The decoder carries relevance R (not cotangents). With ``a`` a layer's input, ``z = layer(a)`` recomputed from the
live ``a`` with the bias detached, ``R_a = a * layer^T(R_z / (z + epsilon))`` (the reference's division
``safe_divide``: ``x / (y + 1e-9)``, 0 where y == 0); ReLUs pass R unchanged; BatchNorm multiplies R by
``gamma / sigma * z / y`` as a constant (``detach_bn``); max pooling unpools R to the argmax (``unpool``); average
pooling and residual sums split R in proportion to their inputs (ratios live, as in the reference). At the input the
compiler's skip multiplication forms ``sum_c x_c * layer^T(...)_c``, the reference's last step. The heatmap VALUES are
LRP-epsilon (equal to input x gradient up to epsilon where no max-pool windows overlap); what differs is the graph
autograd differentiates.

Switches (``ReferenceGradient``), each on as the reference has it:

- ``epsilon`` (1e-8): the stabiliser in ``R_z / (z + epsilon)``; no sign (unlike zennit's).
- ``detach_bn`` (True): BatchNorm's ratio ``gamma / sigma * z / y`` is a constant; no gradient reaches gamma, beta or
  the statistics through the heatmaps.
- ``encoder_path`` (True): the relevance pass reads the encoder's activations, logits and weights *in the autograd
  graph*: the heatmap loss then also backpropagates through ``a``, ``z`` and the logit seed into the encoder.
  Pairs that cancel in value do not cancel in the gradient where one side is detached (BN ratios, biases), which
  gives a large spurious encoder-path term. False: every encoder value is detached, only the decoder's weights get
  gradient (the decoder-path part).
- ``tie`` ("alias"): how the decoder's weight is tied to the encoder's. "shared": the same tensor (unroll's default;
  one gradient, one optimizer step). "alias": a second ``nn.Parameter`` on the same storage (the reference's
  ``inv_m.weight = nn.Parameter(m.weight)``): the decoder-path gradient lands on it, the encoder-path and
  classification gradients on the original, and AdamW steps the shared storage twice (two moment estimates, weight
  decay twice). "copy": a second parameter with storage of its own, equal at construction -- what "alias" becomes
  after ``model.to(device)`` or ``.double()``, since ``nn.Module._apply`` converts each Parameter separately (the
  reference builds its decoder before moving the model to CUDA). ``retie(model)`` re-aliases after a move.
- ``unpool`` ("overwrite"): ``F.max_unpool2d``, where windows that share an argmax overwrite one another (one of
  them wins) instead of adding up ("accumulate", the transpose of max pooling).
- ``head`` ("logit"): the reference's VGG decoder top -- relevance seeded with the logit value itself
  (``T[k] = logit_k``), divided by the recomputed logit, weight tied like the others. "weight": its ResNet top
  (``bottle_conv``), ``R = a * W_k / (H W)`` straight from the encoder's own fc weight (not aliased).

Not reproduced (see docs/reference_gradient.md): each reference decoder call re-runs some BatchNorms in train mode
(extra running-statistics updates); its decoder copy starting from weights other than the encoder's. Not needed:
its hooks keep BN outputs that in-place ops rewrite later (an in-place ReLU changes neither maps nor gradients; the
residual blocks' last BN is re-run, refreshing the stored output, before its relevance step).
"""
from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import ops, rules, rulesets
from .compiler import Unrolled
from .compiler import compile as _compile

__all__ = ["ReferenceGradient", "REFERENCE", "ruleset", "compile", "retie", "safe_divide", "decoder_weights",
           "HOLDER", "DecoderWeights"]

SAFE = 1e-9  # the reference's safe_divide constant
HOLDER = "unroll_reference_weights"  # name prefix, on the model, of tie="alias"/"copy"'s second parameters
TIES = ("shared", "alias", "copy")
UNPOOLS = ("overwrite", "accumulate")
HEADS = ("logit", "weight")
# in-place operators a traced graph may hold (main's tracer records `x += y` as operator.add; other tracers may not)
_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}
_HOLDERS = itertools.count()  # one name per compilation: two compiled nets never read each other's weights


@dataclass(frozen=True)
class ReferenceGradient:
    """The reference code's training gradient, one switch per difference from the exact one (see module doc)."""

    epsilon: float = 1e-8
    detach_bn: bool = True
    encoder_path: bool = True
    tie: str = "alias"
    unpool: str = "overwrite"
    head: str = "logit"

    def __post_init__(self):
        for name, value, allowed in (("tie", self.tie, TIES), ("unpool", self.unpool, UNPOOLS),
                                     ("head", self.head, HEADS)):
            if value not in allowed:
                raise ValueError(f"ReferenceGradient({name}={value!r}): expected one of {allowed}")
        if not self.epsilon >= 0:
            raise ValueError(f"ReferenceGradient(epsilon={self.epsilon}): must be >= 0")

    def replace(self, **changes) -> "ReferenceGradient":
        return replace(self, **changes)


REFERENCE = ReferenceGradient()


# ----------------------------------------------------------------------------------------------- tensor helpers


@ops.graph_op
def safe_divide(a, b):
    """The reference's division: a / (b + 1e-9), and 0 where b == 0 (b == -1e-9 divides by 1e-9)."""
    den = b + SAFE
    den = torch.where(den == 0, torch.full_like(den, SAFE), den)
    return a / den * (b != 0).to(a.dtype)


def _live(t: torch.Tensor) -> torch.Tensor:
    return t


def _live_copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone()  # the value now: an in-place op later would change what the decoder reads


def _detached(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def _detached_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone()


@ops.graph_op
def layer_output(a, weight, bias, kind, stride, padding, dilation, groups):
    """z = layer(a) recomputed from the live input with the bias detached (the reference's detach_bias=True)."""
    bias = None if bias is None else bias.detach()
    if kind == "linear":
        return F.linear(a, weight, bias)
    fn = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
    return fn(a, weight, bias, stride, padding, dilation, groups)


@ops.graph_op
def times_input(a, q):
    """R_a = a * q: relevance at a layer input (a broadcast over the class dimension)."""
    return a.unsqueeze(1) * q


@ops.graph_op
def divide_by_output(R, z, eps):
    """S = R_z / (z + eps) with the reference's safe division; z broadcast over the class dimension."""
    return safe_divide(R, z.unsqueeze(1) + eps)


@ops.graph_op
def overwrite_unpool(R, indices, kernel_size, stride, padding, in_shape):
    """F.max_unpool2d of the relevance: windows sharing an argmax overwrite one another (the reference)."""
    B, K = R.shape[:2]
    idx = indices.unsqueeze(1).expand(B, K, *indices.shape[1:]).flatten(0, 1)
    out = F.max_unpool2d(R.flatten(0, 1), idx, kernel_size, stride or kernel_size, padding,
                         output_size=tuple(in_shape[2:]))
    return out.unflatten(0, (B, K))


def bn_ratio(z, y, bn, detach):
    """BatchNorm's relevance ratio gamma / sigma * z / y (per element), computed right after the BN (before an
    in-place ReLU rewrites y); a constant of the graph when `detach`."""
    z, y = (z.detach(), y.detach()) if detach else (z.clone(), y.clone())  # clones: an in-place ReLU follows
    scale = ops.batch_norm_scale(z, bn)
    ratio = scale.view(-1, *[1] * (z.dim() - 2)) * safe_divide(z, y)
    return ratio.detach() if detach else ratio  # detach: gamma's part of the scale too


def add_ratio(u, v, detach):
    """u / (u + v) with the safe division, live (the reference's residual split, which is not detached)."""
    u, v = (u.detach(), v.detach()) if detach else (u.clone(), v.clone())  # clones: an in-place += follows
    return safe_divide(u, u + v)


@ops.graph_op
def split_relevance(R, ratio, in_shape):
    return ops.sum_to(R * ratio.unsqueeze(1), in_shape)


@ops.graph_op
def pool_relevance(R, a, pool_out, in_shape):
    """LRP-0 through adaptive average pooling: R_a = a * pool^T(R / pool(a)) (pool(a) live, no epsilon)."""
    return times_input(a, ops.adaptive_avg_pool_transpose(safe_divide(R, pool_out.unsqueeze(1)), in_shape))


# --------------------------------------------------------------------------------------------------- the rules


def _mutated_later(node: fx.Node, root: nn.Module) -> bool:
    """Some op modifies this value in place (nn.ReLU(inplace=True), +=, relu_): copy what the decoder reads."""
    for user in node.users:
        module = root.get_submodule(user.target) if user.op == "call_module" else None
        if (getattr(module, "inplace", False) or user.kwargs.get("inplace") or user.target in _INPLACE_FUNCS
                or (user.op == "call_method" and str(user.target).endswith("_"))):
            return True
    return False


class _Rules:  # noqa: D101
    """The rule functions of one ReferenceGradient (closures over its switches)."""

    def __init__(self, cfg: ReferenceGradient):
        self.cfg = cfg
        self.holder = DecoderWeights(cfg.tie)

    def read(self, r, node: fx.Node, name: str, after: bool = False):
        """An encoder value as the decoder sees it: live (in the autograd graph) or detached."""
        copy = _mutated_later(node, r.em.root)
        fn = ((_live_copy if copy else _live) if self.cfg.encoder_path else
              (_detached_copy if copy else _detached))
        return r.save(fn, node, name=name, after=after)

    def weight(self, r, tied: bool = True):
        """(encoder weight as the relevance pass reads it, decoder weight)."""
        w = r.param("weight")
        w_enc = w if self.cfg.encoder_path else w.detach()
        if not tied or self.cfg.tie == "shared":
            return w_enc, w
        return w_enc, r.em.decoder_attr(_decoder_weight(r, self.holder))

    def layer(self, r):
        m = r.module
        if isinstance(m, nn.modules.conv._ConvNd):
            if m.padding_mode != "zeros":
                r.unsupported(f"padding_mode={m.padding_mode!r}")
            kind, geometry = "conv", (m.stride, m.padding, m.dilation, m.groups)
        else:
            kind, geometry = "linear", (None, None, None, None)
        is_input = r.x is r.em.input
        a = self.read(r, r.x, "in")
        bias = r.param("bias") if m.bias is not None else None
        head = r.node is r.em.logits
        if head and self.cfg.head == "weight":  # ResNet top: R = a * (seed @ W), the encoder's own weight
            w_enc, _ = self.weight(r, tied=False)
            q = r.q @ w_enc
        else:
            w_enc, w_dec = self.weight(r)
            R = r.q
            if head:  # VGG top: relevance seeded with the logit itself
                R = R * self.read(r, r.node, "logits", after=True).unsqueeze(1)
            z = layer_output(a, w_enc, bias, kind, *geometry)
            S = divide_by_output(R, z, self.cfg.epsilon)
            if kind == "linear":
                q = S @ w_dec
            else:
                stride, padding, dilation, groups = geometry
                q = ops.conv_transpose(S, w_dec, stride, padding, dilation, groups, r.shape(r.x))
        # at the input, the compiler's skip multiplication forms sum_c x_c * q_c (the reference's last step)
        return q if is_input else times_input(a, q)

    def batch_norm(self, r):
        ratio = r.save(bn_ratio, r.x, r.node, r.module_ref(), self.cfg.detach_bn or not self.cfg.encoder_path,
                       name="bn_ratio", after=True)
        return r.q * ratio.unsqueeze(1)

    def silent(self, r):
        return r.q  # ReLU, dropout: relevance passes unchanged (in train mode too: no dropout mask)

    def max_pool(self, r):
        if self.cfg.unpool == "accumulate":
            return rules.max_pool(r)  # scatter-add of R at the argmax: the transpose of max pooling
        m = r.module
        if not isinstance(m, nn.MaxPool2d) or m.return_indices or m.dilation not in (1, (1, 1)):
            r.unsupported("the overwriting unpool (F.max_unpool2d, as the reference) covers nn.MaxPool2d modules "
                          "without dilation; use unpool='accumulate' for other max pooling")
        kw = {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "ceil_mode": m.ceil_mode}
        indices = r.rewrite_with_indices(F.max_pool2d, r.x, **kw)
        return overwrite_unpool(r.q, indices, m.kernel_size, m.stride, m.padding, r.shape(r.x))

    def adaptive_avg_pool(self, r):
        a = self.read(r, r.x, "in")
        out = self.read(r, r.node, "out", after=True)
        return pool_relevance(r.q, a, out, r.shape(r.x))

    def add(self, r):
        u, v = r.node.args[:2]
        if not (r.active(u) and r.active(v)):
            r.unsupported("a sum with an input-independent term (the reference's LRP splits residual sums only)")
        detach = not self.cfg.encoder_path
        ru = r.save(add_ratio, u, v, detach, name="add_ratio")
        rv = r.save(add_ratio, v, u, detach, name="add_ratio_other")
        return [(u, split_relevance(r.q, ru, r.shape(u))), (v, split_relevance(r.q, rv, r.shape(v)))]

    def ruleset(self) -> rulesets.RuleSet:
        # (built at compile time from the registry as it is then: an op registered later is refused too)
        return rulesets.LRP0.replace(_table(self), name=f"reference(tie={self.cfg.tie!r})")


_PASS_THROUGH = {rules.reshape, rules.transpose, rules.permute, rules.cat, rules.split, rules.getitem,
                 rules.identity}  # move values without arithmetic: relevance goes where the cotangent goes


def ruleset(cfg: ReferenceGradient = REFERENCE) -> rulesets.RuleSet:
    """The reference's rules as a RuleSet for ``unroll.compile(model, rules=...)``, with tie="shared" (alias/copy
    need compile() below, which keeps the decoder's parameters): ``rulesets.LRP0`` with the reference's relevance
    rules where it has them, the value-moving rules unchanged, and a refusal for every other op (never a silently
    wrong map)."""
    if cfg.tie != "shared":
        raise ValueError(f"tie={cfg.tie!r} adds parameters: use unroll.reference.compile(model, cfg)")
    return _Rules(cfg).ruleset()


def _table(R: "_Rules") -> dict:
    mapping = {rules.conv_module: R.layer, rules.linear_module: R.layer, rules.batch_norm: R.batch_norm,
               rules.relu: R.silent, rules.dropout_module: R.silent, rules.dropout_function: R.silent,
               rules.max_pool: R.max_pool, rules.adaptive_avg_pool: R.adaptive_avg_pool, rules.add: R.add}
    out = {}
    for op, rule in rules.RULES.items():
        if rule in mapping:
            out[op] = mapping[rule]
        elif rule not in _PASS_THROUGH:
            out[op] = _refuse(getattr(rule, "__name__", str(rule)))
    return out


def _refuse(name: str):
    def refuse(r):
        r.unsupported(f"the reference-gradient mode has no rule for this op ({name}); it covers what the reference "
                      "decoders contain: nn.Conv*/nn.Linear modules, BatchNorm, ReLU, dropout, max pooling, adaptive "
                      "average pooling, residual sums and reshapes")
    return refuse


# --------------------------------------------------------------------------------------- the second parameters


class DecoderWeights(nn.Module):
    """The decoder's own Parameters (tie="alias"/"copy"), one per tied layer, keyed by the layer's path with dots as
    "__"; `sources` maps key -> layer path. A submodule of the compiled Unrolled, so parameters(), state_dict()
    and optimizers see them (the model itself is not changed)."""

    def __init__(self, tie: str):
        super().__init__()
        self.tie = tie
        self.attr = f"{HOLDER}_{next(_HOLDERS)}"  # its name on the model
        self.sources: dict[str, str] = {}

    def add(self, model: nn.Module, path: str) -> str:
        key = path.replace(".", "__")
        if key not in self._parameters:
            w = model.get_submodule(path).weight
            data = w.detach() if self.tie == "alias" else w.detach().clone()  # detach(): same storage
            self.register_parameter(key, nn.Parameter(data, requires_grad=w.requires_grad))
            self.sources[key] = path
        return key

    def extra_repr(self) -> str:
        return f"tie={self.tie!r}, {len(self.sources)} layers"


def _decoder_weight(r, holder: DecoderWeights) -> str:
    """The decoder graph reaches the holder through the model (the compiled graphs read the model live): a plain
    attribute of the model (compile() removes it again if compiling fails)."""
    root = r.em.root
    if root.__dict__.get(holder.attr) is not holder:
        object.__setattr__(root, holder.attr, holder)  # (nn.Module.__setattr__ would register a submodule)
    return f"{holder.attr}.{holder.add(root, r.node.target)}"


def decoder_weights(net: Unrolled) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """{layer path: (encoder weight, decoder weight)} of a net compiled with tie="alias" or "copy"."""
    holder = getattr(net, "reference_weights", None)
    if holder is None:
        return {}
    return {path: (net.model.get_submodule(path).weight, holder._parameters[key])
            for key, path in holder.sources.items()}


def retie(net: Unrolled) -> None:
    """Point every decoder weight at its encoder weight's storage again (tie="alias" after .to(device) or
    .double(), which give each Parameter storage of its own). The encoder's values win."""
    for enc, dec in decoder_weights(net).values():
        dec.data = enc.data


def compile(model: nn.Module, cfg: ReferenceGradient = REFERENCE, **kwargs: Any) -> Unrolled:
    """unroll.compile(model) with the reference code's training gradient (see ReferenceGradient). kwargs go to
    unroll.compile (classes_per_chunk, checkpoint). With tie="alias"/"copy" the net gets a submodule
    ``reference_weights`` (DecoderWeights) holding the decoder's parameters, which the model also holds as a plain
    attribute (see DecoderWeights); its modules and weights are left as they were."""
    if {"rules", "rule", "epsilon"} & set(kwargs):
        raise TypeError("unroll.reference.compile sets the rules itself; pass a ReferenceGradient instead")
    if not isinstance(cfg, ReferenceGradient):
        raise TypeError(f"cfg must be a ReferenceGradient, got {type(cfg).__name__}")
    table = _Rules(cfg)
    try:
        net = _compile(model, rules=table.ruleset(), **kwargs)
    except BaseException:
        model.__dict__.pop(table.holder.attr, None)
        raise
    if table.holder.sources:
        net.add_module("reference_weights", table.holder)
    net.reference = cfg
    return net
