"""unroll.attribution: CAM, saliency and the stochastic aggregations vs autograd, grad-cam and hand computations."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.models as tvm

import unroll
from unroll import attribution as A
from unroll.verify import autograd_gradients, autograd_heatmaps
from zoo import SmallVGG

from conftest import randomize

K = 5


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = randomize(SmallVGG(num_classes=K, in_channels=2, widths=(4, 8), convs_per_stage=1))
    net = unroll.compile(model)
    x = torch.randn(3, 2, 16, 16, dtype=torch.double)
    return model, net, x


def close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=kw.get("rtol", 1e-10), atol=kw.get("atol", 1e-12))


# ------------------------------------------------------------------------------------------------ plain maps


def test_saliency_and_ixg_match_autograd(setup):
    model, net, x = setup
    grads, _ = autograd_gradients(model, x)
    close(A.saliency(net, x), grads.abs().amax(2))
    heat, _ = autograd_heatmaps(model, x)
    close(A.ixg(net, x), heat)
    # a plain model is compiled on the fly (and cached)
    close(A.saliency(model, x, classes=[2]), grads[:, [2]].abs().amax(2))


def test_class_selection(setup):
    model, net, x = setup
    full = A.saliency(net, x)
    close(A.saliency(net, x, classes=[3, 1]), full[:, [3, 1]])
    mask = torch.zeros(3, K, dtype=torch.bool)
    mask[0, [0, 4]] = True
    mask[2, 2] = True  # image 1 gets no class: all-zero maps
    for fn in (A.saliency, A.ixg):
        ref = fn(net, x)
        out = fn(net, x, classes=mask)
        assert out.shape == (3, K, 16, 16)
        close(out, ref * mask[:, :, None, None])
    cam_full = A.cam(model, x)
    close(A.cam(model, x, classes=mask), cam_full * mask[:, :, None, None])
    with pytest.raises(ValueError):
        A.saliency(net, x, classes=[K])


# ------------------------------------------------------------------------------------------------ aggregations


NO_PERTURBATION = {
    "smoothgrad": {"sigma": 0.0},
    "binary_mask": {"p": 1.0},
    "random_crops": {"scale": (1.0, 1.0), "weight": None},
    "random_patches": {"p": 1.0},
    "discriminative_crops": {"scale": (1.0, 1.0), "weight": None, "beta": 2.0},
    "discriminative_patches": {"alpha": 0.0},
}


@pytest.mark.parametrize("name", list(A.AGGREGATIONS))
def test_one_unperturbed_sample_is_saliency(setup, name):
    model, net, x = setup
    out = A.AGGREGATIONS[name](net, x, n=1, **NO_PERTURBATION[name])
    close(out, A.saliency(net, x))
    # and with default settings it is something else (so the test above is not vacuous)
    assert not torch.allclose(A.AGGREGATIONS[name](net, x, n=4), A.saliency(net, x))


def test_full_image_crops(setup):
    model, net, x = setup
    sal = A.saliency(net, x)
    close(A.random_crops(net, x, n=4, scale=(1.0, 1.0), weight=None), sal)
    logits = model(x).detach()
    weighted = A.random_crops(net, x, n=4, scale=(1.0, 1.0))  # weight="sigmoid": sigmoid(S_c(x)) * saliency
    close(weighted, torch.sigmoid(logits)[:, :, None, None] * sal)


def _linear_net():
    """GAP of a 1x1 conv, then Linear, no ReLU: d S_k / d x is the same at every pixel, |sum_j W_kj v_j| / (H W)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    return model.double().eval()


def test_crops_are_pasted_at_their_box_and_averaged_over_cover():
    model = _linear_net()
    H = W = 12
    x = torch.rand(1, 1, H, W, dtype=torch.double)
    per_pixel = (model[3].weight @ model[0].weight.view(3)).abs() / (H * W)  # saliency of any (resized) crop
    n, scale = 3, (0.2, 0.5)
    out = A.random_crops(model, x, n=n, scale=scale, weight=None, generator=5)
    boxes = A._crop_boxes(n, H, W, scale, torch.Generator().manual_seed(5))  # the boxes the call drew
    cover = torch.zeros(H, W, dtype=torch.bool)
    for top, left, h, w in boxes.tolist():
        cover[top:top + h, left:left + w] = True
    assert 0 < cover.sum() < H * W
    expected = per_pixel[:, None, None] * cover  # mean of equal values where covered, 0 elsewhere
    close(out[0], expected)


def test_sigmoid_weights_are_the_crop_scores():
    model = _linear_net()
    H = W = 10
    x = torch.rand(1, 1, H, W, dtype=torch.double)
    out = A.random_crops(model, x, n=1, scale=(0.3, 0.3), generator=2)
    (top, left, h, w), = A._crop_boxes(1, H, W, (0.3, 0.3), torch.Generator().manual_seed(2)).tolist()
    crop = F.interpolate(x[:, :, top:top + h, left:left + w], size=(H, W), mode="bilinear", align_corners=False)
    score = torch.sigmoid(model(crop))[0]
    sal = (model[3].weight @ model[0].weight.view(3)).abs() / (H * W)
    close(out[0, :, top:top + h, left:left + w], (score * sal)[:, None, None].expand(2, h, w))
    assert out[0, :, :top].abs().sum() == 0 and out[0, :, top + h:].abs().sum() == 0


def test_seeded_and_independent_of_batch_size(setup):
    model, net, x = setup
    for name in A.AGGREGATIONS:
        fn = A.AGGREGATIONS[name]
        a = fn(net, x, n=5, batch_size=3, generator=7)
        b = fn(net, x, n=5, batch_size=64, generator=torch.Generator().manual_seed(7))
        close(a, b, rtol=1e-9, atol=1e-12)
        assert not torch.equal(a, fn(net, x, n=5, generator=8)), name


def test_per_image_classes_match_the_full_computation(setup):
    model, net, x = setup
    mask = torch.zeros(3, K, dtype=torch.bool)
    mask[0, 1] = mask[1, [0, 3]] = mask[2, 4] = True
    for name in ("smoothgrad", "random_crops", "discriminative_patches"):
        fn = A.AGGREGATIONS[name]
        full = fn(net, x, n=4, generator=1)
        part = fn(net, x, classes=mask, n=4, generator=1)
        close(part, full * mask[:, :, None, None], rtol=1e-9, atol=1e-12)


def test_smoothgrad_is_the_mean_over_noisy_copies(setup):
    model, net, x = setup
    n, sigma = 3, 0.2
    out = A.smoothgrad(net, x[:1], n=n, sigma=sigma, generator=4)
    g = torch.Generator().manual_seed(4)
    copies = A.perturb(x[:1].expand(n, -1, -1, -1), "gaussian", g, sigma=sigma)
    grads, _ = autograd_gradients(model, copies)
    close(out[0], grads.abs().amax(2).mean(0))


def test_discriminative_patches_drop_where_the_guide_is_hot(setup):
    model, net, x = setup
    guide = torch.zeros(3, 16, 16, dtype=torch.double)
    guide[:, :, 8:] = 1.0  # right half fully discriminative: with alpha = 1 those patches always drop
    out = A.discriminative_patches(net, x, n=2, alpha=1.0, guide=guide, grid=4)
    dropped = x.clone()
    dropped[..., 8:] = 0.0
    close(out, A.saliency(net, dropped))
    # a fully hot guide at beta < 1 rejects every crop: nothing is pasted
    none = A.discriminative_crops(net, x, n=6, beta=0.7, guide=torch.ones(3, 16, 16, dtype=torch.double))
    assert none.abs().sum() == 0


def test_patch_scores_by_hand():
    guide = torch.arange(16.0).view(4, 4)
    close(A._patch_scores(guide, 2), torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    # a grid that does not divide the size: cells of rows {0,1} and {2} (floor(i * 2 / 3))
    g3 = torch.arange(9.0).view(3, 3)
    close(A._patch_scores(g3, 2), torch.tensor([[(0 + 1 + 3 + 4) / 4, (2 + 5) / 2], [(6 + 7) / 2, 8.0]]))


# ------------------------------------------------------------------------------------------------ CAM


def _resnet18():
    torch.manual_seed(0)
    model = tvm.resnet18(num_classes=K).eval()
    with torch.no_grad():  # random BN statistics so the feature map is not trivially uniform
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_cam_by_hand_on_resnet18():
    model = _resnet18()
    x = torch.randn(2, 3, 64, 64)
    feats = {}
    handle = model.layer4.register_forward_hook(lambda m, i, o: feats.update(A=o.detach()))  # returns None
    with torch.no_grad():
        model(x)
    handle.remove()
    raw = torch.einsum("kc,bchw->bkhw", model.fc.weight.detach(), feats["A"])  # (2, K, 2, 2)
    ref = raw.clamp_min(0)
    ref = ref / ref.amax((2, 3), keepdim=True).clamp_min(1e-12)
    ref = F.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)
    out = A.cam(model, x)
    torch.testing.assert_close(out, ref)
    assert out.shape == (2, K, 64, 64) and out.max() <= 1 + 1e-6
    torch.testing.assert_close(A.cam(model, x, normalize=False, upsample=False), raw)
    torch.testing.assert_close(A.cam(unroll.compile(model), x, classes=[4, 0]), ref[:, [4, 0]])


def test_cam_equals_grad_cam():
    gradcam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = _resnet18()
    x = torch.randn(2, 3, 64, 64)
    ours = A.cam(model, x)
    with gradcam.GradCAM(model=model, target_layers=[model.layer4[-1]]) as gc:
        for k in (0, 3):
            theirs = torch.from_numpy(gc(input_tensor=x, targets=[ClassifierOutputTarget(k)] * 2))
            # grad-cam rescales to [0, 1] by min and max after resizing; bilinear resizing commutes with that affine
            # map, so ours must match once rescaled the same way
            o = ours[:, k]
            lo, hi = o.amin((1, 2), keepdim=True), o.amax((1, 2), keepdim=True)
            torch.testing.assert_close((o - lo) / (hi - lo + 1e-7), theirs, atol=2e-4, rtol=0)


class _FunctionalHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        a = torch.relu(self.conv(x))
        return F.linear(a.mean((2, 3)), self.w)


def test_cam_finds_functional_heads_and_rejects_others():
    model = _FunctionalHead().eval()
    x = torch.randn(2, 1, 8, 8)
    a = torch.relu(model.conv(x)).detach()
    raw = torch.einsum("kc,bchw->bkhw", model.w.detach(), a)
    torch.testing.assert_close(A.cam(model, x, normalize=False), raw)
    mlp = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4),
                        nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(unroll.UnsupportedModelError, match="global average pooling"):
        A.cam(mlp, x)


def test_guide_map_defaults_to_the_top_class(setup):
    model, net, x = setup
    top = model(x).argmax(1)
    cams = A.cam(model, x)
    close(A.guide_map(model, x), cams[torch.arange(3), top])
    both = torch.zeros(3, K, dtype=torch.bool)
    both[:, [1, 2]] = True
    close(A.guide_map(net, x, both), cams[:, [1, 2]].amax(1))


# ------------------------------------------------------------------------------------------------ perturbations


def test_perturb():
    x = torch.rand(4, 3, 64, 64) * 2 - 0.5
    rng = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    g = A.perturb(x, "gaussian", 0, sigma=0.15)
    noise_std = (g - x).flatten(1).std(1)
    torch.testing.assert_close(noise_std, 0.15 * rng, rtol=0.03, atol=0)
    torch.testing.assert_close(A.perturb(x, "gaussian", 0), g)  # seeded
    assert not torch.equal(A.perturb(x, "gaussian", 1), g)
    b = A.perturb(x, "binary", torch.Generator().manual_seed(0), p=0.9)
    kept = b != 0
    assert torch.equal(kept[:, 0], kept[:, 1]) and torch.equal(kept[:, 0], kept[:, 2])  # one mask for all channels
    assert abs(kept.double().mean() - 0.9) < 0.01
    torch.testing.assert_close(b[kept], x[kept])
    assert A.perturb(x, "none") is x
    t = A.Perturb("binary", p=0.5, seed=3)
    assert not torch.equal(t(x), t(x))  # the transform's generator advances
    with pytest.raises(ValueError):
        A.perturb(x, "salt")
