"""Errors that say which node, which op, where in the source, and what to do."""
from __future__ import annotations

import os

import torch.fx as fx


class UnsupportedModelError(TypeError):
    """The model cannot be unrolled exactly; the message names the offending node(s) and what to do."""


def source_line(node: fx.Node) -> str:
    """The user's source line that created `node` (the last frame outside torch itself)."""
    trace = node.meta.get("stack_trace") or ""
    lines = trace.strip().splitlines()
    torch_dir = os.sep + "torch" + os.sep
    best = ""
    for i, line in enumerate(lines):
        line = line.strip()
        if line.startswith("File ") and torch_dir not in line:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            best = f"{line.replace('File ', '', 1)}: `{code}`"
    return best


def module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, _ = list(stack.values())[-1]
        return f"inside {path}"
    return "top level"


def describe(node: fx.Node, root=None) -> str:
    """One line: node name, op, module path, source line."""
    if node.op == "call_module" and root is not None:
        op = f"{type(root.get_submodule(node.target)).__name__} module"
    elif node.op == "call_function":
        op = getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__", str(node.target))
        mod = getattr(node.target, "__module__", None)
        op = f"function {mod + '.' if mod and mod not in ('_operator', 'builtins') else ''}{op}"
    elif node.op == "call_method":
        op = f"Tensor.{node.target}() method"
    else:
        op = f"{node.op} {node.target}"
    where = source_line(node)
    return f"node '{node.name}': {op} ({module_path(node)})" + (f"\n      at {where}" if where else "")
