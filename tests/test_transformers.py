"""transformers' CNN image classifiers, built from small configs (random weights, nothing downloaded), compiled with
output="logits": the piecewise-linear ones equal autograd in float64, the others are refused naming their ops.

The census (bench.census transformers) measures the same table; this file keeps it true. transformers' ResNet and
BiT check the input's channel count in Python, so they compile with example= into a graph that serves any batch
and image size with 3 channels; MobileNet's TF-style padding reads feature-map shapes, so its graph serves the
example's shape only.
"""
import pytest
import torch

pytest.importorskip("transformers")
import transformers  # noqa: E402

import unroll  # noqa: E402
from bench.census import check, randomize_norms, transformers_models  # noqa: E402
from unroll.tracing import InputShapeError  # noqa: E402
from unroll.verify import autograd_heatmaps, relative_error  # noqa: E402

EXACT = {  # model -> the input shapes one compilation serves (* = any size)
    "ResNetForImageClassification": "(*, 3, *, *)",
    "ResNetForImageClassification(bottleneck)": "(*, 3, *, *)",
    "RegNetForImageClassification": "(*, 3, *, *)",
    "HGNetV2ForImageClassification": "(*, 3, *, *)",
    "TextNetForImageClassification": "any",
    "MobileNetV1ForImageClassification": "(2, 3, 64, 61)",
    "MobileNetV2ForImageClassification": "(2, 3, 64, 61)",
    "TimmWrapperForImageClassification(resnet18)": "any",  # a timm model inside, pixel_values.to(dtype) first
}
REFUSED = {  # model -> ops the refusal must name
    "RegNetForImageClassification(y)": ("Sigmoid",),
    "BitForImageClassification": ("group_norm",),
    "ConvNextForImageClassification": ("LayerNorm", "gelu"),
    "ConvNextV2ForImageClassification": ("LayerNorm", "gelu"),
    "EfficientNetForImageClassification": ("SiLU", "Sigmoid"),
}
# attention / token models: not CNNs, not built here (their GELU, softmax and LayerNorm are refused like timm's)
NOT_CNN = {
    "Beit", "CLIP", "Cvt", "Data2VecVision", "DeiT", "Dinat", "Dinov2", "Dinov2WithRegisters", "DonutSwin",
    "FocalNet", "Hiera", "IJepa", "ImageGPT", "Levit", "MetaClip2", "MobileViT", "MobileViTV2", "PoolFormer", "Pvt",
    "PvtV2", "Segformer", "ShieldGemma2", "Siglip2", "Siglip", "SwiftFormer", "Swin", "Swinv2", "ViT", "ViTMSN",
    "AutoModel", "PPLCNet",  # PPLCNet: hardswish; its ForImageClassification returns no logits in this version
}
FAST = {"ResNetForImageClassification", "RegNetForImageClassification", "TextNetForImageClassification",
        "MobileNetV1ForImageClassification"}


def test_census_covers_transformers():
    """Every *ForImageClassification this transformers exports is built here or listed as not a CNN."""
    built = {name.split("(")[0] for name in transformers_models()}
    exported = {n for n in dir(transformers) if n.endswith("ForImageClassification")}
    assert "ResNetForImageClassification" in exported
    unknown = sorted(n for n in exported if n not in built and n[: -len("ForImageClassification")] not in NOT_CNN)
    if unknown:
        pytest.skip(f"transformers {transformers.__version__} exports image classifiers this census has not "
                    f"classified: {unknown}")
    assert set(EXACT) | set(REFUSED) == set(transformers_models())


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in FAST else [pytest.mark.slow]) for n in EXACT])
def test_exact(name, one_thread):
    verdict, detail, _, serves = check(randomize_norms(transformers_models()[name]()), output="logits")
    assert (verdict, serves) == ("exact", EXACT[name]), detail


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n.startswith("RegNet") else [pytest.mark.slow])
                                  for n in REFUSED])
def test_refused_names_the_ops(name, one_thread):
    model = randomize_norms(transformers_models()[name]())
    with pytest.raises(unroll.UnsupportedModelError) as err:
        unroll.compile(model, output="logits", example=torch.randn(2, 3, 64, 64, dtype=torch.double))
    for op in REFUSED[name]:
        assert op in str(err.value), (op, str(err.value)[:500])


def test_resnet_needs_example_and_then_serves_other_sizes(one_thread):
    model = randomize_norms(transformers_models()["ResNetForImageClassification"]())
    with pytest.raises(unroll.UnsupportedModelError, match=r"modeling_resnet.py:\d+: `if num_channels !="):
        unroll.compile(model, output="logits")
    net = unroll.compile(model, output="logits", example=torch.randn(1, 3, 32, 32, dtype=torch.double))
    x = torch.randn(3, 3, 40, 37, dtype=torch.double)  # another batch and image size
    reference = autograd_heatmaps(lambda t: model(t).logits, x)[0]
    assert relative_error(net(x).heatmaps, reference) < 1e-10
    with pytest.raises(InputShapeError):
        net(torch.randn(1, 4, 32, 32, dtype=torch.double))


def test_mobilenet_refuses_another_shape(one_thread):
    model = randomize_norms(transformers_models()["MobileNetV1ForImageClassification"]())
    net = unroll.compile(model, output="logits", example=torch.randn(2, 3, 64, 64, dtype=torch.double))
    with pytest.raises(InputShapeError, match=r"modeling_mobilenet_v1.py:\d+"):
        net(torch.randn(2, 3, 65, 65, dtype=torch.double))
