"""Which forward values have the batch dimension in front ("batched"): batch-ness follows data flow, through
values and through shapes.

A value is batched if it is computed from the input's values (a mask `y > 0.1`, through non-differentiable ops
too), or built with the batch size as its first dim: a factory whose size starts with the batch size of a batched
value (`torch.ones((x.size(0), C, 1, 1))`, `torch.zeros(x.shape)`, `x.new_ones((x.shape[0],) + (1,) * 3)`), a
`*_like` of a batched value, a constant expanded or reshaped to such a size (`self.w.expand(x.size(0), -1)`), the
first rows of a constant (`self.table[:x.size(0)]`); and whatever is computed from batched values. Shape queries
(`x.shape`, `x.size(0)`) are never batched themselves: they carry the batch size as a number.

Where the batch size reaches a value some other way -- a negative shape index, arithmetic on it, a factory with
it in a later dim, an op that is not one of the above (`w.repeat(x.size(0), 1)`) -- nobody can tell from the graph
whether the value's first dim is the batch: the value is *undecided*, with the node that made it so. Only a rule
that needs to know (an operand meeting the cotangent) refuses it; a value the decoder never reads (timm's class
token expanded to the batch size and concatenated) costs nothing.
"""
from __future__ import annotations

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
    return node.op == "call_method" and node.target in ("size", "dim", "numel", "type")


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
        else:
            if _is_number_op(n) and all(a in out.numbers for a in n.all_input_nodes):
                out.numbers.add(n)
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
        return "batched" if source in st.batched else st.undecided.get(source)  # (None: a constant's shape)
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
    if n.target is operator.getitem and n.op == "call_function" and _first_rows(n, st):
        return "batched"
    undecided = [st.undecided[a] for a in inputs if a in st.undecided]
    if undecided:
        return undecided[0]
    if any(a in st.sizes for a in inputs):
        # the batch size reaches this node as an argument: shape arithmetic, or an op unroll cannot reason about
        if n in st.numbers:
            return _shape_arithmetic(n, st)
        return n  # (a tensor op: `self.table[:x.size(0)]` has the batch dim or not, nobody can tell)
    return None


def _first_rows(n: fx.Node, st: Batchness) -> bool:
    """`table[:x.size(0)]` (also `table[0:B, ...]`): the first B rows of a constant, one per sample (a table with
    fewer rows fails in the forward, or has one row and broadcasts)."""
    table, index = n.args
    if not isinstance(table, fx.Node) or table in st.numbers or table in st.sizes:
        return False
    first, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
    return (isinstance(first, slice) and first.start in (None, 0) and first.step in (None, 1)
            and isinstance(first.stop, fx.Node) and st.sizes.get(first.stop) == B and not _status(rest, st))


def _is_number_op(n: fx.Node) -> bool:
    """Python arithmetic on shape values (operator.*, builtins, math: timm's pad_same takes math.ceil of sizes):
    it gives numbers, never a tensor (a torch function of numbers, torch.ones((b, c)), is a tensor)."""
    module = getattr(n.target, "__module__", None) or ""
    return n.op == "call_function" and module in ("_operator", "operator", "builtins", "math")


def _hashed_in(target, table) -> bool:
    try:
        return target in table
    except TypeError:  # an unhashable target
        return False
