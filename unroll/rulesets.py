"""Rule sets: which rule each op gets in one compilation, as a value (after zennit's composites).

A `RuleSet` is the registry (`unroll.rules.RULES`, where `@rule(...)` registers) with some ops' rules replaced,
and optionally LRP-epsilon's stabiliser. It is immutable: `replace({...})` and `|` derive new sets.

    unroll.compile(model)                                   # LRP0: input x gradient, exactly autograd's
    unroll.compile(model, rules=unroll.rulesets.epsilon(1e-6))
    unroll.compile(model, rules="ws-ae")                    # a preset by name (see PRESETS)
    unroll.compile(model, rules=rulesets.WS_AE | rulesets.TRAIN_BN)
    unroll.compile(model, rules=rulesets.LRP0.replace({nn.ReLU: my_rule}))

Lookup, per node: the set's replacements first (a module by its class, walking the class's bases, so a replacement
keyed on a base class covers its subclasses; a function or Tensor method name exactly), then replacements keyed on
the category `ANY_ACTIVATION` (every op the registry marks as an elementwise activation, so spellings registered
later are covered too), then the registry. A replacement by `None` removes the op's rule (compiling refuses it).
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, rules

__all__ = ["RuleSet", "ANY_ACTIVATION", "LRP0", "WS_AE", "TRAIN_BN", "PRESETS", "epsilon", "get",
           "relu_on_signal", "train_batch_norm", "train_batch_norm_function", "batch_norm_scale_with_grad"]


class _Category:
    """A replacement key standing for a family of registry ops, resolved at lookup time."""

    def __init__(self, name: str, test: Callable[[Any, nn.Module | None], bool]):
        self.name, self.test = name, test

    def __repr__(self) -> str:
        return f"unroll.rulesets.{self.name}"

    def __reduce__(self):  # pickled by name: a RuleSet using it stays picklable
        return self.name


ANY_ACTIVATION = _Category("ANY_ACTIVATION", lambda target, module: rules.activation_fn(target, module) is not None)


def _key_name(key: Any) -> str:
    if isinstance(key, str):
        return f"Tensor.{key}"
    return getattr(key, "__qualname__", None) or repr(key)


def _check_entry(key: Any, fn: Any) -> None:
    hashable = isinstance(key, (str, _Category, type)) or callable(key)
    if not hashable:
        raise TypeError(f"RuleSet key {key!r}: expected a module class, a function, a Tensor method name (str) or "
                        "unroll.rulesets.ANY_ACTIVATION")
    if isinstance(key, type) and not issubclass(key, nn.Module):
        raise TypeError(f"RuleSet key {key.__qualname__}: a class key must be an nn.Module subclass")
    if fn is not None and not callable(fn):
        raise TypeError(f"RuleSet rule for {_key_name(key)}: expected a rule function (step -> cotangent) or None "
                        f"(no rule), got {type(fn).__name__}")


class RuleSet(Mapping):
    """The registry with `replacements` ({op key: rule function or None}) and LRP-epsilon's `epsilon` (None: off).

    As a Mapping it is the effective table: every op key with a rule, registry and replacements merged (a live view:
    a rule registered later with `@unroll.rules.rule` appears in every set). `gradient` says whether the heatmaps are
    input x gradient (autograd's, in eval mode: what `unroll.verify` checks); a derived set keeps it only when its
    replacements are declared gradient-exact (`replace(..., gradient=True)`).
    """

    __slots__ = ("_replacements", "_epsilon", "_name", "_gradient")

    def __init__(self, replacements: Mapping | None = None, *, epsilon: float | None = None, name: str = "custom",
                 gradient: bool = False):
        table = dict(replacements or {})
        for key, fn in table.items():
            _check_entry(key, fn)
        if epsilon is not None:
            if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (
                    math.isfinite(epsilon) and epsilon > 0):
                raise ValueError(f"epsilon={epsilon!r}: LRP-epsilon needs a positive finite number (e.g. 1e-6)")
            epsilon = float(epsilon)
        object.__setattr__(self, "_replacements", MappingProxyType(table))
        object.__setattr__(self, "_epsilon", epsilon)
        object.__setattr__(self, "_name", str(name))
        object.__setattr__(self, "_gradient", bool(gradient) and epsilon is None)

    def __setattr__(self, name, value):
        raise AttributeError("a RuleSet is immutable: derive a new one with .replace({...}), | or .with_epsilon()")

    __delattr__ = __setattr__

    # ---------------------------------------------------------------- fields

    @property
    def replacements(self) -> Mapping:
        return self._replacements

    @property
    def epsilon(self) -> float | None:
        return self._epsilon

    @property
    def name(self) -> str:
        return self._name

    @property
    def gradient(self) -> bool:
        return self._gradient

    # ---------------------------------------------------------------- deriving

    def replace(self, replacements: Mapping, *, name: str | None = None, gradient: bool = False) -> "RuleSet":
        """A new set with these entries replaced (later entries win). gradient=True declares that the new rules
        keep the heatmaps equal to input x gradient."""
        if isinstance(replacements, RuleSet):
            return self | replacements
        if not isinstance(replacements, Mapping):
            raise TypeError(f"RuleSet.replace takes a mapping {{op: rule}}, got {type(replacements).__name__}")
        return RuleSet({**self._replacements, **replacements}, epsilon=self._epsilon,
                       name=name or f"{self._name}+custom", gradient=self._gradient and gradient)

    def with_epsilon(self, epsilon: float | None) -> "RuleSet":
        """The same rules with LRP-epsilon's stabiliser `epsilon` (None: plain rules)."""
        name = self._name if epsilon is None else f"{self._name}+epsilon"
        return RuleSet(self._replacements, epsilon=epsilon, name=name, gradient=self._gradient)

    def __or__(self, other: "RuleSet | Mapping") -> "RuleSet":
        """`a | b`: a with b's replacements on top (b's win), and b's epsilon if it has one, else a's."""
        if isinstance(other, RuleSet):
            eps = other._epsilon if other._epsilon is not None else self._epsilon
            return RuleSet({**self._replacements, **other._replacements}, epsilon=eps,
                           name=f"{self._name}|{other._name}", gradient=self._gradient and other._gradient)
        if isinstance(other, Mapping):
            return self.replace(other)
        return NotImplemented

    # ---------------------------------------------------------------- lookup

    def lookup(self, target: Any, module: nn.Module | None = None) -> Callable | None:
        """The rule for a node (its target, and the module for call_module nodes), or None if it has none."""
        found, rule = self._replaced(target, module)
        return rule if found else rules.lookup(target, module)

    def replaces(self, target: Any, module: nn.Module | None = None) -> bool:
        """Whether this set's rule for the node differs from the registry's."""
        found, rule = self._replaced(target, module)
        return found and rule is not rules.lookup(target, module)

    def _replaced(self, target, module) -> tuple[bool, Callable | None]:
        table = self._replacements
        if module is not None:
            for cls in type(module).__mro__:
                if cls in table:
                    return True, table[cls]
        else:
            try:
                if target in table:
                    return True, table[target]
            except TypeError:  # an unhashable target
                pass
        for key, rule in table.items():
            if isinstance(key, _Category) and key.test(target, module):
                return True, rule
        return False, None

    # ---------------------------------------------------------------- the Mapping view

    def _table(self) -> dict:
        table = dict(rules.RULES)
        for key in table:
            found, rule = self._replaced(key, None)
            if found:
                table[key] = rule
        table.update({k: v for k, v in self._replacements.items() if not isinstance(k, _Category)})
        return {k: v for k, v in table.items() if v is not None}

    def __getitem__(self, key: Any) -> Callable:
        rule = self._table().get(key)
        if rule is None:
            raise KeyError(key)
        return rule

    def __iter__(self) -> Iterator:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RuleSet):
            return NotImplemented
        return dict(self._replacements) == dict(other._replacements) and self._epsilon == other._epsilon

    __hash__ = None  # type: ignore[assignment]  (replacements are a dict)

    def __reduce__(self):
        return (_rebuild, (dict(self._replacements), self._epsilon, self._name, self._gradient))

    def __repr__(self) -> str:
        parts = [repr(self._name)]
        if self._epsilon is not None:
            parts.append(f"epsilon={self._epsilon:g}")
        if self._replacements:
            shown = ", ".join(f"{_key_name(k)}: {getattr(v, '__name__', v)}" for k, v in self._replacements.items())
            parts.append(f"replacing {{{shown}}}")
        return f"RuleSet({', '.join(parts)})"


def _rebuild(replacements, epsilon, name, gradient):
    return RuleSet(replacements, epsilon=epsilon, name=name, gradient=gradient)


# ------------------------------------------------------------------------------------------------ rules of the presets


def relu_on_signal(r):
    """WS-AE: the decoder applies its own ReLU to the signal instead of the encoder's gate (for every activation)."""
    return F.relu(r.q)


def batch_norm_scale_with_grad(z: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """`unroll.ops.batch_norm_scale`'s value gamma / sqrt(var + eps), but in train mode the batch variance stays in the
    autograd graph: training through the heatmaps then sees how the weights move the batch statistics."""
    if bn.training or bn.running_var is None:
        dims = [0] + list(range(2, z.dim()))
        var = z.var(dim=dims, unbiased=False)
    else:
        var = bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    return scale if bn.weight is None else bn.weight * scale


def train_batch_norm(r):
    """BatchNorm for training through the heatmaps: the same heatmaps as the registry's rule (batch variance in train
    mode, running variance in eval), with the batch variance differentiable (see docs in zoo/bench models: without it
    a tied segmenter trained in train mode collapsed in eval mode)."""
    scale = r.save(batch_norm_scale_with_grad, r.x, r.module_ref(), name="bn_scale", batched=False)
    return ops.channel_scale(r.q, scale)


def functional_batch_norm_scale_with_grad(z, running_var, weight, training, eps):
    """`unroll.ops.functional_batch_norm_scale` with the batch variance left in the autograd graph."""
    if training:
        dims = [0] + list(range(2, z.dim()))
        var = z.var(dim=dims, unbiased=False)
    else:
        var = running_var
    scale = torch.rsqrt(var + eps)
    return scale if weight is None else weight * scale


def train_batch_norm_function(r):
    """`train_batch_norm` for F.batch_norm (timm's BatchNormAct2d), from the call's own arguments."""
    if r.derived(r.arg("running_var")) or r.derived(r.arg("weight")):
        r.unsupported("batch-norm statistics or weight computed from the input")
    scale = r.save(functional_batch_norm_scale_with_grad, r.x, r.arg("running_var"), r.arg("weight"),
                   r.arg("training"), r.arg("eps"), name="bn_scale", batched=False)
    return ops.channel_scale(r.q, scale)


# ------------------------------------------------------------------------------------------------ presets

LRP0 = RuleSet(name="lrp0", gradient=True)
"""The registry as is: input x gradient (= LRP-0 for ReLU networks), exactly autograd's."""

WS_AE = RuleSet({ANY_ACTIVATION: relu_on_signal}, name="ws-ae")
"""Weight-shared autoencoder: every gate activation (ReLU, LeakyReLU, ReLU6, Hardtanh, any spelling) becomes a ReLU on
the decoder's own signal; pooling indices, tied weights and the final multiplication with x stay."""

# The exact classes (not _BatchNorm): SyncBatchNorm's batch variance spans processes, which z.var() would not see.
TRAIN_BN = RuleSet({nn.BatchNorm1d: train_batch_norm, nn.BatchNorm2d: train_batch_norm,
                    nn.BatchNorm3d: train_batch_norm, F.batch_norm: train_batch_norm_function},
                   name="train-bn", gradient=True)
"""LRP0 with BatchNorm's batch variance kept in the autograd graph (same heatmaps); `rs | TRAIN_BN` adds it to any
set."""


def epsilon(eps: float = 1e-6) -> RuleSet:
    """LRP-epsilon as zennit defines it: the cotangent at each conv/linear/BN output z is scaled by
    f(z) / (z + eps * sign(z)), f the activation that follows (identity if none)."""
    return RuleSet(epsilon=eps, name="epsilon")


PRESETS: Mapping[str, RuleSet] = MappingProxyType({
    "lrp0": LRP0, "epsilon": epsilon(1e-6), "ws-ae": WS_AE, "train-bn": TRAIN_BN})


def get(rules_: RuleSet | str) -> RuleSet:
    """A RuleSet, or the preset of that name."""
    if isinstance(rules_, RuleSet):
        return rules_
    if isinstance(rules_, str):
        if rules_ not in PRESETS:
            raise ValueError(f"rules={rules_!r}: expected a RuleSet or one of {', '.join(map(repr, PRESETS))}")
        return PRESETS[rules_]
    raise TypeError(f"rules: expected a unroll.rulesets.RuleSet or a preset name ({', '.join(PRESETS)}), "
                    f"got {type(rules_).__name__}")
