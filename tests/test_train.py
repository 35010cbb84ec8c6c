"""unroll.segmentation.train and zoo.segmentation: batches, loss, tied parameters, BatchNorm once per step, heatmaps =
input x gradient, any input size, exact resume, selection on the validation set. Tiny models on CPU, seconds."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import zoo
from zoo import segmentation as M
from unroll.segmentation import train as T
from unroll.verify import autograd_heatmaps

K = 4  # classes, background included


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest: small ops run faster single-threaded


class Toy(Dataset):
    """Squares of class 1..K-1 on black, 16x16: enough structure for a loss to fall, tiny enough to be instant."""

    def __init__(self, n, seed=0, size=16):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            image = torch.zeros(1, size, size)
            mask = torch.zeros(size, size, dtype=torch.long)
            labels = torch.zeros(K)
            labels[0] = 1
            for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
                c = int(torch.randint(1, K, (1,), generator=g))
                y, x = (int(v) for v in torch.randint(0, size - 5, (2,), generator=g))
                image[0, y:y + 5, x:x + 5] = 0.3 + 0.2 * c
                mask[y:y + 5, x:x + 5] = c
                labels[c] = 1
            self.items.append({"image": image, "mask": mask, "labels": labels, "index": len(self.items)})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return dict(self.items[i])


def small_clf(seed=0):
    torch.manual_seed(seed)
    return zoo.SmallVGG(num_classes=K, in_channels=1, widths=(4, 8), convs_per_stage=1)


def build(name, seed=0, **kw):
    torch.manual_seed(seed + 1)
    return M.build(name, small_clf(seed), K, **kw)


CFG = dict(batch_size=6, eval_every=2, eval_batch_size=16, lr=3e-3)


# ------------------------------------------------------------------------------------------------------------ batches


def test_batch_composition_and_determinism():
    pix, img = Toy(5, seed=1), Toy(11, seed=2)
    stream = T.BatchStream(pix, img, batch_size=8, pixel_fraction=0.5, seed=3)
    b = stream[4]
    assert b["image"].shape == (8, 1, 16, 16) and b["has_mask"].tolist() == [True] * 4 + [False] * 4
    assert (b["mask"][4:] == T.IGNORE).all(), "image-level rows must carry no pixel labels"
    for row, i in enumerate(stream.indices(0, 4)):  # pixel rows keep their masks
        assert torch.equal(b["mask"][row], pix[i]["mask"])
    for row, i in enumerate(stream.indices(1, 4)):
        assert torch.equal(b["labels"][4 + row], img[i]["labels"])
    again = T.BatchStream(pix, img, batch_size=8, pixel_fraction=0.5, seed=3)[4]
    assert all(torch.equal(b[k], again[k]) for k in ("image", "mask", "labels"))
    # every epoch of a pool is a permutation: 11 image items over steps 0..10 at 4 per step -> each seen 4 times
    seen = [i for s in range(11) for i in stream.indices(1, s)]
    assert sorted(seen) == sorted(list(range(11)) * 4)
    assert stream.indices(1, 0) != T.BatchStream(pix, img, 8, 0.5, seed=4).indices(1, 0)


def test_single_pool_batches():
    only_img = T.BatchStream(None, Toy(5), batch_size=4)
    assert only_img.n_pixel == 0 and not only_img[0]["has_mask"].any()
    only_pix = T.BatchStream(Toy(5), None, batch_size=4)
    assert only_pix.n_pixel == 4 and only_pix[0]["has_mask"].all()


def test_collate_pads_different_sizes():
    items = [{"image": torch.ones(1, 5, 7), "mask": torch.zeros(5, 7, dtype=torch.long), "labels": torch.ones(K)},
             {"image": torch.ones(1, 6, 4), "mask": torch.zeros(6, 4, dtype=torch.long), "labels": torch.ones(K)}]
    b = T.collate(items)
    assert b["image"].shape == (2, 1, 6, 7)
    assert (b["mask"][0, 5] == T.IGNORE).all() and (b["mask"][1, :, 4:] == T.IGNORE).all()
    assert b["image"][1, 0, :, 4:].abs().sum() == 0


def test_lr_schedule():
    cfg = T.TrainConfig(steps=100, lr=1e-2, min_lr=1e-3, warmup=10)
    assert T.get_lr(0, cfg) == pytest.approx(1e-3)
    assert T.get_lr(9, cfg) == pytest.approx(1e-2)
    assert T.get_lr(10, cfg) == pytest.approx(1e-2)
    assert T.get_lr(100, cfg) == pytest.approx(1e-3)
    assert T.get_lr(55, cfg) == pytest.approx(5.5e-3)


# --------------------------------------------------------------------------------------------------------------- loss


def test_loss_is_ce_on_pixel_rows_plus_bce_without_background():
    torch.manual_seed(0)
    batch = T.BatchStream(Toy(4), Toy(6, seed=1), batch_size=6, seed=0)[0]
    logits = torch.randn(6, K, requires_grad=True)
    seg = torch.randn(3, K, 16, 16)
    batch["mask"][0, :3] = T.IGNORE
    cfg = T.TrainConfig(seg_weight=0.7, cls_weight=2.0)
    loss, parts = T.compute_loss(M.SegOutput(logits, seg), batch, cfg)
    target = batch["mask"][:3]
    keep = target != T.IGNORE
    ce = -(F.log_softmax(seg, 1).gather(1, target.clamp(max=K - 1)[:, None])[:, 0][keep]).mean()
    bce = F.binary_cross_entropy_with_logits(logits[:, 1:], batch["labels"][:, 1:])
    assert loss.item() == pytest.approx(0.7 * ce.item() + 2.0 * bce.item(), rel=1e-5)
    assert parts["seg"] == pytest.approx(ce.item(), rel=1e-5) and parts["cls"] == pytest.approx(bce.item(), rel=1e-5)
    loss.backward()
    assert (logits.grad[:, 0] == 0).all(), "background logit must get weight 0 in the BCE"
    # seg-only and cls-only models get one term each
    assert T.compute_loss(M.SegOutput(None, seg), batch, cfg)[1]["cls"] is None
    assert T.compute_loss(M.SegOutput(logits, None), batch, cfg)[1]["seg"] is None
    with pytest.raises(ValueError, match="pixel-labelled rows"):
        T.compute_loss(M.SegOutput(logits, seg[:2]), batch, cfg)


@pytest.mark.parametrize("name", ["unrolled", "ws-ae", "unet", "mt-unet", "fcn", "unrolled-eps"])
def test_maps_only_for_sampled_rows(name):
    model = build(name).eval()
    x = torch.rand(5, 1, 16, 16)
    rows = torch.tensor([3, 0])
    with torch.no_grad():
        full, part = model(x), model(x, samples=rows)
        empty = model(x, samples=torch.tensor([], dtype=torch.long))
    assert part.seg.shape == (2, K, 16, 16) and empty.seg.shape == (0, K, 16, 16)
    torch.testing.assert_close(part.seg, full.seg[rows], rtol=1e-5, atol=1e-6)
    if model.has_logits:
        assert part.logits.shape == (5, K)
        torch.testing.assert_close(part.logits, full.logits)
    else:
        assert part.logits is None


# ----------------------------------------------------------------------------------------------------- heatmaps, size


@pytest.mark.parametrize("samples", [None, [2, 0]])
def test_unrolled_heatmaps_equal_input_x_gradient(samples):
    clf = small_clf().double().eval()
    for m in clf.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    model = M.build("unrolled", clf, K).eval()
    x = torch.rand(3, 1, 13, 11, dtype=torch.double)
    rows = None if samples is None else torch.tensor(samples)
    with torch.no_grad():
        out = model(x, samples=rows)
    ref, ref_logits = autograd_heatmaps(clf, x)
    ref = ref if rows is None else ref[rows]
    torch.testing.assert_close(out.seg, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.logits, ref_logits.detach())


def test_heatmap_scale_fixed_and_learned():
    clf = small_clf().eval()
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        plain = M.build("unrolled", clf, K)(x).seg
        fixed = M.build("unrolled", clf, K, heatmap_scale=5.0)(x).seg
        learn = M.build("unrolled", clf, K, heatmap_scale="learn", init_scale=3.0)
    torch.testing.assert_close(fixed, 5 * plain)
    with torch.no_grad():
        torch.testing.assert_close(learn(x).seg, 3 * plain, rtol=1e-5, atol=1e-7)
    extra = {id(p) for p in learn.parameters()} - {id(p) for p in clf.parameters()}
    assert len(extra) == 1, "the learnable scale is the only parameter the classifier does not own"


def test_bn_grad_changes_gradient_not_heatmaps():
    """In train mode the decoder's BatchNorm scale uses the batch variance; bn_grad=True keeps the same value but
    lets the training gradient see how weights move that variance (without it the classifier collapsed in eval)."""
    x = torch.rand(4, 1, 16, 16)
    outs, grads = [], []
    for bn_grad in (True, False):
        model = M.build("unrolled", small_clf(), K, bn_grad=bn_grad).train()
        out = model(x)
        out.seg.square().sum().backward()
        outs.append(out.seg.detach())
        grads.append(model.classifier.features[0].weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1])
    assert not torch.allclose(grads[0], grads[1])


def test_wsae_equals_zoo_wsae():
    clf = small_clf().eval()
    x = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        ours, ref = M.build("ws-ae", clf, K)(x), zoo.WSAE(clf)(x)
    assert torch.equal(ours.seg, ref.seg) and torch.equal(ours.logits, ref.logits)


@pytest.mark.parametrize("name", M.SEG_MODELS)
def test_any_input_size_trains(name):
    model = build(name)
    data = Toy(6, size=16)
    odd = [{**it, "image": it["image"][:, :13, :15], "mask": it["mask"][:13, :15]} for it in data.items]
    cfg = T.TrainConfig(steps=2, batch_size=4, eval_every=2)
    T.train(model, cfg, num_classes=K, pixel_set=odd, image_set=odd)
    with torch.no_grad():
        out = model.eval()(torch.rand(2, 1, 19, 9))
    assert out.seg.shape == (2, K, 19, 9)


# --------------------------------------------------------------------------------------------- parameters, BatchNorm


@pytest.mark.parametrize("name", M.SEG_MODELS)
def test_tied_weights_are_one_parameter_each(name):
    model = build(name, heatmap_scale="learn")
    clf_params = {id(p) for p in model.classifier.parameters()}
    params = list(model.parameters())
    assert len(params) == len({id(p) for p in params})
    assert clf_params <= {id(p) for p in params}
    if name in ("unrolled", "unrolled-eps", "ws-ae"):  # the decoder owns nothing: classifier weights + the scale
        assert len(params) == len(clf_params) + 1
    opt = T.configure_optimizer(model, T.TrainConfig())
    in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in params), "every parameter exactly once in the optimizer"
    x = torch.rand(2, 1, 16, 16)
    out = model(x)
    (out.seg.sum() + (out.logits.sum() if out.logits is not None else 0)).backward()
    opt.step()
    steps = [float(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"] if p.grad is not None]
    assert steps and all(s == 1.0 for s in steps)


@pytest.mark.parametrize("name", ["classifier", *M.SEG_MODELS])
def test_batchnorm_statistics_move_once_per_step(name):
    model = build(name)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns
    cfg = T.TrainConfig(steps=3, batch_size=4, eval_every=2, select="f1" if name == "classifier" else "miou")
    pix = Toy(4) if name != "classifier" else None
    calls = [0] * len(bns)
    for i, bn in enumerate(bns):
        bn.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + m.training))
    T.train(model, cfg, num_classes=K, pixel_set=pix, image_set=Toy(6))
    assert calls == [3] * len(bns), "one train-mode BatchNorm forward per training step"
    assert [int(m.num_batches_tracked) for m in bns] == [3] * len(bns)


# ------------------------------------------------------------------------------------------------ resume, selection


def _state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["unrolled", "mt-unet"])
def test_resume_gives_exactly_the_uninterrupted_run(tmp_path, name):
    pix, img, val = Toy(5), Toy(12, seed=1), Toy(6, seed=2)
    cfg = T.TrainConfig(steps=7, **CFG)
    kw = dict(num_classes=K, pixel_set=pix, image_set=img, val_set=val)
    snap = lambda step, m: T.predict(m, val[0]["image"][None])["seg"]  # noqa: E731

    full = build(name, heatmap_scale="learn")
    torch.manual_seed(123)  # global RNG state at the start: resume must restore the one of the interruption
    ref = T.train(full, cfg, out_dir=tmp_path / "a", on_eval=snap, **kw)
    rng_ref = torch.get_rng_state()

    part = build(name, heatmap_scale="learn")
    torch.manual_seed(123)
    first = T.train(part, cfg, out_dir=tmp_path / "b", stop_after=3, on_eval=snap, **kw)
    assert first.interrupted and first.steps_done == 3
    torch.manual_seed(999)  # a new process: other RNG state, fresh model
    resumed = build(name, heatmap_scale="learn", seed=7)
    second = T.train(resumed, cfg, out_dir=tmp_path / "b", resume=True, on_eval=snap, **kw)
    assert not second.interrupted
    _state_equal(full.state_dict(), resumed.state_dict())
    assert second.history == ref.history and second.best_step == ref.best_step
    assert len(second.snapshots) == len(ref.snapshots)
    for (s1, a), (s2, b) in zip(second.snapshots, ref.snapshots):
        assert s1 == s2 and torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), rng_ref), "resume restores the global RNG state"


def test_resume_rejects_another_config(tmp_path):
    kw = dict(num_classes=K, pixel_set=Toy(3), image_set=Toy(3))
    T.train(build("unet"), T.TrainConfig(steps=4, batch_size=4, eval_every=2), out_dir=tmp_path, stop_after=2, **kw)
    with pytest.raises(ValueError, match="another config"):
        T.train(build("unet"), T.TrainConfig(steps=4, batch_size=4, eval_every=2, lr=0.1), out_dir=tmp_path,
                resume=True, **kw)


def test_resume_refuses_an_optimizer_state_of_other_parameter_groups(tmp_path):
    # a checkpoint written by a code version that grouped the parameters differently (as before the calibration
    # group existed): a clear error naming the file, not torch's bare "different number of parameter groups"
    kw = dict(num_classes=K, pixel_set=Toy(3), image_set=Toy(3))
    cfg = T.TrainConfig(steps=4, batch_size=4, eval_every=2)
    T.train(build("unet"), cfg, out_dir=tmp_path, stop_after=2, **kw)
    path = tmp_path / T.CKPT_NAME
    ckpt = torch.load(path, weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups) > 1
    ckpt["optimizer"]["param_groups"] = groups[:1]
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="optimizer state does not fit") as err:
        T.train(build("unet"), cfg, out_dir=tmp_path, resume=True, **kw)
    assert str(path) in str(err.value)


def test_selection_keeps_best_validation_weights():
    model = build("unet")
    states = {}

    def remember(step, m):
        states[step] = copy.deepcopy(m.state_dict())

    cfg = T.TrainConfig(steps=8, batch_size=4, eval_every=2, lr=3e-2)
    r = T.train(model, cfg, num_classes=K, pixel_set=Toy(4), image_set=Toy(4), val_set=Toy(5, seed=3),
                on_eval=remember)
    scores = {h["step"]: h["val_miou"] for h in r.history}
    assert r.best_step == max(scores, key=lambda s: (scores[s], -s))
    assert r.best_score == scores[r.best_step]
    _state_equal(model.state_dict(), states[r.best_step])


def test_evaluate_reports_miou_and_f1():
    model = build("unrolled")
    res = T.evaluate(model, Toy(5), K, batch_size=2)
    assert 0 <= res["miou"] <= 1 and 0 <= res["f1"] <= 1 and len(res["per_class"]) == K
    seg_only = T.evaluate(build("unet"), Toy(5), K)
    assert seg_only["f1"] is not None, "seg-only models report the F1 of the classifier they share"
    assert T.evaluate(build("classifier"), Toy(5), K)["miou"] is None


def test_evaluate_reports_progress_per_image():
    model, data = build("unrolled"), Toy(5)
    calls = []
    res = T.evaluate(model, data, K, batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert res == T.evaluate(model, data, K, batch_size=2)  # the default is silent, and the numbers are the same
    assert T.evaluate(model, data, K, batch_size=2, progress=True) == res  # the rich bar


# ------------------------------------------------------------------------------------------------------- model-pert


@pytest.mark.parametrize("kind", ["gaussian", "binary"])
def test_model_pert_perturbs_training_batches_only(kind):
    model = build("classifier", perturbation=kind, seed=0)
    x = Toy(4)[0]["image"][None].repeat(3, 1, 1, 1) + 0.1
    clean = model.classifier(x)
    model.train()
    noisy_a, noisy_b = model(x).logits, model(x).logits
    assert not torch.allclose(noisy_a, clean) and not torch.allclose(noisy_a, noisy_b)  # fresh noise each call
    model.eval()
    assert torch.equal(model(x).logits, model.classifier(x))  # evaluation sees the clean input
    assert model.calls == 2


def test_model_pert_noise_resumes_exactly(tmp_path):
    img, val = Toy(12, seed=1), Toy(6, seed=2)
    cfg = T.TrainConfig(steps=6, select="f1", **CFG)
    full = build("classifier", perturbation="binary")
    ref = T.train(full, cfg, num_classes=K, image_set=img, val_set=val, out_dir=tmp_path / "a")
    part = build("classifier", perturbation="binary")
    T.train(part, cfg, num_classes=K, image_set=img, val_set=val, out_dir=tmp_path / "b", stop_after=3)
    assert part.calls == 3
    resumed = build("classifier", perturbation="binary", seed=5)
    again = T.train(resumed, cfg, num_classes=K, image_set=img, val_set=val, out_dir=tmp_path / "b", resume=True)
    assert again.history == ref.history  # same losses at every step: the same noise was drawn
    assert resumed.calls == full.calls  # (the selected step's count: selection restores the best state)
    for k, v in full.classifier.state_dict().items():
        assert torch.equal(v, resumed.classifier.state_dict()[k]), k
    # and the noise mattered: a run without it ends elsewhere
    clean = build("classifier")
    T.train(clean, cfg, num_classes=K, image_set=img, val_set=val, out_dir=tmp_path / "c")
    assert not torch.equal(clean.classifier.features[0].weight, full.classifier.features[0].weight)


def test_model_pert_rejects_bad_kinds():
    with pytest.raises(ValueError, match="perturbation must be one of"):
        build("classifier", perturbation="salt")
    with pytest.raises(ValueError, match="classifier stage"):
        build("unrolled", perturbation="binary")


# ------------------------------------------------------------------------------------------------ classifier stage


def test_classifier_stage_is_the_shared_loop_and_caches_by_key(tmp_path):
    from unroll.segmentation.classifier import ClassifierModel, cached_classifier_state, train_classifier

    img, val = Toy(12, seed=1), Toy(6, seed=2)
    cfg = T.TrainConfig(steps=4, select="f1", **CFG)
    ref = small_clf()
    direct = T.train(ClassifierModel(ref, "binary", 7), cfg, num_classes=K, image_set=img, val_set=val)
    clf = small_clf()
    key = {"what": "toy", "steps": 4, "sizes": (4, 8)}
    stage = train_classifier(clf, cfg, img, K, folder=tmp_path, key=key, val_set=val, perturbation="binary",
                             noise_seed=7)
    assert not stage.cached and stage.classifier is clf and stage.result.history == direct.history
    _state_equal(clf.state_dict(), ref.state_dict())
    assert not (tmp_path / "ckpt.pt").exists(), "the stage's checkpoint goes once the classifier is cached"
    # the same key: loaded, not trained (a fresh classifier ends equal, with the training summary)
    again = train_classifier(small_clf(seed=3), cfg, img, K, folder=tmp_path, key=key, val_set=val,
                             perturbation="binary", noise_seed=7)
    assert again.cached and again.result.history == direct.history and again.result.best_step == direct.best_step
    _state_equal(again.classifier.state_dict(), ref.state_dict())
    # another key: trained again
    assert cached_classifier_state(tmp_path, {**key, "steps": 5}) is None
    other = train_classifier(small_clf(), T.TrainConfig(steps=2, select="f1", **CFG), img, K, folder=tmp_path,
                             key={**key, "steps": 2})
    assert not other.cached and cached_classifier_state(tmp_path, key) is None
