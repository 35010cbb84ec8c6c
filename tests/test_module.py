"""The compiled module as a value: rule sets (unroll.rulesets), a module that follows the live model (dtype/device
moves, load_state_dict, deepcopy, pickling, replaced submodules, no cache leak), and the checks of classes= /
samples=."""
import copy
import gc
import io
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unroll
from unroll import rulesets
from unroll.rulesets import LRP0, TRAIN_BN, WS_AE, RuleSet
from unroll.verify import autograd_heatmaps, relative_error

K = 5


class Normalised(nn.Module):
    """Input normalisation read from buffers of the root module, conv-BN-ReLU, max pool, GAP, linear."""

    def __init__(self, act: type[nn.Module] | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.3, 0.25]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = (act or nn.ReLU)()
        self.pool = nn.MaxPool2d(2)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, K)

    def forward(self, x):
        x = (x - self.mean) / self.std
        return self.fc(self.gap(self.body(self.pool(self.act(self.bn(self.conv(x)))))).flatten(1))


class FunctionalBN(Normalised):
    """The same network with its BatchNorm called as F.batch_norm (as timm's BatchNormAct2d does)."""

    def forward(self, x):
        bn = self.bn
        h = F.batch_norm(self.conv((x - self.mean) / self.std), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         bn.training, bn.momentum, bn.eps)
        return self.fc(self.gap(self.body(self.pool(self.act(h)))).flatten(1))


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    from conftest import randomize

    return randomize(model, seed)


def check_exact(net: unroll.Unrolled, model: nn.Module, x: torch.Tensor):
    """The module's logits and heatmaps equal autograd's input x gradient of `model` (float64)."""
    with torch.no_grad():
        out = net(x)
    ref, logits = autograd_heatmaps(model, x)
    assert relative_error(out.logits, logits) < 1e-12
    assert relative_error(out.heatmaps, ref) < 1e-10


def x64(b: int = 3, size: int = 8) -> torch.Tensor:
    return torch.rand(b, 3, size, size, dtype=torch.double)


# ---------------------------------------------------------------------------------------------------- rule sets


def test_ruleset_is_an_immutable_value():
    derived = LRP0.replace({nn.ReLU: rulesets.relu_on_signal})
    assert derived is not LRP0 and LRP0.replacements == {} and dict(derived.replacements) == {
        nn.ReLU: rulesets.relu_on_signal}
    with pytest.raises(AttributeError, match="immutable"):
        LRP0.epsilon = 0.1
    with pytest.raises(TypeError):
        derived.replacements[nn.ReLU] = None  # a read-only view
    assert derived == LRP0.replace({nn.ReLU: rulesets.relu_on_signal}) and derived != LRP0
    # `|`: the right side's replacements win, its epsilon if it has one
    both = rulesets.epsilon(0.3) | TRAIN_BN
    assert both.epsilon == 0.3 and both.lookup(None, nn.BatchNorm2d(2)) is rulesets.train_batch_norm
    assert (TRAIN_BN | rulesets.epsilon(0.3)).epsilon == 0.3
    assert (rulesets.epsilon(0.3) | rulesets.epsilon(0.1)).epsilon == 0.1
    assert LRP0.with_epsilon(0.2) == rulesets.epsilon(0.2)
    with pytest.raises(ValueError, match="epsilon"):
        rulesets.epsilon(-1.0)
    with pytest.raises(TypeError, match="rule function"):
        LRP0.replace({nn.ReLU: "relu"})


def test_lookup_by_class_bases_and_by_name():
    class MyReLU(nn.ReLU):
        pass

    assert LRP0.lookup(None, MyReLU()) is unroll.rules.relu  # a subclass finds its base's rule
    custom = LRP0.replace({nn.ReLU: rulesets.relu_on_signal})
    assert custom.lookup(None, MyReLU()) is rulesets.relu_on_signal  # a replacement keyed on a base covers it
    assert custom.lookup(F.relu) is unroll.rules.relu  # functions and method names are separate keys
    assert LRP0.replace({"relu": rulesets.relu_on_signal}).lookup("relu") is rulesets.relu_on_signal
    assert LRP0.lookup(torch.sigmoid) is None
    # the Mapping view is the effective table
    assert custom[nn.ReLU] is rulesets.relu_on_signal and custom[nn.Conv2d] is unroll.rules.conv_module
    assert set(LRP0) == set(unroll.rules.RULES)


def test_replacing_a_rule_by_none_refuses_the_op():
    model = Normalised().double().eval()
    with pytest.raises(unroll.UnsupportedModelError, match="MaxPool2d"):
        unroll.compile(model, rules=LRP0.replace({nn.MaxPool2d: None}))


def test_rule_decorator_registers_into_every_set():
    def twice(x):  # a new op (a function key)
        return 2 * x

    try:
        @unroll.rules.rule(twice)
        def twice_rule(r):
            return 2 * r.q

        for rs in (LRP0, WS_AE, TRAIN_BN, rulesets.epsilon(0.1)):
            assert rs.lookup(twice) is twice_rule and rs[twice] is twice_rule
    finally:
        unroll.rules.RULES.pop(twice, None)


class Activations(nn.Module):
    """Every gate activation, as modules and functions; no max pooling, so the WS-AE decoder reads nothing of the
    forward pass but x and shapes."""

    def __init__(self, relu_only: bool = False):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(6))
        acts = [nn.ReLU(), nn.LeakyReLU(0.1), nn.ReLU6(), nn.Hardtanh(-0.5, 0.5)]
        self.acts = nn.ModuleList(nn.ReLU() for _ in acts) if relu_only else nn.ModuleList(acts)
        self.relu_only = relu_only
        self.fc = nn.Linear(6, K)

    def forward(self, x):
        for conv, act in zip(self.convs, self.acts):
            x = act(conv(x))
        x = F.relu(self.convs[4](x)) if self.relu_only else F.leaky_relu(self.convs[4](x), 0.2)
        x = F.relu(self.convs[5](x)) if self.relu_only else F.relu6(self.convs[5](x))
        return self.fc(x.mean((2, 3)))


def test_ws_ae_puts_a_relu_on_the_signal_for_every_activation():
    """WS-AE has no gates: with no max pooling its decoder depends on the forward only through x, so a network of
    LeakyReLU / ReLU6 / Hardtanh / F.leaky_relu / F.relu6 and the same network with ReLUs give the same maps.
    (Before, only ReLU's rule was replaced: the others kept the encoder's gates.)"""
    import zoo

    mixed = Activations().double().eval()
    relus = Activations(relu_only=True).double().eval()
    relus.load_state_dict(mixed.state_dict())
    x = x64(2) - 0.5
    with torch.no_grad():
        a, b = zoo.WSAE(mixed)(x).seg, zoo.WSAE(relus)(x).seg
    assert relative_error(a, b) < 1e-12
    net = unroll.compile(mixed, rules="ws-ae")
    assert "gate" not in net.decoder.code
    with torch.no_grad():
        assert relative_error(net(x).heatmaps, a) < 1e-12
    ixg = unroll.compile(mixed)(x).heatmaps
    assert relative_error(a, ixg) > 1e-3, "WS-AE is not input x gradient"


class _FrozenScaleBN(nn.Module):
    """Reference for the BatchNorm rules in train mode: y = (z - m) * s + beta with s = gamma / sqrt(batch var + eps)
    computed from a *separate* input (`scale_from`), so s is a constant of the input the heatmap differentiates
    (frozen batch statistics) yet a function of the weights (TRAIN_BN) -- or detached from them too (LRP0)."""

    def __init__(self, bn: nn.BatchNorm2d, detach: bool):
        super().__init__()
        self.bn, self.detach, self.scale_from = bn, detach, None

    def forward(self, z):
        zs = self.scale_from
        var = zs.var(dim=(0, 2, 3), unbiased=False)
        s = self.bn.weight * torch.rsqrt((var.detach() if self.detach else var) + self.bn.eps)
        mean = zs.mean((0, 2, 3)).detach()
        return (z - mean[:, None, None]) * s[:, None, None] + self.bn.bias[:, None, None]


def _reference_weight_grad(model: Normalised, x: torch.Tensor, detach: bool) -> torch.Tensor:
    """d sum(heatmaps^2) / d conv.weight, heatmaps by autograd with the BN scale as _FrozenScaleBN defines it."""
    model.zero_grad()
    frozen = _FrozenScaleBN(model.bn, detach)
    with torch.no_grad():
        pass
    z_outer = model.conv((x - model.mean) / model.std)  # depends on the weights, not on x_in below
    frozen.scale_from = z_outer
    x_in = x.detach().requires_grad_(True)

    def forward(inp):
        h = frozen(model.conv((inp - model.mean) / model.std))
        return model.fc(model.gap(model.body(model.pool(model.act(h)))).flatten(1))

    logits = forward(x_in)
    maps = []
    for k in range(K):
        (g,) = torch.autograd.grad(logits[:, k].sum(), x_in, create_graph=True)
        maps.append((g * x).sum(1))
    heat = torch.stack(maps, 1)
    heat.square().sum().backward()
    return heat.detach(), model.conv.weight.grad.clone()


@pytest.mark.parametrize("spelling", [Normalised, FunctionalBN])
@pytest.mark.parametrize("ruleset", ["lrp0", "train-bn"])
def test_batch_norm_rules_in_train_mode_against_autograd(ruleset, spelling):
    """In train mode both BatchNorm rules give the heatmaps with frozen batch statistics; TRAIN_BN's training
    gradient also flows through the batch variance (how the weights move it), LRP0's does not: each equals its
    autograd reference (float64, 1e-10), and the two gradients differ."""
    model = randomised(spelling()).train()
    x = x64(4)
    ref_heat, ref_grad = _reference_weight_grad(model, x, detach=ruleset == "lrp0")
    model.zero_grad()
    net = unroll.compile(model, rules=ruleset)
    heat = net(x).heatmaps
    heat.square().sum().backward()
    assert relative_error(heat, ref_heat) < 1e-10
    assert relative_error(model.conv.weight.grad, ref_grad) < 1e-10
    _, other = _reference_weight_grad(model, x, detach=ruleset != "lrp0")
    assert relative_error(other, ref_grad) > 1e-6


def test_epsilon_preset_is_the_old_rule_epsilon():
    model = randomised(Normalised())
    x = x64()
    with torch.no_grad():
        old = unroll.compile(model, rule="epsilon", epsilon=0.3)(x).heatmaps
        for rules_ in (rulesets.epsilon(0.3), LRP0.with_epsilon(0.3)):
            assert torch.equal(unroll.compile(model, rules=rules_)(x).heatmaps, old)
        default = unroll.compile(model, rules="epsilon")
        assert default.epsilon == 1e-6
        assert relative_error(unroll.compile(model)(x).heatmaps, old) > 1e-3


def test_epsilon_with_replaced_activation_rules_is_refused():
    with pytest.raises(ValueError, match="LRP-epsilon"):
        unroll.compile(Normalised().eval(), rules=WS_AE | rulesets.epsilon(1e-6))


def test_rules_argument_is_checked():
    model = Normalised().eval()
    with pytest.raises(ValueError, match="rules='lrp-zplus'"):
        unroll.compile(model, rules="lrp-zplus")
    with pytest.raises(TypeError, match="RuleSet"):
        unroll.compile(model, rules=3)
    with pytest.raises(ValueError, match="not both"):
        unroll.compile(model, rules="lrp0", rule="epsilon")
    with pytest.raises(ValueError, match="epsilon"):
        unroll.compile(model, epsilon=0.1)  # once silently ignored without rule="epsilon"


def test_verify_knows_which_sets_are_gradients():
    model = randomised(Normalised())
    x = x64()
    assert unroll.verify(model, x, net=unroll.compile(model, rules=TRAIN_BN), verbose=False).max_error < 1e-10
    for rules_ in ("ws-ae", "epsilon", LRP0.replace({nn.ReLU: rulesets.relu_on_signal})):
        with pytest.raises(ValueError, match="autograd"):
            unroll.verify(model, x, net=unroll.compile(model, rules=rules_), verbose=False)


# ---------------------------------------------------------------------------------------------------- the live model


def test_top_level_buffers_follow_dtype_moves_and_load_state_dict():
    """mean/std registered on the root module: they used to be copied into the graphs at compile time, so after
    .double() + load_state_dict the logits were off by half."""
    model = randomised(Normalised()).float()
    net = unroll.compile(model)
    net.double()
    state = copy.deepcopy(model.state_dict())
    state["mean"] += 0.3
    state["std"] *= 2
    model.load_state_dict(state)
    check_exact(net, model, x64())


def test_device_moves_follow():
    """The meta device stands in for a GPU here: a buffer copied at compile time stayed on the CPU."""
    model = Normalised().eval()
    net = unroll.compile(model).to("meta")
    out = net(torch.rand(2, 3, 8, 8, device="meta"))
    assert out.heatmaps.device.type == "meta" and out.heatmaps.shape == (2, K, 8, 8)


def test_replaced_equivalent_submodule_takes_effect():
    model = randomised(Normalised())
    net = unroll.compile(model)
    model.fc = nn.Linear(8, K).double()
    model.body[0] = nn.Conv2d(8, 8, 3, padding=1).double()
    check_exact(net, model, x64())


@pytest.mark.parametrize("change", ["stride", "type", "container", "removed", "net.model"])
def test_replaced_different_submodule_is_refused(change):
    model = Normalised().eval()
    net = unroll.compile(model)
    if change == "stride":  # the decoder's transposed conv was built for stride 1
        model.body[0] = nn.Conv2d(8, 8, 3, padding=1, stride=2)
    elif change == "type":
        model.act = nn.LeakyReLU(0.1)
    elif change == "container":  # its forward was traced into the graph: a new one may compute anything
        model.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
    elif change == "removed":
        del model.fc
    else:
        net.model = Normalised().eval()
    with pytest.raises(unroll.StaleModelError, match="compile again"):
        net(torch.rand(2, 3, 8, 8))


@pytest.mark.parametrize("pool", ["max", "adaptive"])
def test_replaced_max_pool_is_checked(pool):
    """A max pool's call is replaced by F.max_pool2d(..., return_indices=True) with the module's settings copied
    in: the module is still checked like any leaf. Another type (or settings) is refused; an identical one works."""
    model = randomised(Normalised())
    if pool == "adaptive":
        model.gap = nn.AdaptiveMaxPool2d(1)
    path, same, other = (("pool", nn.MaxPool2d(2), nn.AvgPool2d(2)) if pool == "max" else
                         ("gap", nn.AdaptiveMaxPool2d(1), nn.AdaptiveAvgPool2d(1)))
    net = unroll.compile(model)
    setattr(model, path, same)
    check_exact(net, model, x64())
    setattr(model, path, other)
    with pytest.raises(unroll.StaleModelError, match=f"model.{path} was replaced"):
        net(x64())
    if pool == "max":
        model.pool = nn.MaxPool2d(3, stride=2)  # the same type, other settings
        with pytest.raises(unroll.StaleModelError, match="kernel_size=3"):
            net(x64())
        model.pool = nn.MaxPool2d(2)
        buf = io.BytesIO()
        torch.save(net, buf)  # the check survives pickling
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        loaded.model.pool = nn.AvgPool2d(2)
        with pytest.raises(unroll.StaleModelError, match="model.pool was replaced"):
            loaded(x64())


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: a BatchNorm2d subclass (traced through, not a leaf) calling F.batch_norm with
    its own .training, which fx records as a Python bool."""

    def forward(self, x):
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                   self.momentum, self.eps))


class TracedModes(nn.Module):
    def __init__(self, dropout: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = BatchNormAct(8)
        self.dropout = dropout
        self.fc = nn.Linear(8, K)

    def forward(self, x):
        h = self.bn(self.conv(x))
        if self.dropout:
            h = F.dropout(h, 0.3, training=self.training)
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("compiled_in", ["eval", "train"])
def test_a_mode_read_by_traced_code_is_checked(compiled_in, dropout):
    """`.training` read by traced code is fixed in the graph: switching the mode after compiling is refused (it
    was silently ignored); switching back works again."""
    model = randomised(TracedModes(dropout)).train(compiled_in == "train")
    net = unroll.compile(model)
    other = "eval" if compiled_in == "train" else "train"
    assert net.compiled.snapshot.modes == ({"": compiled_in == "train"} if dropout else {}) | {
        "bn": compiled_in == "train"}
    with torch.no_grad():
        net(x64())
    net.train(other == "train")  # the compiled module's mode is its model's
    with pytest.raises(unroll.StaleModelError, match=f"model.bn was compiled in {compiled_in} mode, now in {other}"):
        net(x64())
    net.train(compiled_in == "train")
    if dropout:  # the root's own flag, read for F.dropout
        model.train(other == "train")
        model.bn.train(compiled_in == "train")
        with pytest.raises(unroll.StaleModelError, match=f"the model was compiled in {compiled_in} mode"):
            net(x64())
        model.train(compiled_in == "train")
    if compiled_in == "eval":
        check_exact(net, model, x64())
    unroll.compile(model.train(other == "train"))(x64())  # compiling in the mode you run


def test_leaf_modules_follow_the_mode_at_run_time():
    """Leaf modules (nn.BatchNorm2d, the containers around them) read .training when they run, not when traced:
    torchvision's resnet18 compiled in eval and switched to train is exact against autograd with the batch
    statistics held constant (as documented)."""
    import torchvision

    model = randomised(torchvision.models.resnet18(num_classes=K))
    net = unroll.compile(model)
    assert net.compiled.snapshot.modes == {}
    model.train()
    x = x64(3, 32)
    with torch.no_grad():
        out = net(x)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def frozen(bn):
        def forward(z):
            mean, var = z.mean((0, 2, 3)).detach(), z.var((0, 2, 3), unbiased=False).detach()
            return F.batch_norm(z, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return forward

    for bn in bns:
        bn.forward = frozen(bn)
    try:
        ref, logits = autograd_heatmaps(model, x)
    finally:
        for bn in bns:
            del bn.forward
    assert relative_error(out.logits, logits) < 1e-12
    assert relative_error(out.heatmaps, ref) < 1e-10


def test_deepcopy_is_an_independent_working_copy():
    model = randomised(Normalised())
    net = unroll.compile(model)
    twin = copy.deepcopy(net)
    state = copy.deepcopy(model.state_dict())
    state["mean"] += 0.3
    twin.float().double()  # new buffer tensors in the copy only
    twin.model.load_state_dict(state)
    with torch.no_grad():
        twin.model.conv.weight.mul_(-1)
    check_exact(twin, twin.model, x64())
    check_exact(net, model, x64())  # the original is untouched
    assert not torch.equal(twin.model.conv.weight, model.conv.weight)
    assert twin.model is not model and twin.encoder.model is twin.model and twin.decoder.model is twin.model
    wrapped = copy.deepcopy(nn.ModuleDict({"net": net}))  # inside another module
    assert wrapped["net"].encoder.model is wrapped["net"].model is not model


def test_pickle_round_trip_follows_the_loaded_model():
    model = randomised(Normalised())
    net = unroll.compile(model, rules=TRAIN_BN, classes_per_chunk=2)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.rules == TRAIN_BN and loaded.classes_per_chunk == 2 and not loaded.training
    assert loaded.encoder.model is loaded.model
    loaded.model.mean += 0.3
    check_exact(loaded, loaded.model, x64())


def test_the_cache_of_compiled_models_keeps_no_model_alive():
    x = torch.rand(2, 3, 8, 8)
    model = Normalised().eval()
    unroll.attribution.ixg(model, x)
    unroll.attribution.cam(model, x)
    unroll.attribution.saliency(model, x)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_the_cache_recompiles_after_a_submodule_is_replaced():
    model = randomised(Normalised())
    x = x64()
    unroll.attribution.ixg(model, x)
    model.body = nn.Sequential(nn.Conv2d(8, 8, 5, padding=2), nn.LeakyReLU(0.2)).double()
    ref, _ = autograd_heatmaps(model, x)
    assert relative_error(unroll.attribution.ixg(model, x), ref) < 1e-10


# ------------------------------------------------------------------------------------------------ classes=, samples=


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = randomised(Normalised())
    x = x64(4)
    net = unroll.compile(model)
    with torch.no_grad():
        full, grads = net(x).heatmaps, net.gradients(x)
    return net, x, full, grads


def test_classes_forms(compiled):
    net, x, full, grads = compiled
    forms = {3: [3], torch.tensor(3): [3], (4, 1): [4, 1], range(2): [0, 1], torch.tensor([2, 2, 0]): [2, 2, 0],
             torch.tensor([True, False, False, True, False]): [0, 3]}
    with torch.no_grad():
        for classes, expected in forms.items():
            assert torch.equal(net(x, classes=classes).heatmaps, full[:, expected]), classes
            assert torch.equal(net.gradients(x, classes=classes), grads[:, expected]), classes


@pytest.mark.parametrize("classes_per_chunk", [None, 1])
def test_classes_as_a_per_image_mask(compiled, classes_per_chunk):
    """A (B, K) bool mask: (B, K, ...) maps, zeros where the mask is False, one decoder pass."""
    net, x, full, grads = compiled
    net = unroll.Unrolled(net.model, net.compiled, classes_per_chunk=classes_per_chunk)
    mask = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        out = net(x, classes=mask).heatmaps
        assert torch.equal(out, full * mask[:, :, None, None])
        assert torch.equal(net.gradients(x, classes=mask), grads * mask[:, :, None, None, None])
        rows = net(x, classes=mask, samples=[3, 0]).heatmaps  # the mask is the whole batch's, rows picked with it
        assert torch.equal(rows, (full * mask[:, :, None, None])[[3, 0]])
        none = net(x, classes=torch.zeros(4, K, dtype=torch.bool)).heatmaps
        assert none.shape == full.shape and not none.any()


def test_mask_maps_train_like_the_full_maps():
    """The gradient of a loss on masked maps equals that of the same loss on the full maps, masked."""
    model = randomised(Normalised()).train()
    x = x64(3)
    mask = torch.tensor([[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    net = unroll.compile(model)
    grads = []
    for classes in (mask, None):
        model.zero_grad()
        h = net(x, classes=classes).heatmaps
        (h * mask[:, :, None, None]).square().sum().backward()
        grads.append(model.conv.weight.grad.clone())
    assert relative_error(grads[0], grads[1]) < 1e-12


@pytest.mark.parametrize("classes, error, match", [
    ([], ValueError, "empty"),
    ([7], ValueError, "out of range"),
    ([-1], ValueError, "out of range"),
    (torch.tensor([0.0, 1.0]), TypeError, "integers"),
    ([[0, 1]], ValueError, "shape"),
    (torch.ones(4, K), ValueError, "bool mask"),
    (torch.ones(3, K, dtype=torch.bool), ValueError, r"\(B, K\) = \(4, 5\)"),
    (torch.ones(K + 1, dtype=torch.bool), ValueError, "one entry per class"),
    ("all", TypeError, "classes="),
    (1.5, TypeError, "classes="),
])
def test_bad_classes_are_refused(compiled, classes, error, match):
    net, x, _, _ = compiled
    with pytest.raises(error, match=match):
        net(x, classes=classes)


def test_samples_forms(compiled):
    net, x, full, _ = compiled
    with torch.no_grad():
        for samples, expected in (([2, 0], [2, 0]), (torch.tensor([1, 1]), [1, 1]),
                                  (torch.tensor([True, False, False, True]), [0, 3])):
            assert torch.equal(net(x, samples=samples).heatmaps, full[expected])
        empty = net(x, samples=torch.tensor([], dtype=torch.long))
    assert empty.heatmaps.shape == (0, K, 8, 8) and empty.logits.shape == (4, K)


@pytest.mark.parametrize("samples, error, match", [
    ([4], ValueError, "out of range"),
    ([-1], ValueError, "out of range"),
    (torch.tensor([[0, 1]]), ValueError, "1-D"),
    (torch.tensor([0.0]), TypeError, "integers"),
    (torch.tensor([True, False]), ValueError, "one entry per image"),
    (2, TypeError, "samples="),
])
def test_bad_samples_are_refused(compiled, samples, error, match):
    net, x, _, _ = compiled
    with pytest.raises(error, match=match):
        net(x, samples=samples)
