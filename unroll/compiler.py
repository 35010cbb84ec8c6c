"""unroll.compile: trace a ReLU classifier, instrument its forward, emit the tied decoder.

    trace       torch.fx symbolic trace of the model (stack traces kept for error messages)
    analyse     which nodes depend on the input ("active"), and which of those reach the logits
    emit        walk the graph from the logits back to the input; each node's rule (unroll.rules) turns the
                cotangent of its output into cotangents of its inputs, writing the decoder graph, and asks the
                forward graph to also return what it needs (gates, pool indices, shapes) -- nothing else is kept
    Unrolled    an nn.Module holding the model (its parameters, never copies) and the compiled graphs, which
                reach parameters, buffers and submodules through the live model (LiveGraph: `self.model.<path>`)
Which rule each op gets is a value, `unroll.rulesets.RuleSet` (compile(rules=...)).

Cotangents carry a class dimension after the batch dimension: q has shape (B, K, ...) where the encoder tensor
has (B, ...). Seeding q at the logits with the identity gives every class's d logit_k / d x in one pass.
"""
from __future__ import annotations

import copy
import operator
import weakref
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import batchness, ops, rules, rulesets, tracing
from .errors import UnsupportedModelError, describe
from .schema import normalized_arguments

_SHAPE_ATTRS = batchness.SHAPE_ATTRS


def trace(model: nn.Module, example: torch.Tensor | None = None, output: Any = None) -> fx.Graph:
    """The model's forward as one fx graph from the input to the logits (see unroll.tracing): a symbolic trace
    serving every input shape, or, where forward() branches on shapes and `example` is given, one specialised to
    the example's shape and guarded against others."""
    return tracing.trace(model, example, output)


def _is_non_differentiable(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SHAPE_ATTRS
    return (node.op in ("call_function", "call_method") and node.target in rules.NON_DIFFERENTIABLE
            or batchness.is_type_query(node))


class Step:
    """What a rule sees of one node: its cotangent `q`, its arguments, and ways to reach the forward pass."""

    def __init__(self, emitter: "Emitter", node: fx.Node, q: Any):
        self.em, self.node, self.q = emitter, node, q
        self.module = emitter.root.get_submodule(node.target) if node.op == "call_module" else None
        self.kw = normalized_arguments(node, emitter.root)
        # the main input (kept if a rule rewrites the node): the first argument, however it was passed
        self.x = node.args[0] if node.args else next(iter((self.kw or node.kwargs).values()), None)

    def arg(self, name: str) -> Any:
        """The op's argument `name`, however the model passed it (position, keyword, default), by the op's schema
        (unroll.schema). Methods count `self` as the first parameter (`input` for most ops)."""
        if self.kw is None or name not in self.kw:
            self.unsupported(f"its argument {name!r} could not be read by the op's schema "
                             f"(arguments {self.node.args!r:.200}, {self.node.kwargs!r:.200})")
        return self.kw[name]

    def active(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and value in self.em.active

    def derived(self, value: Any) -> bool:
        """Has the batch dimension in front (unroll.batchness): computed from the input's values (a mask
        `y > 0.1`, an active node), or built with the batch size (`torch.ones((x.size(0), C, 1, 1))`,
        `torch.zeros_like(y)`)."""
        return isinstance(value, fx.Node) and value in self.em.derived

    def decided(self, value: Any) -> None:
        """Refuse a value whose batch-ness the graph does not tell (the batch size went into it some way
        unroll.batchness does not follow), naming the node that made it so."""
        if isinstance(value, fx.Node) and value in self.em.batchness.undecided:
            cause = self.em.batchness.undecided[value]
            self.unsupported(
                f"its operand '{value.name}' is built from the batch size in a way unroll cannot tell gives it the "
                f"batch dim in front or not, at\n    {describe(cause, self.em.root)}\n"
                "  Build it with the batch size first (torch.ones((x.size(0), C, 1, 1)), x.new_zeros(x.shape), "
                "torch.zeros_like(x)), or without the batch size (a size-1 first dim)")

    def operand(self, value: Any, partner: fx.Node) -> Any:
        """An input-independent operand of an elementwise op with the active tensor `partner`, inside the decoder,
        ready to multiply a cotangent: a number as is; a tensor with the class dim inserted where it has the batch
        dim. A value computed from the input's values (a mask) is saved per sample, so samples= subsets it."""
        if not isinstance(value, fx.Node):
            return value
        self.decided(value)
        if self.derived(value):
            return ops.class_broadcast(self.save(ops.batch_operand, value, partner, name="operand"), self.q)
        return ops.constant_broadcast(self.constant(value), self.q, repr(value.name))

    def save(self, fn: Callable, *args: Any, name: str, batched: bool = True, after: bool = False) -> fx.Proxy:
        """Have the forward pass compute fn(*args) (right before this node, or after it) and return it; the
        decoder gets it as an input. `batched`: its first dim is the batch (so it can be subset per sample)."""
        graph = self.em.enc
        with graph.inserting_after(self.node) if after else graph.inserting_before(self.node):
            value = graph.call_function(fn, args)
        return self.em.saved_input(value, f"{name}_{self.node.name}", batched)

    def shape(self, node: fx.Node) -> fx.Proxy:
        """The runtime shape of an encoder value, as a decoder input (so the decoder works at any input size)."""
        if node not in self.em.shapes:
            with self.em.enc.inserting_after(node):
                value = self.em.enc.call_function(getattr, (node, "shape"))
            self.em.shapes[node] = self.em.saved_input(value, f"shape_{node.name}", False)
        return self.em.shapes[node]

    def module_ref(self) -> fx.Node:
        """The live module object as a forward-graph value (ops read .training, running stats at run time)."""
        with self.em.enc.inserting_before(self.node):
            return self.em.enc.get_attr(self.node.target)

    def param(self, ref: Any) -> Any:
        """A weight of the model inside the decoder: the same tensor the encoder uses, never a copy."""
        if isinstance(ref, str):  # an attribute of this node's module
            return getattr(self.em.decoder_attr(self.node.target), ref)
        return self.constant(ref)

    def constant(self, value: Any) -> Any:
        """A value that does not depend on the input: a model attribute, a computed tensor, or a number."""
        if not isinstance(value, fx.Node):
            return value
        if value.op == "get_attr":
            return self.em.decoder_attr(value.target)
        self.decided(value)
        if self.derived(value):
            self.unsupported(f"'{value.name}' has the batch dimension (it is computed from the input, or built with "
                             "the batch size) and is used here as a weight or constant")
        return self.em.saved_input(value, f"const_{value.name}", False)

    def rewrite_with_indices(self, fn: Callable, x: fx.Node, **kwargs: Any) -> fx.Proxy:
        """Replace this op by `fn(x, ..., return_indices=True)`; the decoder gets the indices."""
        _, indices = self._rewrite(fn, (x,), {**kwargs, "return_indices": True})
        return self.em.saved_input(indices, f"indices_{self.node.name}", True)

    def rewrite_with_mask(self, fn: Callable, *args: Any) -> fx.Proxy:
        """Replace this op by `fn(*args) -> (output, mask)`; the decoder gets the mask."""
        _, mask = self._rewrite(fn, args, {})
        return self.em.saved_input(mask, f"mask_{self.node.name}", True)

    def _rewrite(self, fn, args, kwargs):
        graph, old = self.em.enc, self.node
        with graph.inserting_before(old):
            both = graph.call_function(fn, args, kwargs)
            out = graph.call_function(operator.getitem, (both, 0))
            extra = graph.call_function(operator.getitem, (both, 1))
        out.meta = dict(old.meta)
        if old.op == "call_module":  # its settings are now copied into the call: the snapshot checks the module
            self.em.inlined.add(old.target)
        old.replace_all_uses_with(out)
        graph.erase_node(old)
        em = self.em  # the analysis sets and the logits must name the new node (the output may be this op)
        for nodes in (em.active, em.derived):
            nodes.add(out)
            nodes.add(both)
        if em.logits is old:
            em.logits = out
        self.node = out
        return out, extra

    def unsupported(self, reason: str):
        raise UnsupportedModelError(f"cannot unroll {describe(self.node, self.em.root)}: {reason}.")


class Emitter:
    def __init__(self, root: nn.Module, graph: fx.Graph, ruleset: rulesets.RuleSet):
        self.root, self.enc, self.rules, self.epsilon = root, graph, ruleset, ruleset.epsilon
        self.dec = fx.Graph()
        self.tracer = fx.proxy.GraphAppendingTracer(self.dec)  # one tracer: proxies from rules must mix freely
        self.saved: list[tuple[fx.Node, bool]] = []  # forward values the decoder reads, in placeholder order
        self.shapes: dict[fx.Node, fx.Proxy] = {}
        self.inlined: set[str] = set()  # call_module targets a rule replaced by a function call (Step._rewrite)
        self._attrs: dict[str, fx.Proxy] = {}
        self._last_placeholder = None
        self.seed = self._placeholder("seed")

        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedModelError(
                f"unroll compiles models with one input tensor; forward() takes {len(placeholders)} "
                f"({', '.join(p.name for p in placeholders)}). Wrap the model so forward(x) takes the image only.")
        self.input = placeholders[0]
        self.output = next(n for n in graph.nodes if n.op == "output")
        self.logits = self.output.args[0]
        if not isinstance(self.logits, fx.Node):
            raise UnsupportedModelError(
                f"the model returns {type(self.logits).__name__} ({self.logits!r:.200}); unroll needs forward() to "
                "return the logits as one (B, K) tensor. Wrap the model to return just the class scores.")
        self.active = self._active_nodes()
        self.batchness = batchness.analyse(graph, self.input)
        self.derived = self.batchness.batched  # (rewritten nodes join it: Step._rewrite)
        if self.logits not in self.active:
            raise UnsupportedModelError("the model's output does not depend on its input")
        self._check_rules()
        if self.epsilon is not None:
            self._plan_epsilon()

    # ------------------------------------------------------------------ analysis

    def _active_nodes(self) -> set[fx.Node]:
        """Nodes whose value depends on the input (shape arithmetic and comparisons do not carry gradients)."""
        active = {self.input}
        for n in self.enc.nodes:
            if n.op in ("call_function", "call_method", "call_module") and not _is_non_differentiable(n):
                if any(a in active for a in n.all_input_nodes):
                    active.add(n)
        return active

    def _needed(self) -> list[fx.Node]:
        """Active nodes on a path from the input to the logits: exactly those the decoder must reverse."""
        needed, todo = set(), [self.logits]
        while todo:
            n = todo.pop()
            if n in needed or n not in self.active:
                continue
            needed.add(n)
            todo.extend(n.all_input_nodes)
        return [n for n in self.enc.nodes if n in needed]

    def _module(self, node):
        return self.root.get_submodule(node.target) if node.op == "call_module" else None

    def _is_tuple_part(self, node: fx.Node) -> bool:
        return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
                and node.args[0].target in rules.TUPLE_OPS and isinstance(node.args[1], int))

    def _check_rules(self):
        missing = [n for n in self._needed() if n.op != "placeholder" and not self._is_tuple_part(n)
                   and self.rules.lookup(n.target, self._module(n)) is None]
        if missing:
            listed = "\n  ".join(describe(n, self.root) for n in missing[:8])
            more = f"\n  ... and {len(missing) - 8} more" if len(missing) > 8 else ""
            kinds = sorted({type(self._module(n)).__name__ if n.op == "call_module" else str(
                getattr(n.target, "__name__", n.target)) for n in missing})
            raise UnsupportedModelError(
                f"{len(missing)} operation(s) between the input and the logits have no unroll rule "
                f"({', '.join(kinds)}):\n  {listed}{more}\n"
                "unroll compiles piecewise-linear ReLU networks (conv, linear, batch norm, ReLU/ReLU6/LeakyReLU/"
                "Hardtanh, max/avg pooling, sums, reshapes). Replace these ops (e.g. SiLU/GELU -> ReLU), or "
                "register a rule with `unroll.rules.rule(op)` if the op is piecewise linear.")

    # ------------------------------------------------------------------ decoder graph helpers

    def _placeholder(self, name: str) -> fx.Proxy:
        if self._last_placeholder is None:
            node = self.dec.placeholder(name)
        else:
            with self.dec.inserting_after(self._last_placeholder):
                node = self.dec.placeholder(name)
        node.target = node.name  # the argument name is the target: two saves under one name would not compile
        self._last_placeholder = node
        return fx.Proxy(node, self.tracer)

    def saved_input(self, value: fx.Node, name: str, batched: bool) -> fx.Proxy:
        self.saved.append((value, batched))
        return self._placeholder(name)

    def decoder_attr(self, target: str) -> fx.Proxy:
        if target not in self._attrs:
            self._attrs[target] = fx.Proxy(self.dec.get_attr(target), self.tracer)
        return self._attrs[target]

    # ------------------------------------------------------------------ emission

    def emit(self) -> tuple[fx.Graph, fx.Graph]:
        x = self.saved_input(self._input_for_decoder(), "x", True)
        cot: dict[fx.Node, Any] = {self.logits: self.seed}
        grad_x = None
        for node in reversed(list(self.enc.nodes)):
            q = cot.pop(node, None)
            if q is None:
                continue  # nothing flows back through this node (not on a path to the logits)
            if node is self.input:
                grad_x = q
                continue
            if self._is_tuple_part(node):  # part i of a split: collect it; the split's rule joins the parts
                parts = cot.setdefault(node.args[0], {})  # keyed as written: -1 is resolved at run time
                i = node.args[1]
                parts[i] = q if i not in parts else parts[i] + q
                continue
            step = Step(self, node, q)
            for inp, q_inp in self._reverse(step):
                if inp in self.active:
                    cot[inp] = q_inp if inp not in cot else cot[inp] + q_inp
                    self._name(q_inp, inp)
        self.output.args = ((self.logits, tuple(v for v, _ in self.saved)),)
        gradients = self.dec
        gradients.output(grad_x.node)
        heatmaps = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        out = heatmaps.graph_copy(gradients, env)
        heatmaps.output(heatmaps.call_function(ops.skip_multiply, (out, env[x.node])))
        return heatmaps, gradients

    def _input_for_decoder(self) -> fx.Node:
        """The input, for the final skip multiplication -- cloned first if some op would modify it in place."""
        x = self.input
        if any(self._in_place(user) for user in x.users):
            with self.enc.inserting_after(x):
                return self.enc.call_method("clone", (x,))
        return x

    def _in_place(self, node: fx.Node) -> bool:
        """Whether an op may modify its input: a module or functional with inplace=True (fx records F.relu's
        arguments by keyword), a method or torch function named like `relu_` / `leaky_relu_` (`x += y` traces as
        operator.add: nothing to catch there)."""
        if getattr(self._module(node), "inplace", False) or node.kwargs.get("inplace"):
            return True
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        return node.op in ("call_method", "call_function") and isinstance(name, str) and name.endswith("_") \
            and not name.endswith("__")

    def _plan_epsilon(self):
        """Where LRP-epsilon acts, decided on the untouched graph: at each layer output z (conv / linear / BN, a
        conv feeding only a BN counts once, at the BN, as zennit's canonizer merges them). If z feeds only an
        elementwise activation f, that activation's gate becomes f(z) / (z + eps sign z); otherwise the cotangent
        at z is scaled by z / (z + eps sign z)."""
        def module(n):
            return self._module(n) if isinstance(n, fx.Node) else None

        def is_layer_output(n):
            if not isinstance(n, fx.Node) or n not in self.active or not rules.is_layer(n.target, module(n)):
                return False
            users = list(n.users)
            return not (len(users) == 1 and (isinstance(module(users[0]), nn.modules.batchnorm._BatchNorm)
                                             or users[0].target is F.batch_norm))

        self.eps_gates: dict[fx.Node, fx.Node] = {}  # activation node -> its layer output z
        self.eps_outputs: set[fx.Node] = set()
        for n in self.enc.nodes:
            if not is_layer_output(n):
                continue
            users = list(n.users)
            if len(users) == 1 and rules.activation_fn(users[0].target, module(users[0])) is not None:
                if self.rules.replaces(users[0].target, module(users[0])):
                    # epsilon rewrites this gate itself, so the set's own rule for it would be silently skipped
                    raise ValueError(
                        f"rule set {self.rules.name!r} combines LRP-epsilon with its own rule for the activation "
                        f"{describe(users[0], self.root)}; LRP-epsilon replaces the gate of every activation after "
                        "a layer, so the two cannot both apply. Use one or the other.")
                self.eps_gates[users[0]] = n
            else:
                self.eps_outputs.add(n)

    def _reverse(self, step: Step) -> list[tuple[fx.Node, Any]]:
        node, module = step.node, step.module
        if self.epsilon is not None:
            if node in self.eps_gates:  # gate f(z) / (z + eps sign z) instead of f'(z)
                z = self.eps_gates[node]
                with self.enc.inserting_before(node):
                    a = rules.activation_fn(node.target, module)(step, fx.Proxy(z)).node
                ratio = step.save(ops.epsilon_ratio, a, z, self.epsilon, name="eps_ratio")
                return [(z, step.q * ratio.unsqueeze(1))]
            if node in self.eps_outputs:
                ratio = step.save(ops.epsilon_ratio, node, node, self.epsilon, name="eps_ratio", after=True)
                step.q = step.q * ratio.unsqueeze(1)
        result = self.rules.lookup(node.target, module)(step)
        if isinstance(result, fx.Proxy):
            return [(step.x, result)]
        return list(result)

    def _name(self, q: Any, node: fx.Node):
        # Name cotangent nodes after the forward value they belong to: the decoder's code then reads like the math.
        if isinstance(q, fx.Proxy) and q.node.op == "call_function" and not q.node.name.startswith("grad_"):
            try:
                q.node._rename(f"grad_{node.name}")
            except Exception:  # private API; names are cosmetic
                pass


class StaleModelError(RuntimeError):
    """The model changed under a compiled module in a way its graphs cannot follow: recompile."""


class LiveGraph(fx.GraphModule):
    """A compiled graph that reads the live model: its get_attr / call_module targets are `model.<path>`, and
    `self.model` is the model itself (held weakly, so a cache of compiled graphs keeps no model alive). Parameters,
    buffers and submodules are looked up at every call: `.to()`, `.double()`, `load_state_dict` and replaced tensors
    act on what the graph computes. `.code` reads like the model (`self.model.conv1(x)`)."""

    def __init__(self, model: nn.Module, graph: fx.Graph, class_name: str):
        super().__init__(nn.Module(), fx.Graph(), class_name)  # an empty root: nothing is copied off the model
        object.__setattr__(self, "_model_ref", weakref.ref(model))
        self.graph = graph  # (the setter generates the code)

    @property
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise StaleModelError("the model this graph was compiled from has been freed")
        return model

    def __deepcopy__(self, memo):
        # bound to the model's copy if this deepcopy made one (copy.deepcopy(unrolled) does), else to the same model
        model = self.model
        return LiveGraph(memo.get(id(model), model), copy.deepcopy(self.graph), type(self).__name__)

    def __reduce__(self):
        raise TypeError("a compiled graph is not pickled on its own: pickle the Unrolled module (it recompiles on "
                        "load)")


def _reroot(graph: fx.Graph) -> fx.Graph:
    """Targets relative to the model -> relative to a LiveGraph (`model.<path>`)."""
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            node.target = f"model.{node.target}"
    return graph


class _Snapshot:
    """The submodules the graphs reach, as they were at compile time (weakly: identity, type, hyperparameters), so
    that a submodule replaced after compiling is either still what the graphs were built for or a clear error; and
    the `.training` flags the trace read (`modes`, path -> flag, '' the root: unroll.tracing.training_reads), which
    the graphs hold fixed, so a module switched to the other mode is a clear error too."""

    def __init__(self, model: nn.Module, leaves: set[str], reached: set[str], modes: dict[str, bool] | None = None):
        self.leaves = frozenset(leaves)
        self.modes = dict(modes or {})
        paths = set()
        for path in reached | leaves | {p for p in self.modes if p}:
            parts = path.split(".")
            paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        self.paths = sorted(paths, key=lambda p: (p.count("."), p))  # parents before children
        self.refs: dict[str, weakref.ref] = {}
        self.was: dict[str, str] = {}
        for path in self.paths:
            m = _resolve(model, path)
            self.refs[path] = weakref.ref(m)
            self.was[path] = _config(m) if path in self.leaves else type(m).__name__

    def bind(self, model: nn.Module) -> "_Snapshot":
        return _Snapshot(model, set(self.leaves), set(self.paths), self.modes)

    def stale(self, model: nn.Module) -> str | None:
        """None if every submodule the graphs use is the compiled one (or a same-type, same-hyperparameter
        replacement of a leaf module); else what changed."""
        resolved = {"": model}
        for path in self.paths:  # parents first: each lookup is one step from its resolved parent
            parent, _, name = path.rpartition(".")
            owner = resolved[parent]
            m = owner._modules.get(name) if isinstance(owner, nn.Module) else None
            if m is None:
                m = getattr(owner, name, None)
                if m is None:
                    return f"model.{path} was removed"
            resolved[path] = m
            if self.refs[path]() is m:
                continue
            if not isinstance(m, nn.Module):
                return f"model.{path} is now a {type(m).__name__}, not a module"
            if path not in self.leaves:
                # its forward was inlined into the graph: a new container may compute something else entirely
                return f"model.{path} was replaced (a {type(m).__name__}; its forward was traced into the graph)"
            now = _config(m)
            if now != self.was[path]:
                return f"model.{path} was replaced: compiled for {self.was[path]}, now {now}"
            self.refs[path] = weakref.ref(m)  # an equivalent module: it takes effect (the graph reads it live)
        for path, was in self.modes.items():
            now = getattr(resolved[path], "training", was)
            if now != was:
                where = f"model.{path}" if path else "the model"
                return (f"{where} was compiled in {_mode(was)} mode, now in {_mode(now)} mode (the traced forward "
                        f"read its .training, so the graphs compute the {_mode(was)}-mode function; compile in the "
                        "mode you run)")
        return None


def _mode(training: bool) -> str:
    return "train" if training else "eval"


def _resolve(model: nn.Module, path: str):
    m = model
    for name in path.split("."):
        modules = m.__dict__.get("_modules") if isinstance(m, nn.Module) else None
        m = modules[name] if modules is not None and name in modules else getattr(m, name)
    return m


def _config(m: nn.Module) -> str:
    """A leaf module's type and plain hyperparameters (what rules read at compile time: stride, padding, slope,
    kernel size, ceil_mode, p, ...); not its tensors, which the graphs read live."""
    plain = (bool, int, float, str, tuple, type(None))
    hyper = sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"
                   and isinstance(v, plain))
    return f"{type(m).__name__}({', '.join(f'{k}={v!r}' for k, v in hyper)})"


class Compiled:
    """What one compilation produced, bound weakly to the model it reads: the encoder (forward + saved values), the
    heatmap and gradient decoders, which saved values are batched, the rule set, and the snapshot of submodules."""

    def __init__(self, model: nn.Module, encoder: fx.Graph, decoder: fx.Graph, gradient_decoder: fx.Graph,
                 batched: Sequence[bool], ruleset: rulesets.RuleSet, snapshot: _Snapshot,
                 input_shape: tuple | None = None):
        self.encoder = LiveGraph(model, encoder, "Encoder")
        self.decoder = LiveGraph(model, decoder, "Decoder")
        self.gradient_decoder = LiveGraph(model, gradient_decoder, "GradientDecoder")
        self.batched, self.rules, self.snapshot = tuple(batched), ruleset, snapshot
        self.input_shape = input_shape  # None: every input shape; else the shape a specialised trace serves
        self._model_ref = weakref.ref(model)

    @property
    def model(self) -> nn.Module | None:
        return self._model_ref()

    def bind(self, model: nn.Module) -> "Compiled":
        """The same graphs, reading `model` (a copy of the compiled one)."""
        return Compiled(model, *(copy.deepcopy(g.graph) for g in (self.encoder, self.decoder, self.gradient_decoder)),
                        self.batched, self.rules, self.snapshot.bind(model), self.input_shape)

    def __reduce__(self):
        # The graphs themselves (fx graphs pickle; their targets are importable functions), with the model they
        # read: unpickled, they are bound to the unpickled model. Nothing is traced again.
        graphs = (_picklable(g.graph) for g in (self.encoder, self.decoder, self.gradient_decoder))
        return (_unpickle_compiled, (self.model, *graphs, self.batched, self.rules, sorted(self.snapshot.leaves),
                                     self.snapshot.paths, self.input_shape, self.snapshot.modes))

    def stale(self, model: nn.Module) -> str | None:
        if self.model is not model:
            return "the module holds a different model than the one its graphs were compiled from"
        return self.snapshot.stale(model)


class _FunctionRef:
    """A node target pickled by where it can be imported from: torch's boolean-dispatch functions (F.max_pool2d)
    are local objects pickle cannot name, though `torch.nn.functional.max_pool2d` finds them."""

    def __init__(self, fn: Callable):
        self.module, self.name = fn.__module__, fn.__name__

    def __call__(self, *args, **kwargs):  # (only ever unpickled into the function itself)
        return _import_function(self.module, self.name)(*args, **kwargs)

    def __reduce__(self):
        return (_import_function, (self.module, self.name))


def _import_function(module: str, name: str) -> Callable:
    import importlib

    return getattr(importlib.import_module(module), name)


def _picklable(graph: fx.Graph) -> fx.Graph:
    """A copy of the graph whose node targets all pickle (copied node by node: the graph's lookup tables are keyed
    by target)."""
    src = copy.deepcopy(graph)
    for node in src.nodes:
        fn = node.target
        if callable(fn) and "<locals>" in getattr(fn, "__qualname__", ""):
            module, name = getattr(fn, "__module__", None), getattr(fn, "__name__", None)
            try:
                found = _import_function(module, name) if module and name else None
            except ImportError:
                found = None
            if found is not fn:
                raise TypeError(f"cannot pickle the compiled graph: node {node.name} calls {fn!r}, which is not "
                                "importable by name")
            node.target = _FunctionRef(fn)
    out = fx.Graph()
    out.output(out.graph_copy(src, {}))
    return out


def _unpickle_compiled(model, encoder, decoder, gradient_decoder, batched, ruleset, leaves, paths, input_shape,
                       modes=None):
    return Compiled(model, encoder, decoder, gradient_decoder, batched, ruleset,
                    _Snapshot(model, set(leaves), set(paths), modes), input_shape)


class UnrolledOutput(NamedTuple):
    logits: torch.Tensor  # (B, K)
    heatmaps: torch.Tensor  # (B', K', *input spatial): sum_c x_c * d logit_k / d x_c (see Unrolled for B', K')


def _rows(samples, B: int, device) -> torch.Tensor | None:
    """`samples=` as a 1-D long tensor of row indices (None: all rows)."""
    if samples is None:
        return None
    if isinstance(samples, (bool, str)) or not isinstance(samples, (torch.Tensor, Sequence, range)):
        raise TypeError(f"samples= takes row indices (a sequence of ints or a 1-D integer tensor) or a (B,) bool "
                        f"mask, got {type(samples).__name__}")
    t = torch.as_tensor(samples, device=device) if not isinstance(samples, torch.Tensor) else samples.to(device)
    if t.dim() != 1:
        raise ValueError(f"samples= must be 1-D (row indices or a (B,) bool mask), got shape {tuple(t.shape)}")
    if t.dtype == torch.bool:
        if len(t) != B:
            raise ValueError(f"a samples= bool mask must have one entry per image ({B}), got {len(t)}")
        return t.nonzero().flatten()
    if len(t) == 0:
        return t.long()
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"samples= row indices must be integers, got {t.dtype}")
    bad = (t < 0) | (t >= B)
    if bad.any():
        raise ValueError(f"samples= {t[bad][:5].tolist()} out of range for a batch of {B} (0 .. {B - 1})")
    return t.long()


class _Classes(NamedTuple):
    seed: torch.Tensor  # (B, K', K) one-hot rows (zero rows pad a mask's shorter rows)
    place: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # mask: (row, class, slot) of each computed map


def _classes(classes, logits: torch.Tensor, rows: torch.Tensor | None, B: int) -> _Classes:
    """`classes=` -> the decoder's seed. See Unrolled for the accepted forms."""
    n, K = logits.shape
    eye = torch.eye(K, dtype=logits.dtype, device=logits.device)
    if classes is None:
        return _Classes(eye.expand(n, K, K), None)
    if isinstance(classes, torch.Tensor) and classes.dim() == 2:
        return _mask_classes(classes, logits, rows, B)
    if isinstance(classes, (bool, str)) or not isinstance(classes, (int, torch.Tensor, Sequence, range)):
        raise TypeError(f"classes= takes a class index, a sequence or 1-D tensor of indices, or a (B, K) bool mask; "
                        f"got {type(classes).__name__}")
    t = torch.as_tensor(classes) if not isinstance(classes, torch.Tensor) else classes
    if t.dim() > 1:
        raise ValueError(f"classes= must be an index, 1-D indices or a (B, K) mask, got shape {tuple(t.shape)}")
    t = t.reshape(-1)
    if t.dtype == torch.bool:
        if len(t) != K:
            raise ValueError(f"a 1-D bool classes= mask must have one entry per class ({K}), got {len(t)}")
        t = t.nonzero().flatten()
    if len(t) == 0:
        raise ValueError("classes= is empty: no heatmap to compute (None: every class)")
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"classes= indices must be integers, got {t.dtype}")
    bad = (t < 0) | (t >= K)
    if bad.any():
        raise ValueError(f"classes= {t[bad][:5].tolist()} out of range for {K} classes (0 .. {K - 1})")
    picked = eye[t.to(logits.device).long()]
    return _Classes(picked.expand(n, *picked.shape), None)


def _mask_classes(mask: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor | None, B: int) -> _Classes:
    n, K = logits.shape
    if mask.dtype != torch.bool or tuple(mask.shape) != (B, K):
        raise ValueError(f"a 2-D classes= must be a (B, K) = ({B}, {K}) bool mask (True: compute that image's map "
                         f"of that class), got {mask.dtype} {tuple(mask.shape)}")
    mask = mask.to(logits.device)
    if rows is not None:
        mask = mask[rows]
    counts = mask.sum(1)
    width = int(counts.max()) if n else 0
    # each row's classes in increasing order, then padding: a stable sort puts the True columns first
    order = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device) < counts[:, None]
    seed = torch.nn.functional.one_hot(order, K).to(logits.dtype) * valid[..., None]
    row, slot = valid.nonzero(as_tuple=True)
    return _Classes(seed, (row, order[row, slot], slot))


class Unrolled(nn.Module):
    """A classifier and its tied heatmap decoder. `parameters()` / `state_dict()` are the model's own, and the
    compiled graphs read the model live (dtype/device moves, `load_state_dict`, `copy.deepcopy` all follow; a
    submodule replaced by a different one is refused with StaleModelError: recompile).

    forward(x, classes=None, samples=None) -> UnrolledOutput(logits (B, K), heatmaps)
    gradients(x, classes=None, samples=None) -> (B', K', C, *spatial): d logit_k / d x for every class in one pass

    samples: which images get maps -- None (all B), row indices (a sequence of ints or a 1-D integer tensor, in that
        order, repeats allowed; empty: no maps), or a (B,) bool mask. B' = the number of rows selected.
    classes: None: every class, K' = K. An int k: that class, K' = 1 (the class dimension stays). A sequence or 1-D
        integer tensor: those classes in that order, K' = its length (empty is an error). A 1-D (K,) bool tensor:
        the True classes. A (B, K) bool mask (B: the whole batch, before `samples`): each image its own classes,
        K' = K, and the maps of unselected (image, class) pairs are zeros; one decoder pass over max-per-image
        classes computes them.
    """

    def __init__(self, model: nn.Module, compiled: Compiled, classes_per_chunk: int | str | None = "auto",
                 checkpoint: bool = False):
        super().__init__()
        if compiled.model is not model:
            raise ValueError("Unrolled(model, compiled): `compiled` was compiled from another model")
        self.model = model
        self.training = model.training  # the module starts in the model's mode
        self.compiled = compiled  # a plain attribute: its graphs reach the model's tensors, never list them twice
        # Memory knobs, both exact: decode the classes in chunks (peak decoder memory / K * chunk), and recompute
        # the decoder in the backward pass instead of keeping its activations (training with many classes).
        if not (classes_per_chunk in (None, "auto") or isinstance(classes_per_chunk, int)
                and not isinstance(classes_per_chunk, bool) and classes_per_chunk > 0):
            raise ValueError(f"classes_per_chunk={classes_per_chunk!r}: a positive int, None (all classes in one "
                             "pass) or 'auto'")
        self.classes_per_chunk, self.checkpoint = classes_per_chunk, checkpoint

    encoder = property(lambda self: self.compiled.encoder)
    decoder = property(lambda self: self.compiled.decoder)
    gradient_decoder = property(lambda self: self.compiled.gradient_decoder)
    batched = property(lambda self: self.compiled.batched)
    rules = property(lambda self: self.compiled.rules)
    epsilon = property(lambda self: self.compiled.rules.epsilon)
    input_shape = property(lambda self: self.compiled.input_shape)  # see compile(example=)

    def check(self) -> None:
        """Raise StaleModelError if the model changed in a way the compiled graphs cannot follow."""
        reason = self.compiled.stale(self.model)
        if reason is not None:
            raise StaleModelError(f"{reason}, after unroll.compile. The compiled graphs were built for the model as "
                                  "it was then; compile again: unroll.compile(model, ...).")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Run the forward pass once: logits and what the decoder needs."""
        self.check()
        logits, saved = self.encoder(x)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise UnsupportedModelError(
                f"the model returned shape {tuple(logits.shape)} for input {tuple(x.shape)}; unroll needs (B, K) "
                "logits. Wrap the model to return one score per class.")
        return logits, saved

    def decode(self, logits: torch.Tensor, saved: tuple, classes=None, samples=None, gradients: bool = False):
        """Heatmaps (or input gradients) for `classes` of `samples` (see the class docstring)."""
        B = logits.shape[0]
        rows = _rows(samples, B, logits.device)
        if rows is not None:
            # (None: a dropout mask in eval mode, i.e. nothing to select)
            saved = tuple(s[rows] if b and s is not None else s for s, b in zip(saved, self.batched))
            logits = logits[rows]
        decoder = self.gradient_decoder if gradients else self.decoder
        seed, place = _classes(classes, logits, rows, B)
        if seed.shape[1] == 0:  # a mask selecting nothing: all maps are zeros, nothing to run
            out = self._run(decoder, seed.new_zeros(seed.shape[0], 1, seed.shape[2]), saved)
            return out.new_zeros(out.shape[0], logits.shape[1], *out.shape[2:])
        chunk = self.classes_per_chunk
        if chunk == "auto":
            chunk = auto_chunk(seed, saved)
        if chunk is None or seed.shape[1] <= chunk:
            out = self._run(decoder, seed, saved)
        else:
            out = torch.cat([self._run(decoder, part, saved) for part in seed.split(chunk, 1)], 1)
        if place is None:
            return out
        row, cls, slot = place
        full = out.new_zeros(out.shape[0], logits.shape[1], *out.shape[2:])
        return full.index_put((row, cls), out[row, slot])

    def _run(self, decoder, seed, saved):
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(decoder, seed, *saved, use_reentrant=False)
        return decoder(seed, *saved)

    @staticmethod
    def seed(logits: torch.Tensor, classes=None) -> torch.Tensor:
        """d logits / d logits for the requested classes (indices): (B, K', K) one-hot rows over the batch."""
        return _classes(classes, logits, None, logits.shape[0]).seed

    def forward(self, x: torch.Tensor, classes=None, samples=None) -> UnrolledOutput:
        logits, saved = self.encode(x)
        return UnrolledOutput(logits, self.decode(logits, saved, classes, samples))

    def gradients(self, x: torch.Tensor, classes=None, samples=None) -> torch.Tensor:
        logits, saved = self.encode(x)
        return self.decode(logits, saved, classes, samples, gradients=True)

    def __deepcopy__(self, memo):
        # An independent working copy: the model deep-copied, the graphs rebound to the copy.
        model = copy.deepcopy(self.model, memo)
        new = Unrolled(model, self.compiled.bind(model), self.classes_per_chunk, self.checkpoint)
        new.training = self.training  # (not .train(): the model's own modes came with the copy)
        memo[id(self)] = new
        return new

    def __reduce__(self):
        # the model and its compiled graphs (see Compiled.__reduce__), the graphs rebound to the loaded model
        return (_unpickle_unrolled, (self.model, self.compiled, self.classes_per_chunk, self.checkpoint,
                                     self.training))

    def extra_repr(self) -> str:
        return f"rules={self.rules!r}"


def _unpickle_unrolled(model, compiled, classes_per_chunk, checkpoint, training):
    net = Unrolled(model, compiled, classes_per_chunk, checkpoint)
    net.training = training  # (not .train(): the model's own modes were pickled with it)
    return net


# The largest decoder tensor a CPU pass may allocate under classes_per_chunk="auto". glibc serves blocks above its
# mmap threshold (at most 32 MiB) by fresh mmap and unmaps them on free, so a decoder pass over a folded B*K batch
# page-faults its whole working set in again, every call. Measured (resnet50, 224 px, batch 2, K=21, 2 cores): all
# classes in one pass 3.4 s and 1.8 M minor faults per call; chunks of 3 classes 2.0 s and 27 k faults; 1.85 s with
# malloc tuned to keep every block. CUDA's caching allocator has no such cost.
AUTO_CHUNK_BYTES = 24 * 2**20


def auto_chunk(seed: torch.Tensor, saved: tuple) -> int | None:
    """classes_per_chunk="auto": None (all classes at once) off the CPU; on the CPU, as many classes as keep the
    largest decoder tensor -- (B, classes) times the largest saved activation -- under AUTO_CHUNK_BYTES."""
    if seed.device.type != "cpu":
        return None
    largest = max((s.numel() for s in saved if isinstance(s, torch.Tensor)), default=1)  # B x the largest activation
    return max(1, AUTO_CHUNK_BYTES // (largest * seed.element_size()))


def compile(model: nn.Module, rules: rulesets.RuleSet | str | None = None, *,
            classes_per_chunk: int | str | None = "auto", checkpoint: bool = False,
            output: str | int | Callable | None = None, example: torch.Tensor | None = None,
            rule: str | None = None, epsilon: float | None = None) -> Unrolled:
    """Unroll a ReLU classifier into a module giving logits and all classes' heatmaps in one pass.

    rules: a `unroll.rulesets.RuleSet` or a preset name (see unroll.rulesets.PRESETS). Default "lrp0": input x
        gradient (= LRP-0), exactly autograd's. "epsilon" / `rulesets.epsilon(eps)`: LRP-epsilon as zennit defines it
        (the cotangent at each conv/linear/BN output z is scaled by f(z) / (z + eps * sign(z))). "ws-ae": every
        activation's gate replaced by a ReLU on the decoder's signal. Sets combine: `rulesets.WS_AE |
        rulesets.TRAIN_BN`; `rulesets.LRP0.replace({op: rule})` replaces single rules.
    rule, epsilon: the older spelling, rule="epsilon", epsilon=1e-6 (= rules=rulesets.epsilon(1e-6)).
    classes_per_chunk: decode at most this many classes at a time (bounds decoder memory; same results). None: all
        classes in one pass. "auto" (default): all at once on GPUs; on the CPU, chunks whose largest tensor stays
        under 24 MiB (see AUTO_CHUNK_BYTES: faster there, since big blocks page-fault on every call).
    checkpoint: recompute the decoder during backward instead of storing its activations (same gradients).
    output: where the logits are in what forward() returns: a key or attribute name (output="logits" for a dict or a
        transformers ModelOutput), an index into a tuple, or a callable taking the result.
    example: an input tensor, needed only if forward() takes Python decisions from shapes (`if x.shape[-2] < 7`):
        the graph is then specialised to the example's shape and refuses other shapes (`net.input_shape` says which
        dims are fixed; None there = any size). Models that trace symbolically ignore it and serve every shape.
    """
    ruleset = _ruleset(rules, rule, epsilon)
    if not isinstance(model, nn.Module):
        raise TypeError(f"unroll.compile expects an nn.Module, got {type(model).__name__}")
    graph = trace(model, example, output)
    emitter = Emitter(model, graph, ruleset)
    heatmaps, gradients = emitter.emit()
    for g in (heatmaps, gradients):
        fold_channel_scales(g)
    snapshot = _snapshot(model, (graph, heatmaps, gradients), emitter.inlined)
    compiled = Compiled(model, *(_reroot(g) for g in (graph, heatmaps, gradients)), [b for _, b in emitter.saved],
                        ruleset, snapshot, tracing.served_shape(graph))
    return Unrolled(model, compiled, classes_per_chunk, checkpoint)


def _ruleset(rules_, rule: str | None, epsilon: float | None) -> rulesets.RuleSet:
    """compile()'s rules=, or the older rule= / epsilon= spelling, as one RuleSet."""
    if rules_ is not None and rule is not None:
        raise ValueError("pass rules= (a RuleSet or preset name) or the older rule=, not both")
    arg = "rule" if rule is not None else "rules"
    chosen = rule if rule is not None else rules_ if rules_ is not None else "lrp0"
    if isinstance(chosen, str) and chosen not in rulesets.PRESETS:
        raise ValueError(f"{arg}={chosen!r}: expected a RuleSet or one of {', '.join(map(repr, rulesets.PRESETS))}")
    if epsilon is None:
        return rulesets.get(chosen)
    if chosen != "epsilon":
        raise ValueError(f"epsilon={epsilon!r} applies to rule='epsilon' only; for other sets use "
                         f"rulesets.get({chosen!r}).with_epsilon(eps)" if isinstance(chosen, str) else
                         f"epsilon={epsilon!r} with a RuleSet: use rules=ruleset.with_epsilon({epsilon!r})")
    return rulesets.epsilon(epsilon)


def _snapshot(model: nn.Module, graphs: Sequence[fx.Graph], inlined: set[str] = frozenset()) -> _Snapshot:
    """Which submodules the graphs call or read (before their targets are rerooted); `inlined`: modules whose call a
    rule replaced by a function with their settings (F.max_pool2d for nn.MaxPool2d), checked like any leaf; and the
    `.training` flags the traces read."""
    leaves, reached, modes = set(inlined), set(), {}
    for g in graphs:
        modes.update(tracing.training_reads(g))
        for node in g.nodes:
            if node.op == "call_module":
                leaves.add(node.target)
            elif node.op == "get_attr":
                target = _resolve(model, node.target)
                if isinstance(target, nn.Module):
                    leaves.add(node.target)
                elif "." in node.target:
                    reached.add(node.target.rsplit(".", 1)[0])
    return _Snapshot(model, leaves, reached, modes)


def fold_channel_scales(graph: fx.Graph) -> None:
    """conv_transpose(q * s[c], W)  ->  conv_transpose(q, W * s[:, None, ...]): a BatchNorm scale folded into the
    tied weight (a few thousand numbers) instead of a pass over the cotangent (B*K feature maps) -- the decoder's
    view of merging BN into the conv. Saves that pass, and in training the cotangent autograd would keep for it."""
    for node in list(graph.nodes):
        if node.target is not ops.conv_transpose:
            continue
        scaled = node.args[0]
        if getattr(scaled, "target", None) is not ops.channel_scale or len(scaled.users) != 1:
            continue
        q, scale = scaled.args
        with graph.inserting_before(node):
            weight = graph.call_function(ops.scale_out_channels, (node.args[1], scale))
        node.args = (q, weight, *node.args[2:])
        graph.erase_node(scaled)
