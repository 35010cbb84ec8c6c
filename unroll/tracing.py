"""Tracing a model's forward into one fx graph with one input and one logits output.

torch.fx symbolic tracing, with what ordinary model code needs on top:

- Optional forward arguments (`forward(x, attn_mask=None, return_dict=None)`) keep their defaults; only the first
  parameter is the input. A second parameter without a default is refused.
- `output=`: the logits out of a dict, a transformers ModelOutput or a tuple (a key, attribute name or index), or a
  callable applied to whatever forward() returns -- selected while tracing, so the graph returns one tensor.
- Python control flow. A branch, len(), iteration or int() on a traced value is looked at where it happens: if the
  value can depend on the input's *values* (`if x.sum() > 0`), the model is refused with that source line. If it
  depends only on shapes (`if x.shape[-2] < 7`, a channel-count check), a plain symbolic trace cannot continue
  either, but a trace specialised to an example input can: `example=` runs the model on that tensor alongside the
  trace, every such decision takes the example's outcome, and the graph gets a guard (`check_input`) that refuses
  any input whose shape could change one of those decisions. Which dimensions the guard fixes follows from what the
  decisions read: `x.shape[1]` of the input fixes dimension 1 only; the shape of an intermediate tensor fixes the
  whole input shape (batch included), since unroll cannot see how it follows from the input's.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import os
import traceback
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx._symbolic_trace import _orig_module_call
from torch.fx.proxy import Attribute

from .errors import UnsupportedModelError

ALL = "all"  # a decision that may depend on every dimension of the input's shape
_SHAPE_READS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_SHAPE_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "get_device"}
_TORCH_DIR = os.sep + "torch" + os.sep


class Decision(NamedTuple):
    """A Python-level decision the trace took from a traced value: what it read, and where."""
    reads: frozenset  # input dims it depends on (ints), or {ALL}
    where: str  # file:line `code`
    what: str  # "branch", "len()", "iteration", "int()"


def check_input(x: torch.Tensor, shape: tuple, where: str) -> torch.Tensor:
    """The guard of a specialised trace: x must match `shape` (None = any size) in the dims the decisions read."""
    if x.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise InputShapeError(
            f"this unroll compilation serves inputs of shape {want} (* = any size), got {tuple(x.shape)}: the "
            f"model's forward() takes Python decisions from the input's shape, at\n  {where}\n"
            "and the graph was traced with the example's outcome. Compile again with "
            f"unroll.compile(model, example=<a tensor of shape {tuple(x.shape)}>) for this size.")
    return x


class InputShapeError(ValueError):
    """An input of a shape the specialised compilation does not serve."""


class NeedsExampleError(UnsupportedModelError):
    """forward() takes Python decisions from shapes: compile(model, example=...) traces it for one shape."""


def _user_frame(skip_files=(__file__,)) -> str:
    """file:line `code` of the innermost frame outside torch and this module: the model's own source line."""
    for frame in reversed(traceback.extract_stack()):
        if _TORCH_DIR not in frame.filename and frame.filename not in skip_files:
            return f"{frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`"
    return "(source line unknown)"


def _frame_of(exc: BaseException) -> str:
    """The last frame of a traceback outside torch: where in the model's code tracing failed."""
    best = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        if _TORCH_DIR not in frame.filename and frame.filename != __file__:
            best = f"{frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`"
    return best


def _without_own_frames(stack: str) -> str:
    """A node's recorded stack without this module's frames: error messages point at the model's source line."""
    lines, kept, skip = stack.splitlines(), [], False
    for line in lines:
        if line.lstrip().startswith("File "):
            skip = f'"{__file__}"' in line
        if not skip:
            kept.append(line)
    return "\n".join(kept)


class _Proxy(fx.Proxy):
    """A proxy whose len(), int() and attribute reads go through the tracer (fx's own raise or stay lazy)."""

    def __getattr__(self, k: str) -> "_Attribute":
        return _Attribute(self, k)

    def __len__(self) -> int:
        return self.tracer.concrete(self, "len()", len)

    def __index__(self) -> int:
        return self.tracer.concrete(self, "int()", operator.index)

    def __int__(self) -> int:
        return self.tracer.concrete(self, "int()", int)

    def __float__(self) -> float:
        return self.tracer.concrete(self, "float()", float)


class _Attribute(Attribute, _Proxy):
    pass


class _Tracer(fx.Tracer):
    """fx.Tracer that knows, at every Python decision on a traced value, what the value depends on; with an
    example input it also computes every node's value on that example, so such decisions can be taken."""

    def __init__(self, example: torch.Tensor | None, input_name: str, output: Any):
        super().__init__()
        self.input_name, self.output = input_name, output
        self.record_stack_traces = True  # node.meta["stack_trace"]: lets errors point at the user's source line
        self.example = example
        self.values: dict[fx.Node, Any] = {}
        self.decisions: list[Decision] = []
        self._input: fx.Node | None = None
        self._direct = 0  # >0 while a leaf module runs on concrete values: no tracing inside it
        self.training_reads: dict[int, tuple[nn.Module, bool]] = {}  # id -> (module, the .training value read)

    # ---------------------------------------------------------------- building the graph (and values)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """One placeholder, the input: forward()'s other parameters keep their defaults (fx would make each an
        input); and the result goes through select_output, so the graph returns the logits tensor."""
        output = self.output

        def forward(model, x):
            return select_output(root_fn(model, x), output)

        return forward, [self.root, self.create_proxy("placeholder", self.input_name, (), {})]

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        # every node, also the get_attr nodes fx creates for buffers and constants without a proxy
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if node.meta.get("stack_trace"):
            node.meta["stack_trace"] = _without_own_frames(node.meta["stack_trace"])
        if kind == "placeholder" and self._input is None:
            self._input = node
        if self.example is not None and kind != "output":
            self.values[node] = self._evaluate(node)
        return node

    def _evaluate(self, node: fx.Node) -> Any:
        """The node's value on the example, computed from its inputs' values -- with tracing off meanwhile, so
        attribute reads and module calls inside are plain Python again."""
        self._direct += 1
        try:
            if node.op == "placeholder":
                return self.example
            if node.op == "get_attr":
                return operator.attrgetter(node.target)(self.root)
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), self.values.__getitem__)
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                return _orig_module_call(self.root.get_submodule(node.target), *args, **kwargs)
            return None
        finally:
            self._direct -= 1

    def call_module(self, m, forward, args, kwargs):
        if self._direct:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._direct:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # ---------------------------------------------------------------- Python decisions on traced values

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.concrete(obj, "branch", bool)

    def iter(self, obj: fx.Proxy):
        n = self.concrete(obj, "iteration", len)
        return iter([obj[i] for i in range(n)])

    def concrete(self, obj: fx.Proxy, what: str, convert: Callable) -> Any:
        """The example's value of `obj` converted by `convert`, recorded as a decision of the trace; refused if it
        depends on the input's values, or (without an example) in any case."""
        where = _user_frame()
        reads = self._reads(obj.node)
        if reads is None:
            raise UnsupportedModelError(
                f"data-dependent Python control flow ({what} on a value computed from the input's values) at\n"
                f"  {where}\n"
                "The traced graph would hard-wire one outcome and be wrong for other inputs. unroll needs forward() "
                "to take decisions from shapes and module attributes only; move this logic out of forward().")
        if self.example is None:
            raise _NeedsExample(what, where)
        value = convert(self.values[obj.node])
        if reads:  # an empty set: the value does not depend on the input at all (e.g. a parameter's shape)
            self.decisions.append(Decision(frozenset(reads), where, what))
        return value

    def _reads(self, node: fx.Node) -> set | None:
        """Which input dims `node`'s value depends on: a set of ints, {ALL}, or None if it depends on the input's
        values (not just its shape)."""
        reads: set = set()
        seen, todo = set(), [node]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            read = self._shape_read(n)
            if read is not None:
                reads |= read
                continue
            if n is self._input:
                return None
            todo.extend(n.all_input_nodes)
        return reads

    def _shape_read(self, n: fx.Node) -> set | None:
        """What a node reading shape/dtype metadata of a tensor depends on (None: not such a node)."""
        if n.op == "call_function" and n.target is getattr and n.args[1] in _SHAPE_READS:
            tensor = n.args[0]
        elif n.op == "call_method" and n.target in _SHAPE_METHODS:
            tensor = n.args[0]
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            if tensor is self._input and n.target == "size" and isinstance(dim, int):
                return {dim % self.example.dim() if self.example is not None else dim}
        elif (n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[0], fx.Node)
              and n.args[0].op == "call_function" and n.args[0].target is getattr and n.args[0].args[1] == "shape"
              and n.args[0].args[0] is self._input and isinstance(n.args[1], int)):
            dim = n.args[1]  # x.shape[i] of the input itself: only dimension i
            return {dim % self.example.dim() if self.example is not None else dim}
        else:
            return None
        if not isinstance(tensor, fx.Node) or not self._depends_on_input(tensor):
            return set()  # a parameter's or constant's shape
        return {ALL}

    def _depends_on_input(self, node: fx.Node) -> bool:
        seen, todo = set(), [node]
        while todo:
            n = todo.pop()
            if n is self._input:
                return True
            if n not in seen:
                seen.add(n)
                todo.extend(n.all_input_nodes)
        return False


class _NeedsExample(Exception):
    def __init__(self, what: str, where: str):
        super().__init__(what, where)
        self.what, self.where = what, where


def _input_name(model: nn.Module) -> str:
    """The name of forward()'s input (its first parameter); every other parameter must have a default."""
    params = list(inspect.signature(model.forward).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not positional:
        raise UnsupportedModelError(
            f"{type(model).__name__}.forward takes no positional input; unroll needs forward(x, ...)")
    required = [p.name for p in params if p is not positional[0]
                and p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if required:
        names = [positional[0].name, *required]
        raise UnsupportedModelError(
            f"unroll compiles models with one input tensor; {type(model).__name__}.forward() requires "
            f"{len(names)} ({', '.join(names)}). Give the others defaults, or wrap the model so forward(x) takes "
            "the image only.")
    return positional[0].name


def select_output(result: Any, output: str | int | Callable | None) -> Any:
    """The logits out of whatever forward() returned (while tracing: proxies inside dicts, dataclasses, tuples)."""
    if callable(output):
        return output(result)
    if output is None:
        if isinstance(result, fx.Proxy):
            return result
        if isinstance(result, dict) or hasattr(result, "keys"):
            keys = list(result.keys())
            raise UnsupportedModelError(
                f"the model returns {type(result).__name__} with keys {keys}; unroll needs the (B, K) logits. "
                f"Pass output= with the key holding them, e.g. unroll.compile(model, output={keys[0]!r}), or a "
                "callable taking forward()'s result.")
        raise UnsupportedModelError(
            f"the model returns {type(result).__name__} ({result!r:.200}); unroll needs forward() to return the "
            "logits as one (B, K) tensor. Pass output= (a key, attribute name or index, or a callable), or wrap "
            "the model to return just the class scores.")
    if isinstance(output, int) and isinstance(result, (tuple, list)):
        if not -len(result) <= output < len(result):
            raise UnsupportedModelError(f"output={output}: the model returns {len(result)} values")
        return result[output]
    if isinstance(output, str) and not isinstance(result, fx.Proxy):
        keyed = isinstance(result, dict) or hasattr(result, "keys")
        if keyed and output in result.keys():
            return result[output]
        if hasattr(result, output):
            return getattr(result, output)
        if keyed:
            raise UnsupportedModelError(
                f"output={output!r}: the model returns {type(result).__name__} with keys {list(result.keys())}")
    raise UnsupportedModelError(
        f"output={output!r} does not select anything from what the model returns ({type(result).__name__})")


def trace(model: nn.Module, example: torch.Tensor | None = None, output: Any = None) -> fx.Graph:
    """One fx graph: the model's forward from its first argument to the logits, optional arguments at their
    defaults. Without `example`, a symbolic trace (serves every input shape). With it, the symbolic trace if it
    succeeds, else a trace specialised to the example's shape, guarded by `check_input`."""
    if example is not None and not isinstance(example, torch.Tensor):
        raise TypeError(f"example= must be an input tensor (B, C, ...), got {type(example).__name__}")
    try:
        return _trace(model, None, output)
    except _NeedsExample as need:
        if example is None:
            raise NeedsExampleError(
                f"{type(model).__name__}.forward() takes a Python decision ({need.what}) from a tensor's shape at\n"
                f"  {need.where}\n"
                "A symbolic trace serves every input size and cannot take it. Pass an example input, "
                "unroll.compile(model, example=torch.randn(B, C, H, W)), to trace a version specialised to that "
                "input shape (it refuses other shapes).") from None
    return _trace(model, example, output)


def _trace(model: nn.Module, example: torch.Tensor | None, output: Any) -> fx.Graph:
    tracer = _Tracer(example, _input_name(model), output)
    state = _snapshot(model) if example is not None else None
    try:
        with _reading_training_flags(model, tracer):
            graph = tracer.trace(model)
    except (UnsupportedModelError, _NeedsExample):
        raise
    except Exception as e:  # fx raises TraceError, TypeError, ... e.g. for a proxy passed where an int is needed
        where = _frame_of(e)
        raise UnsupportedModelError(
            f"torch.fx could not trace {type(model).__name__}: {type(e).__name__}: {e}"
            + (f"\n  at {where}" if where else "")) from e
    finally:
        if state is not None:
            _restore(model, state)
    if tracer.decisions:
        _add_guard(graph, tracer, example)
    paths: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), name)
    graph._unroll_training_reads = {paths[i]: value for i, (m, value) in tracer.training_reads.items() if i in paths}
    return graph


def training_reads(graph: fx.Graph) -> dict[str, bool]:
    """The modules whose `.training` the trace read ('' = the root), with the value read: fx records a Python bool
    into the graph (`F.batch_norm(..., self.training)`, `F.dropout(training=self.training)`, `if self.training:`),
    so the graph computes that mode's function whatever the module's mode later. Leaf modules called as such
    (nn.BatchNorm2d, nn.Dropout) are not among them: their forward runs at call time and reads the live flag."""
    return dict(getattr(graph, "_unroll_training_reads", {}))


class _TrainingFlag:
    """A data descriptor set on the model's module classes while tracing: `.training` reads as usual (the
    instance's own value) and, outside a leaf module running on the example, is recorded by the tracer."""

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        try:
            value = obj.__dict__["training"]
        except KeyError:
            raise AttributeError("training") from None
        if _READERS and not _READERS[-1]._direct:
            _READERS[-1].training_reads.setdefault(id(obj), (obj, value))
        return value

    def __set__(self, obj, value):
        obj.__dict__["training"] = value

    def __delete__(self, obj):
        del obj.__dict__["training"]


_FLAG = _TrainingFlag()
_READERS: list = []  # the tracers recording (a stack: a trace inside a trace records into the inner one)


@contextlib.contextmanager
def _reading_training_flags(model: nn.Module, tracer: "_Tracer"):
    """While tracing, record every read of a module's `.training` (see training_reads). A class that defines
    `training` itself (a property, a class attribute) is left alone: its reads are not seen."""
    classes = {type(m) for m in model.modules()}
    patched = [c for c in classes if not any("training" in k.__dict__ for k in c.__mro__)]
    for c in patched:
        type.__setattr__(c, "training", _FLAG)
    _READERS.append(tracer)
    try:
        yield
    finally:
        _READERS.remove(tracer)
        for c in patched:
            if c.__dict__.get("training") is _FLAG:
                type.__delattr__(c, "training")


def _snapshot(model: nn.Module):
    """Buffers (BatchNorm running stats) and the RNG: running the example must leave no trace in the model."""
    return {k: b.detach().clone() for k, b in model.named_buffers()}, torch.random.get_rng_state()


def _restore(model: nn.Module, state) -> None:
    buffers, rng = state
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(buffers[k])
    torch.random.set_rng_state(rng)


def _add_guard(graph: fx.Graph, tracer: _Tracer, example: torch.Tensor) -> None:
    reads = set().union(*(d.reads for d in tracer.decisions))
    dims = range(example.dim()) if ALL in reads else reads
    shape = tuple(example.shape[i] if i in dims else None for i in range(example.dim()))
    where = "\n  ".join(dict.fromkeys(f"{d.where} ({d.what})" for d in tracer.decisions))
    x = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(x):
        graph.call_function(check_input, (x, shape, where))


def served_shape(graph: fx.Graph) -> tuple | None:
    """The input shapes a traced graph serves: None for every shape, else its guard's shape (None = any size)."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is check_input:
            return node.args[1]
    return None
