"""unroll.compile: trace a ReLU classifier, instrument its forward, emit the tied decoder.

    trace       torch.fx symbolic trace of the model (stack traces kept for error messages)
    analyse     which nodes depend on the input ("active"), and which of those reach the logits
    emit        walk the graph from the logits back to the input; each node's rule (unroll.rules) turns the
                cotangent of its output into cotangents of its inputs, writing the decoder graph, and asks the
                forward graph to also return what it needs (gates, pool indices, shapes) -- nothing else is kept
    Unrolled    an nn.Module holding the model (its parameters, never copies) and both graphs

Cotangents carry a class dimension after the batch dimension: q has shape (B, K, ...) where the encoder tensor
has (B, ...). Seeding q at the logits with the identity gives every class's d logit_k / d x in one pass.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import ops, rules, tracing
from .errors import UnsupportedModelError, describe
from .schema import normalized_arguments

_SHAPE_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def trace(model: nn.Module, example: torch.Tensor | None = None, output: Any = None) -> fx.Graph:
    """The model's forward as one fx graph from the input to the logits (see unroll.tracing): a symbolic trace
    serving every input shape, or, where forward() branches on shapes and `example` is given, one specialised to
    the example's shape and guarded against others."""
    return tracing.trace(model, example, output)


def _is_non_differentiable(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SHAPE_ATTRS
    return node.op in ("call_function", "call_method") and node.target in rules.NON_DIFFERENTIABLE


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SHAPE_ATTRS
    return node.op == "call_method" and node.target in ("size", "dim", "numel", "type")


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
        """Computed from the input's values (a mask `y > 0.1`, an active node): it has the batch dimension."""
        return isinstance(value, fx.Node) and value in self.em.derived

    def operand(self, value: Any, partner: fx.Node) -> Any:
        """An input-independent operand of an elementwise op with the active tensor `partner`, inside the decoder,
        ready to multiply a cotangent: a number as is; a tensor with the class dim inserted where it has the batch
        dim. A value computed from the input's values (a mask) is saved per sample, so samples= subsets it."""
        if not isinstance(value, fx.Node):
            return value
        if self.derived(value):
            value = self.save(ops.batch_operand, value, partner, name="operand")
        else:
            value = self.constant(value)
        return ops.class_broadcast(value, self.q)

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
        if self.derived(value):
            self.unsupported(f"'{value.name}' is computed from the input and used here as a weight or constant")
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
    def __init__(self, root: nn.Module, graph: fx.Graph, epsilon: float | None, overrides: dict | None):
        self.root, self.enc, self.epsilon, self.overrides = root, graph, epsilon, overrides or {}
        self.dec = fx.Graph()
        self.tracer = fx.proxy.GraphAppendingTracer(self.dec)  # one tracer: proxies from rules must mix freely
        self.saved: list[tuple[fx.Node, bool]] = []  # forward values the decoder reads, in placeholder order
        self.shapes: dict[fx.Node, fx.Proxy] = {}
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
        self.derived = self._derived_nodes()
        if self.logits not in self.active:
            raise UnsupportedModelError("the model's output does not depend on its input")
        self._check_rules()
        if epsilon is not None:
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

    def _derived_nodes(self) -> set[fx.Node]:
        """Nodes computed from the input's values, differentiable or not (`y > 0.1` is): they have its batch
        dimension. Shape queries (`x.shape`, `x.size(0)`) cut the flow: what is built from them is not per-sample."""
        derived = {self.input}
        for n in self.enc.nodes:
            if n.op in ("call_function", "call_method", "call_module") and not _is_shape_query(n):
                if any(a in derived for a in n.all_input_nodes):
                    derived.add(n)
        return derived

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
                   and rules.lookup(n.target, self._module(n), self.overrides) is None]
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
        for user in x.users:
            module = self._module(user)
            if (getattr(module, "inplace", False) or user.kwargs.get("inplace") or user.target in _INPLACE_FUNCS
                    or (user.op == "call_method" and str(user.target).endswith("_"))):
                with self.enc.inserting_after(x):
                    return self.enc.call_method("clone", (x,))
        return x

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
        result = rules.lookup(node.target, module, self.overrides)(step)
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


class UnrolledOutput(NamedTuple):
    logits: torch.Tensor  # (B, K)
    heatmaps: torch.Tensor  # (B, K', *input spatial): sum_c x_c * d logit_k / d x_c, K' = len(classes)


class Unrolled(nn.Module):
    """A classifier and its tied heatmap decoder. `parameters()` / `state_dict()` are the model's own.

    forward(x, classes=None, samples=None) -> UnrolledOutput(logits, heatmaps)
    gradients(x, classes=None) -> (B, K', C, *spatial): d logit_k / d x for every class in one pass
    """

    def __init__(self, model: nn.Module, encoder: fx.GraphModule, decoder: fx.GraphModule,
                 gradient_decoder: fx.GraphModule, batched: Sequence[bool], rule: str, epsilon: float | None,
                 classes_per_chunk: int | str | None = "auto", checkpoint: bool = False):
        super().__init__()
        self.model = model
        # Kept out of the module tree: they hold the model's own submodules, so registering them would list every
        # parameter and buffer twice in state_dict(). .to()/.train() reach them through `model`.
        self.__dict__.update(encoder=encoder, decoder=decoder, gradient_decoder=gradient_decoder)
        self.batched = tuple(batched)
        self.rule, self.epsilon = rule, epsilon
        # Memory knobs, both exact: decode the classes in chunks (peak decoder memory / K * chunk), and recompute
        # the decoder in the backward pass instead of keeping its activations (training with many classes).
        if not (classes_per_chunk in (None, "auto") or isinstance(classes_per_chunk, int) and classes_per_chunk > 0):
            raise ValueError(f"classes_per_chunk={classes_per_chunk!r}: a positive int, None (all classes in one "
                             "pass) or 'auto'")
        self.classes_per_chunk, self.checkpoint = classes_per_chunk, checkpoint

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Run the forward pass once: logits and what the decoder needs."""
        logits, saved = self.encoder(x)
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise UnsupportedModelError(
                f"the model returned shape {tuple(logits.shape)} for input {tuple(x.shape)}; unroll needs (B, K) "
                "logits. Wrap the model to return one score per class.")
        return logits, saved

    def decode(self, logits: torch.Tensor, saved: tuple, classes=None, samples=None, gradients: bool = False):
        """Heatmaps (or input gradients) for `classes` (default: all) of `samples` (default: the whole batch)."""
        if samples is not None:
            # (None: a dropout mask in eval mode, i.e. nothing to select)
            saved = tuple(s[samples] if b and s is not None else s for s, b in zip(saved, self.batched))
            logits = logits[samples]
        decoder = self.gradient_decoder if gradients else self.decoder
        seed = self.seed(logits, classes)
        chunk = self.classes_per_chunk
        if chunk == "auto":
            chunk = auto_chunk(seed, saved)
        if chunk is None or seed.shape[1] <= chunk:
            return self._run(decoder, seed, saved)
        return torch.cat([self._run(decoder, part, saved) for part in seed.split(chunk, 1)], 1)

    def _run(self, decoder, seed, saved):
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(decoder, seed, *saved, use_reentrant=False)
        return decoder(seed, *saved)

    @staticmethod
    def seed(logits: torch.Tensor, classes=None) -> torch.Tensor:
        """d logits / d logits for the requested classes: (B, K', K) one-hot rows, broadcast over the batch."""
        B, K = logits.shape
        eye = torch.eye(K, dtype=logits.dtype, device=logits.device)
        if classes is not None:
            eye = eye[torch.as_tensor(classes, device=logits.device)]
        return eye.expand(B, *eye.shape)

    def forward(self, x: torch.Tensor, classes=None, samples=None) -> UnrolledOutput:
        logits, saved = self.encode(x)
        return UnrolledOutput(logits, self.decode(logits, saved, classes, samples))

    def gradients(self, x: torch.Tensor, classes=None) -> torch.Tensor:
        logits, saved = self.encode(x)
        return self.decode(logits, saved, classes, gradients=True)

    def extra_repr(self) -> str:
        eps = f", epsilon={self.epsilon}" if self.epsilon is not None else ""
        return f"rule={self.rule!r}{eps}"


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


RULE_NAMES = ("lrp0", "epsilon")


def compile(model: nn.Module, rule: str = "lrp0", epsilon: float = 1e-6, overrides: dict | None = None,
            classes_per_chunk: int | str | None = "auto", checkpoint: bool = False, *,
            output: str | int | Callable | None = None, example: torch.Tensor | None = None) -> Unrolled:
    """Unroll a ReLU classifier into a module giving logits and all classes' heatmaps in one pass.

    rule="lrp0": input x gradient (= LRP-0), exactly autograd's. rule="epsilon": LRP-epsilon as zennit defines it
    (the cotangent at each conv/linear/BN output z is scaled by f(z) / (z + epsilon * sign(z))).
    overrides: {op: rule function} replacing registry entries for this compilation only.
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
    if rule not in RULE_NAMES:
        raise ValueError(f"rule={rule!r}: expected one of {RULE_NAMES}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"unroll.compile expects an nn.Module, got {type(model).__name__}")
    graph = trace(model, example, output)
    emitter = Emitter(model, graph, epsilon if rule == "epsilon" else None, overrides)
    heatmaps, gradients = emitter.emit()
    for g in (heatmaps, gradients):
        fold_channel_scales(g)
    encoder = fx.GraphModule(model, graph, class_name="Encoder")
    decoder = fx.GraphModule(model, heatmaps, class_name="Decoder")
    gradient_decoder = fx.GraphModule(model, gradients, class_name="GradientDecoder")
    net = Unrolled(model, encoder, decoder, gradient_decoder, [b for _, b in emitter.saved], rule,
                   epsilon if rule == "epsilon" else None, classes_per_chunk, checkpoint)
    net.input_shape = tracing.served_shape(graph)
    return net


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
