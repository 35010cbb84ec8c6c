"""Arguments by name: every call node's arguments normalised to {parameter name: value} by the op's schema.

Rules read `alpha`, `dim`, `padding`, `inplace` by name, whether the model wrote them by position or keyword, as
a function (`torch.add(a, b, alpha=2)`), a method (`a.add(b, alpha=2)`) or an operator (`a + b`). Torch functions
use torch.fx's schema matching (`normalize_function`); Tensor methods map to the torch function of the same name
(`self` becomes its first parameter); the few spellings with no torch schema -- `operator.*`, methods taking
varargs (`x.view(2, 3)`) or without a torch function (`contiguous`) -- have Python signatures below.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.operator_schemas import get_signature_for_torch_op, normalize_function, normalize_module


def _binary(input, other): ...
def _unary(input): ...
def _getitem(input, index): ...
def _view(input, *shape): ...
def _permute(input, *dims): ...
def _repeat(input, *sizes): ...
def _expand(input, *size, implicit=False): ...
def _as(input, other): ...
def _contiguous(input, memory_format=torch.contiguous_format): ...
def _tile(input, *dims): ...
def _split(input, split_size_or_sections, dim=0): ...
def _sum(input, dim=None, keepdim=False, *, dtype=None): ...
def _squeeze(input, dim=None): ...
def _flip(input, *dims): ...
def _where(input, condition, other): ...
def _to(input, *args, **kwargs): ...


_BINARY = (operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
           operator.itruediv)
_FUNCTIONS = {op: _binary for op in _BINARY} | {operator.neg: _unary, operator.getitem: _getitem}
_METHODS = {
    "view": _view, "reshape": _view, "permute": _permute, "repeat": _repeat, "expand": _expand, "tile": _tile,
    "view_as": _as, "reshape_as": _as, "expand_as": _as, "contiguous": _contiguous,
    "split": _split, "sum": _sum, "squeeze": _squeeze, "flip": _flip,
    "where": _where, "to": _to,
}
_VARARGS = {"shape", "dims", "sizes", "size"}  # x.view(2, 3) and x.view((2, 3)) mean the same


def method_function(name: str):
    """The torch function a Tensor method name normalises like (`add_` -> torch.add), or None (`torch.float` is
    a dtype, not the method's function)."""
    for candidate in (name, name.rstrip("_")):
        fn = getattr(torch, candidate, None)
        if callable(fn) and not isinstance(fn, (torch.dtype, type)):
            return fn
    return None


def _bind(signature: inspect.Signature, args, kwargs) -> dict[str, Any]:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL and name in _VARARGS:
            value = out[name]
            out[name] = tuple(value[0]) if len(value) == 1 and isinstance(value[0], (tuple, list, torch.Size)) \
                else tuple(value)
    return out


def _types(values):
    return tuple(torch.Tensor if isinstance(v, fx.Node) else type(v) for v in values)


def _torch_function(target, args, kwargs) -> dict[str, Any] | None:
    try:
        found = normalize_function(target, args, kwargs, normalize_to_only_use_kwargs=True)
        if found is None:  # overloads torch.fx could not tell apart without types: give it the types we know
            found = normalize_function(target, args, kwargs, arg_types=_types(args),
                                       kwarg_types=dict(zip(kwargs, _types(kwargs.values()))),
                                       normalize_to_only_use_kwargs=True)
    except RuntimeError:  # still ambiguous (a traced int looks like a Tensor): first overload that binds
        found = None
    if found is not None:
        return dict(found.kwargs)
    signatures = get_signature_for_torch_op(target)
    if signatures is None:  # a Python function
        try:
            signatures = [inspect.signature(target)]
        except (TypeError, ValueError):
            signatures = []
    for signature in signatures:
        try:
            return _bind(signature, args, kwargs)
        except TypeError:
            continue
    return None


def normalized_arguments(node: fx.Node, root: torch.nn.Module) -> dict[str, Any] | None:
    """{parameter name: value} for a call node (defaults filled in), or None if no schema binds its arguments.

    Modules give their forward()'s parameters (their settings are module attributes). A method's `self` is the
    first parameter of the torch function it maps to (usually `input`)."""
    try:
        return _normalized(node, root)
    except Exception:  # a target no schema describes (a user function fx.wrap'ed): rules that read args refuse
        return None


def _normalized(node: fx.Node, root: torch.nn.Module) -> dict[str, Any] | None:
    args, kwargs = tuple(node.args), dict(node.kwargs)
    if node.op == "call_module":
        found = normalize_module(root, node.target, args, kwargs, normalize_to_only_use_kwargs=True)
        return dict(found.kwargs) if found is not None else None
    if node.op == "call_function":
        if node.target in _FUNCTIONS:
            return _bind(inspect.signature(_FUNCTIONS[node.target]), args, kwargs)
        return _torch_function(node.target, args, kwargs)
    if node.op == "call_method":
        name = str(node.target)
        if name in _METHODS:
            return _bind(inspect.signature(_METHODS[name]), args, kwargs)
        fn = method_function(name)
        return _torch_function(fn, args, kwargs) if fn is not None else None
    return None
