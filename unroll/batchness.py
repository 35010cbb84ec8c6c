"""Which forward values have the batch dimension in front ("batched"): batch-ness follows data flow, through
values and through shapes.

A value is batched if it is computed from the input's values (a mask `y > 0.1`, through non-differentiable ops
too), or built with the batch size as its first dim: a factory whose size starts with the batch size of a batched
value (`torch.ones((x.size(0), C, 1, 1))`, `torch.zeros(x.shape)`, `x.new_ones((x.shape[0],) + (1,) * 3)`), a
`*_like` of a batched value, a constant expanded or reshaped to such a size (`self.w.expand(x.size(0), -1)`) or
cut to its first batch-size rows (`self.table[:x.size(0)]`); and whatever is computed from batched values.

Shape queries (`x.shape`, `x.size(0)`) and Python's scalar arithmetic on them (`math.ceil(h / s) * s - h`,
`c ** -0.5`) are numbers: they have no dims, so they are never batched nor undecided themselves; they only carry
the batch size, or not, into whatever tensor is built with them.

Where the batch size reaches a tensor some other way -- a size from a negative shape index or arithmetic on the
batch size, a factory with it in a later dim, a tensor op that is not one of the above -- nobody can tell from the
graph whether the tensor's first dim is the batch: it is *undecided*, with the node that made it so. Only a rule that needs to know (an
operand meeting the cotangent) refuses it; a value the decoder never reads (timm's class token expanded to the
batch size and concatenated) costs nothing.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}

# factories whose size is their arguments (or one sequence of them): batched iff the size starts with the batch size
FACTORIES = {torch.ones, torch.zeros, torch.empty, torch.full, torch.rand, torch.randn}
NEW_FACTORIES = {"new_ones", "new_zeros", "new_empty", "new_full"}  # methods: the size follows `self`
LIKE = {torch.ones_like, torch.zeros_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
        torch.randint_like}  # the shape of their first argument
RESIZE = {"expand", "view", "reshape", torch.reshape}  # a constant resized to a size that starts with the batch size
# what a factory reads besides its size: never a batch dim
_OPTIONS = {"dtype", "device", "layout", "pin_memory", "requires_grad", "memory_format", "generator", "out",
            "names"}

# the batch-size status of a shape value
B = "the batch size"
B_FIRST = "a shape starting with the batch size"
UNKNOWN = "a number or shape involving the batch size"


def is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in SHAPE_ATTRS
    return node.op == "call_method" and (node.target in ("size", "dim", "numel") or is_type_query(node))


def is_type_query(node: fx.Node) -> bool:
    """`x.type()` without a dtype returns a string; `x.type(dtype)` is a cast (a tensor on the gradient path)."""
    return node.op == "call_method" and node.target == "type" and len(node.args) == 1 and not node.kwargs


@dataclass
class Batchness:
    batched: set[fx.Node] = field(default_factory=set)
    undecided: dict[fx.Node, fx.Node] = field(default_factory=dict)  # value -> the node that made it undecided
    sizes: dict[fx.Node, str] = field(default_factory=dict)  # shape values involving the batch size: B, B_FIRST...
    numbers: set[fx.Node] = field(default_factory=set)  # shape queries and arithmetic on them only (no tensors)


def analyse(graph: fx.Graph, input_node: fx.Node) -> Batchness:
    """Batch-ness of every node, in one pass in graph order."""
    out = Batchness(batched={input_node})
    for n in graph.nodes:
        if n.op not in ("call_function", "call_method", "call_module"):
            continue
        if is_shape_query(n):
            out.numbers.add(n)
            status = _query(n, out)
        elif _is_number(n, out):
            # a Python number (or tuple of them) has no dims, so no batch dim either: it only carries the batch
            # size, or not, as a value -- never batched, never undecided (timm's pad_same pads by ceil(H / s))
            out.numbers.add(n)
            status = _shape_arithmetic(n, out)
        else:
            status = _value(n, out)
        if status in (B, B_FIRST, UNKNOWN):
            out.sizes[n] = status
        elif status == "batched":
            out.batched.add(n)
        elif isinstance(status, fx.Node):
            out.undecided[n] = status
            out.sizes[n] = UNKNOWN  # (an undecided value used as a size leaves that size undecided too)
    return out


def _query(n: fx.Node, st: Batchness):
    """x.shape / x.size() / x.size(d) / x.ndim ...: only a batched (or undecided) x's shape carries the batch
    size."""
    x = n.args[0]
    if x not in st.batched and x not in st.undecided:
        return None
    if n.op == "call_function":  # getattr(x, attr)
        return (B_FIRST if x in st.batched else UNKNOWN) if n.args[1] == "shape" else None
    if n.target == "numel":
        return UNKNOWN  # B times the rest
    if n.target != "size":
        return None
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    if dim is None:
        return B_FIRST if x in st.batched else UNKNOWN
    if dim == 0 and x in st.batched:
        return B
    return UNKNOWN if not isinstance(dim, int) or dim < 0 or x in st.undecided else None


def _status(value, st: Batchness):
    """The batch-size status of an argument (a literal, a node, or a list / tuple of them as written)."""
    if isinstance(value, fx.Node):
        return st.sizes.get(value)
    if isinstance(value, (tuple, list)):
        return UNKNOWN if any(_status(v, st) for v in value) else None
    return None


def _leading(size, st: Batchness):
    """Batch-ness of a size as written: a sequence (or one shape value) starting with the batch size is
    'batched'; one with the batch size elsewhere, or unknown, is UNKNOWN; None: no batch size anywhere."""
    if isinstance(size, (tuple, list)) and len(size) == 1 and _status(size[0], st) == B_FIRST:
        size = size[0]  # torch.ones(x.shape): the one argument is the whole size
    if isinstance(size, fx.Node):
        status = st.sizes.get(size)
        return "batched" if status == B_FIRST else UNKNOWN if status else None
    if isinstance(size, (tuple, list)) and len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = size[0]
    if not isinstance(size, (tuple, list)):
        return UNKNOWN if _status(size, st) else None
    if size and _status(size[0], st) == B:
        return "batched"  # the rest may involve the batch size too: the first dim is what pairs with samples
    return UNKNOWN if _status(size, st) else None


def _shape_arithmetic(n: fx.Node, st: Batchness):
    """Tuples and numbers computed from shapes: x.shape[0], x.shape[:2], (x.size(0),) + (1,) * 3."""
    args = n.args
    if n.target is operator.getitem and args[0] in st.sizes and st.sizes[args[0]] == B_FIRST:
        index = args[1]
        if isinstance(index, int) and not isinstance(index, bool):
            return B if index == 0 else None if index > 0 else UNKNOWN
        if isinstance(index, slice) and all(not isinstance(v, fx.Node) for v in (index.start, index.stop,
                                                                                  index.step)):
            start, stop, step = index.start or 0, index.stop, index.step or 1
            if step > 0 and start == 0 and (stop is None or stop > 0):
                return B_FIRST
            if step > 0 and start > 0 and (stop is None or stop >= 0):
                return None  # x.shape[1:]: the batch size is cut off
        return UNKNOWN
    if n.target is operator.add and len(args) == 2:
        first, second = args
        if isinstance(first, (tuple, list)) and first:  # (x.size(0),) + rest: the first entry decides
            return B_FIRST if _status(first[0], st) == B else UNKNOWN if _status(args, st) else None
        if isinstance(first, fx.Node) and st.sizes.get(first) == B_FIRST:
            return B_FIRST
    return UNKNOWN if _status(list(args) + list(n.kwargs.values()), st) else None


def _value(n: fx.Node, st: Batchness):
    inputs = n.all_input_nodes
    target = n.target if _hashed_in(n.target, LIKE | FACTORIES | NEW_FACTORIES | RESIZE) else None
    if target in LIKE:
        source = n.args[0] if n.args else n.kwargs.get("input")
        return "batched" if source in st.batched else st.undecided.get(source, n if source in st.undecided else None)
    if target in FACTORIES or target in NEW_FACTORIES or (target in RESIZE and n.args[0] not in st.batched):
        skip = 0 if target in FACTORIES else 1  # new_ones(self, *size) / expand(self, *size) / reshape(x, shape)
        if target in RESIZE and n.args[0] in st.undecided:
            return st.undecided[n.args[0]]
        args = list(n.args[skip:])
        if target in (torch.full, "new_full"):
            args = args[:1]  # (size, fill_value)
        size = n.kwargs.get("size", n.kwargs.get("shape", args))
        others = [v for k, v in n.kwargs.items() if k not in _OPTIONS and k != "size"]
        if any(isinstance(v, fx.Node) and v in st.batched for v in others):
            return n  # a fill value computed from the input
        leading = _leading(size, st)
        return "batched" if leading == "batched" else n if leading == UNKNOWN else None
    if any(a in st.batched for a in inputs):
        return "batched"  # computed from the input's values (or from a batched value)
    undecided = [st.undecided[a] for a in inputs if a in st.undecided]
    if undecided:
        return undecided[0]
    if _first_rows(n, st):
        return "batched"  # self.table[:x.size(0)]: the constant's first B rows, one per sample
    if any(a in st.sizes for a in inputs):
        # the batch size reaches a tensor op as an argument some other way (self.w.repeat(x.size(0), 1),
        # self.table[1:x.size(0) + 1]): its first dim may be the batch or not, nobody can tell
        return n
    return None


def _first_rows(n: fx.Node, st: Batchness) -> bool:
    """`t[:b]` / `t[:b, ...]` / `t[0:b:1]` of a tensor t, b the batch size: the first dim is cut to the batch
    size, as `expand` makes it."""
    if n.op != "call_function" or n.target is not operator.getitem or n.args[0] in st.numbers:
        return False
    index = n.args[1]
    first = index[0] if isinstance(index, tuple) and index else index
    return (isinstance(first, slice) and first.start in (None, 0) and first.step in (None, 1)
            and isinstance(first.stop, fx.Node) and st.sizes.get(first.stop) == B)


# Python's scalar arithmetic: on numbers (shape entries, tuples of them) it gives numbers again
_SCALAR_OPS = {
    *(getattr(operator, name) for name in (
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos", "abs", "lt", "le", "eq",
        "ne", "ge", "gt", "not_", "truth", "and_", "or_", "xor", "lshift", "rshift", "index")),
    *(f for name, f in vars(math).items() if callable(f) and not name.startswith("_")),  # ceil, floor, sqrt...
    max, min, abs, int, float, round, bool, len, sum}


def _is_number(n: fx.Node, st: Batchness) -> bool:
    """A Python number or tuple of them: scalar arithmetic whose node inputs are all numbers (a tensor input
    makes it a tensor op: `w * x.size(0)`)."""
    inputs = n.all_input_nodes
    return (n.op == "call_function" and _hashed_in(n.target, _SCALAR_OPS) and bool(inputs)
            and all(a in st.numbers for a in inputs))


def _hashed_in(target, table) -> bool:
    try:
        return target in table
    except TypeError:  # an unhashable target
        return False
