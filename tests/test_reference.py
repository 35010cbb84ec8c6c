"""The reference code's training gradient (unroll.reference): heatmap values against an independent LRP-epsilon
written here layer by layer, parameter gradients against autograd through that independent formula, the effect
of each switch, and the measured distance to the exact gradient. float64, tiny models."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

import unroll
from unroll import reference as R
from unroll.verify import relative_error

from conftest import randomize

EPS = 1e-8
SAFE = 1e-9
K = 5


def small(pool=None, bn=True, inplace=False):
    pool = pool or nn.MaxPool2d(2)
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm(4), nn.ReLU(inplace=inplace), pool,
                         nn.Conv2d(4, 6, 3, padding=1), norm(6), nn.ReLU(inplace=inplace), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, K))


def inputs(n=3, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 256, (n, 3, size, size), generator=g).double() + 1) / 256  # the reference's scaling
    target = torch.randint(0, K, (n, size, size), generator=g)
    return x, target


# ----------------------------------------------------------------- an independent LRP-epsilon (the documented formula)


def _transpose(fn, a, S, weight=None):
    """layer^T(S) through autograd of the layer on a probe: differentiable in S (and in the weight used)."""
    probe = torch.zeros_like(a, requires_grad=True)
    (out,) = torch.autograd.grad(fn(probe), probe, S, create_graph=True)
    return out


def formula(model, x, *, detach_all=False, overwrite=True, dec_weights=None, seed_logit=True):
    """Heatmaps (B, K, H, W) of the reference's LRP-epsilon on a Sequential, written from its description:
    R_a = a * layer^T(R_z / (z + eps)) with z recomputed from the live a (bias detached), BN ratio
    gamma/sigma * z/y detached, ReLU passes, max pooling unpools (overwriting), adaptive pooling splits R
    proportionally, the top seeded with the logit. `detach_all`: every encoder value detached (the decoder path)."""
    dec_weights = dec_weights or {}
    live = (lambda t: t.detach()) if detach_all else (lambda t: t)
    acts, a = [], x
    for layer in model:
        acts.append(a)
        a = layer(a)
    logits = a
    maps = []
    for k in range(logits.shape[1]):
        Rel = None
        for i in reversed(range(len(model))):
            layer, a = model[i], live(acts[i])
            if isinstance(layer, nn.Linear):
                W = live(layer.weight)
                Wd = dec_weights.get(i, layer.weight)
                if Rel is None:  # the top: one-hot times the logit
                    Rel = torch.zeros_like(logits)
                    Rel[:, k] = live(logits)[:, k] if seed_logit else 1.0
                z = F.linear(a, W, layer.bias.detach())
                Rel = a * _transpose(lambda p: F.linear(p, Wd), a, Rel / (z + EPS + SAFE))
            elif isinstance(layer, nn.Conv2d):
                W = live(layer.weight)
                Wd = dec_weights.get(i, layer.weight)
                z = F.conv2d(a, W, layer.bias.detach(), layer.stride, layer.padding)
                Rel = a * _transpose(lambda p: F.conv2d(p, Wd, None, layer.stride, layer.padding), a,
                                     Rel / (z + EPS + SAFE))
            elif isinstance(layer, nn.BatchNorm2d):
                z = a.detach()
                y = layer_out(layer, z).detach()
                var = z.var(dim=(0, 2, 3), unbiased=False) if layer.training else layer.running_var
                scale = (layer.weight / torch.sqrt(var + layer.eps)).detach().view(1, -1, 1, 1)
                Rel = scale * (z / (y + SAFE)) * Rel
            elif isinstance(layer, nn.MaxPool2d):
                out, idx = F.max_pool2d(a.detach(), layer.kernel_size, layer.stride, layer.padding,
                                        return_indices=True)
                if overwrite:
                    Rel = F.max_unpool2d(Rel, idx, layer.kernel_size, layer.stride, layer.padding, a.shape[-2:])
                else:
                    Rel = _transpose(lambda p: F.max_pool2d(p + a.detach(), layer.kernel_size, layer.stride,
                                                            layer.padding), a, Rel)
            elif isinstance(layer, nn.AdaptiveAvgPool2d):
                out = layer(a)
                Rel = a * _transpose(layer, a, Rel / (out + SAFE))
            elif isinstance(layer, nn.Flatten):
                Rel = Rel.reshape(a.shape)
            # ReLU, Identity: relevance passes
        maps.append(Rel.sum(1))
    return logits, torch.stack(maps, 1)


def layer_out(bn, z):
    """BN's output for z without touching the running statistics."""
    if bn.training:
        mean, var = z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    return ((z - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps) * bn.weight.view(1, -1, 1, 1)
            + bn.bias.view(1, -1, 1, 1))


def ce(maps, target):
    return F.cross_entropy(maps, target)


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def flat(gs, like):
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, like)])


def cosine(a, b):
    return float(F.cosine_similarity(a, b, dim=0))


# -------------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_heatmaps_equal_independent_lrp_epsilon(mode):
    model = randomize(small())
    model.train(mode == "train")
    x, _ = inputs()
    net = R.compile(model, R.REFERENCE.replace(tie="shared"))
    ours = net(x).heatmaps
    _, theirs = formula(model, x)
    assert relative_error(ours, theirs) < 1e-10
    # LRP-epsilon 1e-8 with non-overlapping pools is input x gradient up to epsilon
    exact = unroll.compile(model)(x).heatmaps
    assert relative_error(ours, exact) < 1e-4  # measured 1.1e-5: eps / z where some z are ~1e-4


def test_overwriting_unpool_where_windows_share_an_argmax():
    """3x3 stride-2 pooling: neighbouring windows often share their argmax; max_unpool2d keeps one window's
    relevance there, the transpose of max pooling adds them (= input x gradient)."""
    model = randomize(small(pool=nn.MaxPool2d(3, 2, padding=1)))
    x, _ = inputs(size=12)
    over = R.compile(model, R.REFERENCE.replace(tie="shared"))(x).heatmaps
    acc = R.compile(model, R.REFERENCE.replace(tie="shared", unpool="accumulate"))(x).heatmaps
    exact = unroll.compile(model)(x).heatmaps
    assert relative_error(over, formula(model, x, overwrite=True)[1]) < 1e-10
    assert relative_error(acc, formula(model, x, overwrite=False)[1]) < 1e-10
    assert relative_error(acc, exact) < 1e-4
    assert relative_error(over, exact) > 1e-2  # measured on this model: see docs/reference_gradient.md


def test_inplace_relu_reads_values_before_they_are_overwritten():
    a, b = randomize(small(inplace=False)), randomize(small(inplace=True))
    b.load_state_dict(a.state_dict())
    x, target = inputs()
    for m in (a, b):
        m.train()
    ha = R.compile(a, R.REFERENCE.replace(tie="shared"))(x).heatmaps
    hb = R.compile(b, R.REFERENCE.replace(tie="shared"))(x).heatmaps
    assert relative_error(hb, ha) < 1e-12
    ga = flat(grads(ce(ha, target), list(a.parameters())), list(a.parameters()))
    gb = flat(grads(ce(hb, target), list(b.parameters())), list(b.parameters()))
    assert relative_error(gb, ga) < 1e-12


# ----------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_gradient_equals_autograd_through_the_formula(mode):
    """tie='shared': one gradient per weight, autograd through the reference's relevance formula (encoder path
    included). encoder_path=False: only the decoder's weights get gradient."""
    model = randomize(small())
    model.train(mode == "train")
    x, target = inputs()
    params = list(model.parameters())
    for cfg, detach in ((R.REFERENCE.replace(tie="shared"), False),
                        (R.REFERENCE.replace(tie="shared", encoder_path=False), True)):
        ours = flat(grads(ce(R.compile(model, cfg)(x).heatmaps, target), params), params)
        theirs = flat(grads(ce(formula(model, x, detach_all=detach)[1], target), params), params)
        assert relative_error(ours, theirs) < 1e-9, cfg


def test_alias_splits_the_gradient_between_two_parameters():
    """tie='alias': the decoder-path gradient lands on the second parameter, everything else on the encoder's;
    together they are tie='shared''s gradient. Both parameters share storage."""
    model = randomize(small())
    x, target = inputs()
    net = R.compile(model)
    pairs = R.decoder_weights(net)
    assert sorted(pairs) == ["0", "4", "9"]
    for enc, dec in pairs.values():
        assert enc.data_ptr() == dec.data_ptr() and enc is not dec
    assert len(list(net.parameters())) == len(list(model.parameters())) + 3
    enc_w = [p for p, _ in pairs.values()]
    dec_w = [d for _, d in pairs.values()]
    g = grads(ce(net(x).heatmaps, target), enc_w + dec_w)
    shared = grads(ce(R.compile(model, R.REFERENCE.replace(tie="shared"))(x).heatmaps, target), enc_w)
    for ge, gd, gs in zip(g[:3], g[3:], shared):
        assert relative_error(ge + gd, gs) < 1e-10
    # the decoder weight's part is the formula with only the decoder weights live
    index = {"0": 0, "4": 4, "9": 9}
    _, maps = formula(model, x, detach_all=True, dec_weights={index[k]: d for k, (_, d) in pairs.items()})
    dec_only = grads(ce(maps, target), dec_w)
    for gd, want in zip(g[3:], dec_only):
        assert relative_error(gd, want) < 1e-9


def test_alias_gets_two_adamw_steps_and_copy_one():
    """AdamW over net.parameters(): with tie='alias' the shared storage moves by the encoder parameter's step plus
    the decoder parameter's step (each with its own moments and weight decay); with 'copy' the two drift apart."""
    model = randomize(small())
    x, target = inputs()
    net = R.compile(model)
    enc, dec = R.decoder_weights(net)["4"]
    before = enc.detach().clone()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)  # decay: applied twice too
    loss = ce(net(x).heatmaps, target)
    opt.zero_grad()
    loss.backward()
    g_enc, g_dec = enc.grad.clone(), dec.grad.clone()
    opt.step()

    def one_adamw_step(grad):
        p = nn.Parameter(before.clone())
        o = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0)
        p.grad = grad
        o.step()
        return p.detach() - before

    assert relative_error(enc.detach() - before, one_adamw_step(g_enc) + one_adamw_step(g_dec)) < 1e-10
    assert torch.equal(enc.detach(), dec.detach())

    copy = R.compile(randomize(small()), R.REFERENCE.replace(tie="copy"))
    e, d = R.decoder_weights(copy)["4"]
    assert e.data_ptr() != d.data_ptr() and torch.equal(e, d)


def test_moving_the_model_unties_alias_and_retie_restores_it():
    """nn.Module._apply converts each Parameter on its own: .double() (like .to('cuda')) turns the alias into a
    copy -- the reference builds its decoder before moving the model to the GPU. retie() re-aliases."""
    net = R.compile(small())
    net = net.double()
    enc, dec = R.decoder_weights(net)["0"]
    assert enc.data_ptr() != dec.data_ptr() and torch.equal(enc, dec)
    R.retie(net)
    assert enc.data_ptr() == dec.data_ptr()


def test_cosine_to_the_exact_gradient():
    """The measurement behind docs/reference_gradient.md, on a tiny BN model in train mode: the reference gradient
    (what AdamW would see summed over both parameters of a tied weight) is nearly orthogonal to the exact one; its
    decoder-path part is close to it; without BatchNorm the decoder path *is* the exact gradient (up to eps)."""
    model = randomize(small())
    model.train()
    x, target = inputs()
    params = list(model.parameters())
    exact = flat(grads(ce(unroll.compile(model)(x).heatmaps, target), params), params)
    ref = flat(grads(ce(R.compile(model, R.REFERENCE.replace(tie="shared"))(x).heatmaps, target), params), params)
    dec = flat(grads(ce(R.compile(model, R.REFERENCE.replace(tie="shared", encoder_path=False))(x).heatmaps,
                        target), params), params)
    assert cosine(ref, exact) < 0.5
    assert cosine(dec, exact) > 0.9
    assert (ref - dec).norm() > 10 * dec.norm()  # the encoder-path part dominates

    plain = randomize(small(bn=False)).eval()
    params = list(plain.parameters())
    exact = flat(grads(ce(unroll.compile(plain)(x).heatmaps, target), params), params)
    dec = flat(grads(ce(R.compile(plain, R.REFERENCE.replace(tie="shared", encoder_path=False))(x).heatmaps,
                        target), params), params)
    assert relative_error(dec, exact) < 1e-6


def test_resnet_heatmaps_and_heads():
    """torchvision resnet18 (residual sums, overlapping 3x3 max pool, global pool): with the accumulating unpool
    the reference's rules give input x gradient; head='weight' (its ResNet top) gives the same maps."""
    model = randomize(tvm.resnet18(num_classes=K))
    x, _ = inputs(n=2, size=32)
    exact = unroll.compile(model)(x).heatmaps
    shared = R.REFERENCE.replace(tie="shared")
    for head in ("logit", "weight"):
        acc = R.compile(model, shared.replace(unpool="accumulate", head=head))(x).heatmaps
        assert relative_error(acc, exact) < 2e-4, head  # measured 5e-5: eps / z at small z
    over = R.compile(model, shared)(x).heatmaps
    assert relative_error(over, exact) > 1e-3


class Residual(nn.Module):
    """conv-bn-relu, conv-bn, += skip in place, relu in place (torchvision's BasicBlock pattern), global pool, fc."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu, self.pool, self.fc = nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Linear(4, K)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(h))
        out += h
        out = self.relu(out)
        return self.fc(torch.flatten(self.pool(out), 1))


def residual_formula(m, x):
    """The reference's relevance on Residual (eval mode): proportional split at the sum, live ratios."""
    with torch.no_grad():
        z1 = m.conv1(x)
        y1 = m.bn1(z1)
        h = torch.relu(y1)
        z2 = m.conv2(h)
        y2 = m.bn2(z2)
        s = y2 + h
        o = torch.relu(s)
        g = o.mean((2, 3))
        logits = m.fc(g)

    def scale(bn):
        return (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(1, -1, 1, 1)

    def ratio(z, y):  # z / y with the reference's safe division (y == 0 -> 0)
        return torch.where(y == 0, torch.zeros_like(z), z / (y + SAFE))

    def conv_t(conv, a, S):
        return _transpose(lambda p: F.conv2d(p, conv.weight, None, conv.stride, conv.padding), a, S)

    maps = []
    for k in range(K):
        T = torch.zeros_like(logits)
        T[:, k] = logits[:, k]
        Rg = g * ((T / (logits + EPS + SAFE)) @ m.fc.weight)
        Ro = o * (Rg / (g + SAFE))[:, :, None, None] / (o.shape[2] * o.shape[3])
        Ry2, Rskip = y2 / (s + SAFE) * Ro, h / (s + SAFE) * Ro
        Rz2 = scale(m.bn2) * ratio(z2, y2) * Ry2
        Rh = h * conv_t(m.conv2, h, Rz2 / (z2 + EPS + SAFE)) + Rskip
        Rz1 = scale(m.bn1) * ratio(z1, y1) * Rh
        maps.append((x * conv_t(m.conv1, x, Rz1 / (z1 + EPS + SAFE))).sum(1))
    return torch.stack(maps, 1)


def test_residual_sum_written_in_place():
    """`out += h` and in-place ReLUs (torchvision's block pattern): the rules read the values before they are
    overwritten; the maps equal the independent formula and, with nothing overlapping, input x gradient."""
    model = randomize(Residual())
    x, target = inputs()
    ours = R.compile(model, R.REFERENCE.replace(tie="shared"))(x).heatmaps
    assert relative_error(ours, residual_formula(model, x)) < 1e-10
    assert relative_error(ours, unroll.compile(model)(x).heatmaps) < 1e-4
    ce(ours, target).backward()  # the live ratios' graph survives the in-place ops


def test_refuses_ops_it_has_no_rule_for():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.LazyLinear(K))
    model(torch.rand(1, 3, 8, 8))
    with pytest.raises(unroll.UnsupportedModelError, match="reference-gradient mode has no rule"):
        R.compile(model)
    # the model is left as it was, even after a refusal (the decoder weights it held while compiling are gone)
    assert R.HOLDER not in model._modules and not [k for k in vars(model) if k.startswith(R.HOLDER)]


def test_bad_switches_are_refused():
    with pytest.raises(ValueError, match="tie"):
        R.ReferenceGradient(tie="twice")
    with pytest.raises(ValueError, match="reference.compile"):
        R.ruleset(R.REFERENCE)  # alias adds parameters: a RuleSet alone cannot
    assert math.isclose(R.REFERENCE.epsilon, 1e-8)
