"""zoo: classifiers by name, encoder stages, U-Net / FCN on a classifier's own modules. CPU, offline, seconds."""

import copy
from functools import partial

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

import zoo
from zoo.unet import Decoder

IN_CHANNELS = {"resnet18": 3, "vgg11_bn": 3, "small_vgg": 1}
NUM_CLASSIFIER_CLASSES = 5  # != NUM_SEG_CLASSES, so a mix-up of the two shows in the shapes
NUM_SEG_CLASSES = 3
ODD_SIZES = [(67, 45), (33, 32)]  # 33x32: resnet18's layer4 is 2x1, vgg11_bn's last pool 1x1
SEG_MODELS = [zoo.UNet, zoo.MultiTaskUNet, zoo.FCN]


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test instead of touching the network."""

    def refuse(url, *args, **kwargs):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are small; with the default threads, OpenMP oversubscription made this file five times
    slower (76 s vs 14 s) while other test processes shared the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shared_classifiers():
    """One classifier per architecture for the read-only tests (vgg11_bn alone takes about a second to build)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = zoo.classifier(name, NUM_CLASSIFIER_CLASSES, in_channels=IN_CHANNELS[name])
        return cache[name]

    return get


def make(name, seed=0, num_classes=NUM_CLASSIFIER_CLASSES, **kwargs):
    torch.manual_seed(seed)
    return zoo.classifier(name, num_classes, in_channels=IN_CHANNELS.get(name, 3), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# segmentation models


@pytest.mark.parametrize("size", ODD_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("Model", SEG_MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("name", list(IN_CHANNELS))
def test_seg_output_is_input_sized(shared_classifiers, name, Model, size):
    clf = shared_classifiers(name)
    model = Model(clf, NUM_SEG_CLASSES).train()
    x = torch.randn(2, IN_CHANNELS[name], *size)
    out = model(x)
    assert isinstance(out, zoo.SegOutput)
    assert out.seg.shape == (2, NUM_SEG_CLASSES, *size)
    assert torch.isfinite(out.seg).all()
    if Model is zoo.MultiTaskUNet:
        assert out.logits.shape == (2, NUM_CLASSIFIER_CLASSES)
    else:
        assert out.logits is None


@pytest.mark.parametrize("name", list(IN_CHANNELS))
def test_multitask_logits_are_the_classifiers_logits(shared_classifiers, name):
    clf = shared_classifiers(name)
    model = zoo.MultiTaskUNet(clf, NUM_SEG_CLASSES).eval()
    x = torch.randn(2, IN_CHANNELS[name], 67, 45)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, clf(x))


@pytest.mark.parametrize("Model", SEG_MODELS, ids=lambda m: m.__name__)
def test_samples_decode_the_chosen_rows_after_one_encoder_pass(Model):
    # train mode: the encoder's BatchNorm statistics come from the whole batch, the decoder's from the chosen rows
    model = Model(make("small_vgg"), NUM_SEG_CLASSES).train()
    twin = copy.deepcopy(model)
    x, rows = torch.randn(5, 1, 16, 16), torch.tensor([3, 0])
    out = model(x, samples=rows)
    features = zoo.run_stages(twin.classifier, twin.stages, x)
    torch.testing.assert_close(out.seg, twin.decoder([f[rows] for f in features], x.shape[-2:]), rtol=0, atol=0)
    for a, b in zip(model.classifier.buffers(), twin.classifier.buffers()):  # running statistics moved alike
        assert torch.equal(a, b)
    if Model is zoo.MultiTaskUNet:
        assert out.logits.shape == (5, NUM_CLASSIFIER_CLASSES)
    empty = model(x, samples=torch.tensor([], dtype=torch.long))
    assert empty.seg.shape == (0, NUM_SEG_CLASSES, 16, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, samples=rows).seg, model(x).seg[rows], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("Model", SEG_MODELS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("name", ["resnet18", "small_vgg"])
def test_encoder_parameters_are_the_classifiers_own_tensors(shared_classifiers, name, Model):
    clf = shared_classifiers(name)
    model = Model(clf, NUM_SEG_CLASSES)
    params = dict(model.named_parameters())
    for key, p in clf.named_parameters():
        assert params[f"classifier.{key}"] is p
    for stage in zoo.encoder_stages(clf):
        for path in stage.modules:
            assert model.classifier.get_submodule(path) is clf.get_submodule(path)
    # No hidden copies: everything that is not the classifier is the decoder.
    decoder_ids = {id(p) for p in model.decoder.parameters()}
    assert decoder_ids.isdisjoint(id(p) for p in clf.parameters())
    assert len(list(model.parameters())) == len(list(clf.parameters())) + len(decoder_ids)


# Every model on the small net; the ResNet (slower on CPU) through UNet only.
NAME_AND_MODEL = [("small_vgg", Model) for Model in SEG_MODELS] + [("resnet18", zoo.UNet)]


@pytest.mark.parametrize("name, Model", NAME_AND_MODEL, ids=lambda v: getattr(v, "__name__", v))
def test_loading_classifier_weights_changes_the_unet(name, Model):
    clf_a, clf_b = make(name, seed=1), make(name, seed=2)
    torch.manual_seed(0)
    model_a = Model(clf_a, NUM_SEG_CLASSES).eval()
    torch.manual_seed(0)
    model_b = Model(clf_b, NUM_SEG_CLASSES).eval()  # same decoder weights as model_a, other classifier
    x = torch.randn(2, IN_CHANNELS[name], 35, 32)
    with torch.no_grad():
        before, target = model_a(x).seg, model_b(x).seg
        assert not torch.allclose(before, target)
        clf_a.load_state_dict(clf_b.state_dict())
        torch.testing.assert_close(model_a(x).seg, target)


@pytest.mark.parametrize("name, Model", NAME_AND_MODEL, ids=lambda v: getattr(v, "__name__", v))
def test_gradients_reach_every_encoder_and_decoder_parameter(name, Model):
    clf = make(name)
    model = Model(clf, NUM_SEG_CLASSES).train()
    out = model(torch.randn(2, IN_CHANNELS[name], 35, 32))
    loss = out.seg.square().mean()
    if out.logits is not None:
        loss = loss + out.logits.square().mean()
    loss.backward()
    encoder = [p for s in zoo.encoder_stages(clf) for path in s.modules for p in clf.get_submodule(path).parameters()]
    for p in encoder + list(model.decoder.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    head = clf.get_submodule(zoo.classifier_head(clf)[1])
    assert (head.weight.grad is not None) == (Model is zoo.MultiTaskUNet)


@pytest.mark.parametrize("Model, uses_skips", [(zoo.UNet, True), (zoo.MultiTaskUNet, True), (zoo.FCN, False)])
def test_only_the_unets_see_the_shallow_stages(Model, uses_skips):
    model = Model(make("small_vgg"), NUM_SEG_CLASSES).eval()
    x = torch.randn(2, 1, 35, 32)
    with torch.no_grad():
        features = zoo.run_stages(model.classifier, model.stages, x)
        deepest_only = [torch.zeros_like(f) for f in features[:-1]] + features[-1:]
        same = torch.equal(model.decoder(features, x.shape[-2:]), model.decoder(deepest_only, x.shape[-2:]))
    assert same != uses_skips


def test_decoder_widths_can_be_set_and_are_checked():
    clf = make("small_vgg")  # 4 stages, first at full resolution: 3 decoder blocks
    unet = zoo.UNet(clf, NUM_SEG_CLASSES, decoder_channels=[8, 8, 8])
    assert [b.conv2[0].out_channels for b in unet.decoder.blocks] == [8, 8, 8]
    assert unet(torch.randn(2, 1, 33, 30)).seg.shape == (2, NUM_SEG_CLASSES, 33, 30)
    with pytest.raises(ValueError, match="needs 3 decoder widths"):
        zoo.UNet(clf, NUM_SEG_CLASSES, decoder_channels=[8, 8])
    # resnet's stem is /2: its decoder ends with a skip-less block at input resolution
    assert Decoder(zoo.encoder_stages(make("resnet18")), 2).full_res is not None


# ---------------------------------------------------------------------------------------------------------------------
# encoder stages


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        (
            "resnet18",
            {},
            [("stem", 64, 2), ("layer1", 64, 4), ("layer2", 128, 8), ("layer3", 256, 16), ("layer4", 512, 32)],
        ),
        (
            "resnet50",
            {},
            [("stem", 64, 2), ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 32)],
        ),
        (
            "resnet50",
            {"replace_stride_with_dilation": [False, True, True]},
            [("stem", 64, 2), ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 8), ("layer4", 2048, 8)],
        ),
        (
            "vgg11_bn",
            {},
            [("block1", 64, 1), ("block2", 128, 2), ("block3", 256, 4), ("block4", 512, 8), ("block5", 512, 16)]
            + [("pool6", 512, 32)],
        ),
        ("small_vgg", {}, [("block1", 16, 1), ("block2", 32, 2), ("block3", 64, 4), ("block4", 128, 8)]),
        ("plain_convnet", {"kernel_size": 5}, [("features", 32, 1)]),
    ],
    ids=["resnet18", "resnet50", "resnet50-dilated", "vgg11_bn", "small_vgg", "plain_convnet"],
)
def test_encoder_stages_describe_the_actual_features(name, kwargs, expected):
    clf = make(name, **kwargs).eval()
    stages = zoo.encoder_stages(clf)
    assert [(s.name, s.channels, s.stride) for s in stages] == expected
    x = torch.randn(1, IN_CHANNELS.get(name, 3), 64, 64)
    with torch.no_grad():
        features = zoo.run_stages(clf, stages, x)
    for stage, f in zip(stages, features):
        assert f.shape[1:] == (stage.channels, 64 // stage.stride, 64 // stage.stride), stage.name


def test_encoder_stages_refuse_unknown_families():
    with pytest.raises(ValueError, match="encoder_stages knows"):
        zoo.encoder_stages(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(ValueError, match="encoder_stages knows"):
        zoo.UNet(torchvision.models.squeezenet1_1(num_classes=2), 2)


# ---------------------------------------------------------------------------------------------------------------------
# classifier(): names and weights


def test_classifier_builds_what_it_is_asked_for():
    clf = zoo.classifier("resnet18", 7, in_channels=1)
    assert isinstance(clf, torchvision.models.ResNet)
    assert clf.conv1.in_channels == 1 and clf.fc.out_features == 7
    assert clf(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    plain = zoo.classifier("plain_convnet", 4, in_channels=3, kernel_size=3, depth=2)
    assert isinstance(plain, zoo.PlainConvNet) and plain.window == 5
    with pytest.raises(ValueError, match="unknown classifier"):
        zoo.classifier("resnet_nonexistent", 3)


@pytest.mark.parametrize(
    "name, layout",
    [("small_vgg", "state_dict"), ("small_vgg", "model_key"), ("small_vgg", "ddp_prefixed")]
    + [("resnet18", "state_dict")],
)
def test_weights_path_loads_a_checkpoint(tmp_path, name, layout):
    source = make(name, seed=1)
    state = source.state_dict()
    checkpoint = {
        "state_dict": state,
        "model_key": {"model": state, "epoch": 3},
        "ddp_prefixed": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
    }[layout]
    path = tmp_path / "clf.pt"
    torch.save(checkpoint, path)

    loaded = make(name, seed=2, weights=path)
    fresh = make(name, seed=2)
    assert not torch.equal(fresh.state_dict()["fc.weight"], state["fc.weight"])  # the seed alone would not do it
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(make(name, seed=2, weights=str(path)).state_dict()["fc.weight"], state["fc.weight"])


def test_bad_weights_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        zoo.classifier("small_vgg", 4, weights=tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        zoo.classifier("resnet18", 4, weights="no/such/dir/clf")
    with pytest.raises(ValueError, match="neither an existing file nor a torchvision weights name"):
        zoo.classifier("resnet18", 4, weights="IMAGENET_TYPO")
    with pytest.raises(ValueError, match="no pretrained weights"):
        zoo.classifier("small_vgg", 4, weights="DEFAULT")

    torch.save(torch.arange(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        zoo.classifier("small_vgg", 4, weights=tmp_path / "tensor.pt")

    path = tmp_path / "four_classes.pt"
    torch.save(zoo.classifier("small_vgg", 4, in_channels=1).state_dict(), path)
    with pytest.raises(ValueError, match="four_classes.pt does not fit SmallVGG"):
        zoo.classifier("small_vgg", 5, weights=path, in_channels=1)


def test_torchvision_weights_name_swaps_head_and_first_conv(monkeypatch):
    # Stand-in for ImageNet weights, served without a download.
    torch.manual_seed(3)
    imagenet = torchvision.models.resnet18(num_classes=1000).state_dict()
    requested = []

    def fake_get_state_dict(self, *args, **kwargs):
        requested.append(self)
        return imagenet

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_get_state_dict)

    clf = zoo.classifier("resnet18", 7, weights="DEFAULT", in_channels=1)
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    assert clf.fc.out_features == 7
    assert torch.equal(clf.layer3[1].conv2.weight, imagenet["layer3.1.conv2.weight"])
    torch.testing.assert_close(clf.conv1.weight, imagenet["conv1.weight"].sum(1, keepdim=True))

    for spelling in ["ResNet18_Weights.IMAGENET1K_V1", torchvision.models.ResNet18_Weights.DEFAULT]:
        assert zoo.classifier("resnet18", 7, weights=spelling).conv1.in_channels == 3
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1] * 3


# ---------------------------------------------------------------------------------------------------------------------
# small nets

ALLOWED_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Linear)


@pytest.mark.parametrize(
    "build",
    [partial(zoo.SmallVGG, 10, in_channels=1), partial(zoo.SmallVGG, 10), partial(zoo.PlainConvNet, 3)]
    + [partial(zoo.PlainConvNet, 7, in_channels=1)],
    ids=["small_vgg-1ch", "small_vgg-3ch", "plain3", "plain7-1ch"],
)
def test_small_nets_trace_with_fx_using_only_plain_relu_ops(build):
    model = build().eval()
    graph_module = torch.fx.symbolic_trace(model)
    modules = dict(graph_module.named_modules())
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            assert isinstance(modules[node.target], ALLOWED_MODULES), node.format_node()
        assert node.op != "call_method", node.format_node()
        if node.op == "call_function":
            assert node.target is torch.flatten, node.format_node()
    x = torch.randn(2, model.features[0].in_channels, 64, 64)
    torch.testing.assert_close(graph_module(x), model(x))


def test_small_vgg_is_small_and_keeps_an_8x8_map_at_64x64():
    model = zoo.SmallVGG(10, in_channels=1)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    x = torch.randn(2, 1, 64, 64)
    assert model.features(x).shape == (2, 128, 8, 8)
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("kernel_size", [1, 3, 7])
@pytest.mark.parametrize("pixel", [(16, 16), (0, 2)], ids=["centre", "border"])
def test_plain_convnet_output_pixel_sees_exactly_its_window(kernel_size, pixel):
    torch.manual_seed(0)
    model = zoo.PlainConvNet(kernel_size, depth=5, in_channels=1).double()
    x = torch.randn(1, 1, 33, 33, dtype=torch.double, requires_grad=True)
    features = model.features(x)
    assert features.shape[-2:] == (33, 33)  # same padding, no pooling
    features[0, :, pixel[0], pixel[1]].sum().backward()
    rows, cols = (x.grad[0, 0] != 0).nonzero(as_tuple=True)
    assert model.window == 5 * (kernel_size - 1) + 1
    half = (model.window - 1) // 2
    # zero padding: at the border the window is cut off, never wrapped around
    r, c = pixel
    expected = (max(r - half, 0), min(r + half, 32), max(c - half, 0), min(c + half, 32))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == expected


def test_plain_convnet_rejects_even_kernels():
    with pytest.raises(ValueError, match="odd kernel_size"):
        zoo.PlainConvNet(4)


def test_wsae_is_tied_and_differs_from_gradient():
    """WS-AE shares the classifier's weights, and its ReLU-on-signal decoder is not input x gradient."""
    import unroll
    from zoo import WSAE

    clf = zoo.SmallVGG(num_classes=4, in_channels=1).eval()
    wsae = WSAE(clf)
    assert {id(p) for p in wsae.parameters()} == {id(p) for p in clf.parameters()}
    x = torch.randn(2, 1, 32, 32)
    out = wsae(x)
    assert out.seg.shape == (2, 4, 32, 32)
    torch.testing.assert_close(out.logits, clf(x))
    ixg = unroll.compile(clf)(x).heatmaps
    assert (out.seg - ixg).abs().max() > 1e-3 * ixg.abs().max()
    out.seg.square().mean().backward()
    assert clf.features[0].weight.grad.abs().sum() > 0
