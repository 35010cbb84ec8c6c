"""The training-recipe knobs of the convergence study (bench.ablation): per-loss gradient balance, calibration-scalar
lr, constant background map, BatchNorm modes, the offset input, and run caching across new TrainConfig fields."""

import pytest
import torch
import torch.nn.functional as F

from bench import digits
from unroll.segmentation import train as T
from zoo import segmentation as M

from tests.test_train import CFG, K, Toy, _state_equal, build

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch_and_terms(model, n=6):
    stream = T.BatchStream(Toy(4), Toy(8, seed=1), n, 0.5, seed=0)
    batch = stream[0]
    batch["image"] = batch["image"].to(next(model.parameters()).dtype)
    rows = batch["has_mask"].nonzero().squeeze(1)
    out = model(batch["image"], samples=rows)
    return T.loss_terms(out, batch, T.TrainConfig(**CFG), 0)


def _grads(model, loss):
    params = [p for p in {id(p): p for p in model.parameters()}.values()]
    g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return params, [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]


class _Record:
    """A stand-in optimizer: records the gradients it is stepped with."""

    def __init__(self):
        self.steps = []

    def zero_grad(self, set_to_none=True):
        pass

    def step(self):
        self.steps.append(None)


def test_normalize_steps_the_sum_of_unit_norm_gradients():
    model = build("unrolled", heatmap_scale=10.0).double()
    model.train()
    terms = _batch_and_terms(model.double())
    params, gs = _grads(model, terms["seg"])
    _, gc = _grads(model, terms["cls"])
    ns = torch.sqrt(sum((g ** 2).sum() for g in gs))
    nc = torch.sqrt(sum((g ** 2).sum() for g in gc))
    cfg = T.TrainConfig(**CFG, balance="normalize", cls_weight=2.0)
    opt = _Record()
    T.backward_and_step(model, opt, terms, cfg)
    assert len(opt.steps) == 1
    for p, a, b in zip(params, gs, gc):
        torch.testing.assert_close(p.grad, a / ns + 2.0 * b / nc, rtol=1e-10, atol=1e-14)


def test_separate_keeps_one_adam_state_per_loss_and_resumes(tmp_path):
    pix, img = Toy(5), Toy(12, seed=1)
    cfg = T.TrainConfig(steps=4, **{**CFG, "eval_every": 2}, balance="separate")
    kw = dict(num_classes=K, pixel_set=pix, image_set=img)
    full = build("unrolled", heatmap_scale="learn")
    T.train(full, cfg, out_dir=tmp_path / "a", **kw)
    part = build("unrolled", heatmap_scale="learn")
    T.train(part, cfg, out_dir=tmp_path / "b", stop_after=2, **kw)
    ckpt = torch.load(tmp_path / "b" / T.CKPT_NAME, weights_only=True)
    assert set(ckpt["optimizer"]) == {"seg", "cls"}
    # each state holds moments only for what its loss reaches: the temperature gets no BCE gradient, the logit bias
    # no heatmap gradient (heatmaps do not depend on it)
    seg, cls = (set(ckpt["optimizer"][k]["state"]) for k in ("seg", "cls"))
    assert seg and cls and seg - cls and cls - seg
    resumed = build("unrolled", heatmap_scale="learn", seed=5)
    T.train(resumed, cfg, out_dir=tmp_path / "b", resume=True, **kw)
    _state_equal(full.state_dict(), resumed.state_dict())


def test_balance_is_checked():
    with pytest.raises(ValueError, match="balance"):
        T.TrainConfig(balance="mean")


def test_calibration_scalars_get_their_own_lr():
    model = build("unrolled", heatmap_scale="learn", background="constant")
    opt = T.configure_optimizer(model, T.TrainConfig(lr=1e-3, calibration_lr_scale=30.0))
    calib = [g for g in opt.param_groups if g.get("lr_scale") == 30.0]
    assert len(calib) == 1 and {id(p) for p in calib[0]["params"]} == {
        id(model.scale.log_scale), id(model.background_level)}
    assert calib[0]["weight_decay"] == 0.0
    others = {id(p) for g in opt.param_groups if g is not calib[0] for p in g["params"]}
    assert id(model.scale.log_scale) not in others
    # in the loop the group's lr is the schedule's times the factor
    cfg = T.TrainConfig(steps=2, **{**CFG, "lr": 1e-3}, calibration_lr_scale=30.0, min_lr=1e-3)
    before = float(model.background_level)
    T.train(model, cfg, num_classes=K, pixel_set=Toy(4), image_set=Toy(8, seed=1))
    assert abs(float(model.background_level) - before) > 2 * 1e-3 * 2  # Adam moves ~lr*30 per step, not ~lr


def test_constant_background_replaces_only_the_background_map():
    torch.manual_seed(0)
    plain = build("unrolled", heatmap_scale=3.0)
    const = build("unrolled", heatmap_scale=3.0, background="constant")
    with torch.no_grad():
        const.background_level.fill_(0.7)
    x = torch.rand(3, 1, 16, 16)
    a, b = plain.eval()(x).seg, const.eval()(x).seg
    assert torch.equal(b[:, 0], torch.full_like(b[:, 0], 0.7))
    torch.testing.assert_close(b[:, 1:], a[:, 1:], rtol=0, atol=0)


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics():
    model = build("unrolled", bn="frozen")
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    stats = [m.running_mean.clone() for m in bns]
    model(torch.rand(4, 1, 16, 16), samples=torch.tensor([0]))
    assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, bns))
    with pytest.raises(ValueError, match="bn must be"):
        build("unrolled", bn="nope")
    with pytest.raises(ValueError, match="tied model"):
        build("unet", background="constant")


def test_offset_input_is_never_zero():
    scenes = [{"image": torch.tensor([[[0.0, 0.5, 1.0]]]), "mask": torch.zeros(1, 3), "labels": torch.ones(2)}]
    x = digits.ModelInput(scenes, "offset")[0]["image"]
    assert x.min() > 0 and torch.allclose(x, torch.tensor([[[1 / 256, 128.5 / 256, 1.0]]]))


def test_cached_runs_survive_a_new_trainconfig_field_at_its_default(tmp_path):
    """A run recorded before a TrainConfig field existed is the same run as one with that field at its default."""
    task = {"kind": "seg", "id": "a", "dir": str(tmp_path), "train": {"steps": 3, "lr": 0.1}}
    newer = {**task, "id": "renamed", "train": {**task["train"], "calibration_lr_scale": 1.0, "balance": "sum"}}
    assert digits._identity(task) == digits._identity(newer)
    other = {**task, "train": {**task["train"], "calibration_lr_scale": 30.0}}
    assert digits._identity(task) != digits._identity(other)


@pytest.mark.parametrize("presence", ["prior", "prior-detached"])
@pytest.mark.parametrize("samples", [None, [2, 0], (2, 0), (1,)])
def test_presence_prior_adds_log_sigmoid_of_each_rows_logit(presence, samples):
    """Object map k of row b = scaled heatmap + log sigmoid(logit[b, k]); the background map unchanged; rows picked by
    samples get their own row's logits. 'prior' sends gradient into the logits through the prior, 'prior-detached'
    none (its gradient is the heatmap path only)."""
    plain = build("unrolled", heatmap_scale=3.0)
    gated = build("unrolled", heatmap_scale=3.0, presence=presence)
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    plain, gated = plain.double().eval(), gated.double().eval()
    rows = None if samples is None else torch.tensor(samples)
    a, b = plain(x, samples=rows), gated(x, samples=samples)  # the gated model gets the raw form (list / tuple)
    logits = a.logits if rows is None else a.logits[rows]
    torch.testing.assert_close(b.seg[:, 0], a.seg[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(b.seg[:, 1:], a.seg[:, 1:] + F.logsigmoid(logits[:, 1:])[:, :, None, None],
                               rtol=1e-12, atol=1e-12)
    # the gradient of the summed object maps wrt the last layer's bias: the heatmap path gives none (a bias does not
    # change input x gradient), so all of it is the prior's sigmoid(-logit) -- or zero when detached
    fc = gated.classifier.fc
    (grad,) = torch.autograd.grad(b.seg[:, 1:].sum(), fc.bias, allow_unused=True)
    grad = torch.zeros_like(fc.bias) if grad is None else grad
    expected = torch.zeros_like(grad)
    if presence == "prior":
        expected[1:] = (torch.sigmoid(-logits[:, 1:]) * x.shape[-1] * x.shape[-2]).sum(0).detach()
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-10)


def test_presence_refused_for_free_decoders_and_bad_values():
    with pytest.raises(ValueError, match="presence"):
        build("unet", presence="prior")
    with pytest.raises(ValueError, match="presence must be"):
        build("unrolled", presence="yes")
