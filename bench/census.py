"""bench.census: which timm / transformers image classifiers unroll compiles exactly, and why the others are refused.

    python -m bench.census timm [--families resnet,vgg] [--json out.json]
    python -m bench.census transformers [--json out.json]

timm: every architecture family timm.list_models() lists (a family: the model name up to its size/variant suffix,
e.g. resnet18d -> resnet, regnetx_002 -> regnetx, tf_efficientnet_b0 -> tf_efficientnet), represented by its
member with the fewest parameters (counted on the meta device: nothing allocated, nothing downloaded).
transformers: the CNN image classifiers, each built from a small config (random weights).

Each model is built in float64 with random weights and BatchNorm statistics far from identity, eval mode, and run on
a small input (batch 2, 64 px, larger only where the architecture needs it). It is then either
    exact     unroll's heatmaps equal autograd input x gradient within 1e-10 relative, or
    refused   unroll.compile raised UnsupportedModelError (the op it names is recorded), or
    WRONG     compiled but disagrees with autograd -- the outcome that must never happen, or
    error     the model could not be built or run at all (not unroll's verdict).
One thread, one model at a time: the whole timm census takes tens of minutes on a shared 2-core machine.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

import unroll
from unroll.verify import autograd_heatmaps, randomize_batch_norm, relative_error

K = 5
TOLERANCE = 1e-10
# (H, W) tried in order until the model's own forward accepts the input; non-square first (catches swapped H/W)
SIZES = ((64, 61), (64, 64), (96, 93), (96, 96), (128, 128), (224, 224))
# name tags that are not the architecture (joined with the next part): tf_efficientnet, eca_nfnet, wide_resnet
_PREFIXES = {"tf", "gluon", "legacy", "hf", "timm", "ig", "ssl", "swsl", "fb", "tv", "nf", "test", "eca", "gc", "dm",
             "ese", "wide", "tiny", "halo", "sam", "qwen", "gemma", "deepseek", "lambda", "inception", "mobilenet"}


@dataclass
class Outcome:
    family: str
    model: str
    verdict: str  # exact | refused | WRONG | error
    detail: str  # the max relative error, or the refusal / error reason
    size: int | None = None
    seconds: float = 0.0
    serves: str = ""  # the input shapes the compilation serves: "any", or its guard shape (* = any size)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Float64, eval, BatchNorm running statistics and affines far from their identity defaults (so BN is tested)."""
    return randomize_batch_norm(model.double().eval(), seed)


def refusal_reason(error: unroll.UnsupportedModelError) -> str:
    """The ops a refusal names (its '... no unroll rule (A, B):' list), else its first line."""
    text = str(error)
    found = re.search(r"have no unroll rule \(([^)]*)\)", text)
    return found.group(1) if found else text.strip().splitlines()[0][:200]


def served(net: unroll.Unrolled) -> str:
    shape = net.input_shape
    return "any" if shape is None else "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def check(model: nn.Module, output: Any = None, sizes=SIZES, channels: int = 3) -> tuple[str, str, int | None, str]:
    """(verdict, detail, size, serves) for one model: compiled and compared with autograd on a small float64
    input."""
    call = (lambda x: unroll.tracing.select_output(model(x), output)) if output is not None else model
    try:  # a refusal needs no input: most non-piecewise-linear models are decided here, without running them
        unroll.compile(model, output=output)
    except unroll.UnsupportedModelError as e:
        if not isinstance(e, unroll.tracing.NeedsExampleError):
            return "refused", refusal_reason(e), None, ""
    x = None
    for size in sizes:  # the smallest input the architecture itself accepts
        torch.manual_seed(0)
        candidate = torch.randn(2, channels, *size, dtype=torch.double)
        try:
            with torch.no_grad():
                call(candidate)
            x = candidate
            break
        except Exception as e:  # noqa: BLE001 -- too small for this architecture: try the next size
            last = f"{type(e).__name__}: {e}"
    if x is None:
        return "error", f"forward fails at sizes {sizes}: {last[:200]}", None, ""
    try:
        net = unroll.compile(model, output=output, example=x)
        heatmaps = net(x).heatmaps
    except unroll.UnsupportedModelError as e:
        return "refused", refusal_reason(e), x.shape[-2], ""
    reference = autograd_heatmaps(call, x)[0]
    error = relative_error(heatmaps, reference)
    return ("exact" if error < TOLERANCE else "WRONG"), f"{error:.1e}", x.shape[-2], served(net)


# ---------------------------------------------------------------------------------------------------- timm


def timm_family(name: str) -> str:
    """resnet18d -> resnet, regnetx_002 -> regnetx, mobilenetv2_100 -> mobilenetv2, res2net50_14w_8s -> res2net,
    tf_efficientnet_b0 -> tf_efficientnet: the first name part without its size suffix (a tag like tf_ kept)."""
    parts = name.split("_")
    head = parts[0] if parts[0] not in _PREFIXES or len(parts) == 1 else f"{parts[0]}_{parts[1]}"
    return re.sub(r"(?<!v)\d+([a-z]\d+)*[a-z]{0,2}$", "", head) or head


def timm_families() -> dict[str, list[str]]:
    """family -> its models. A name shared by two timm source files (resnet in resnet.py and byobnet.py) is two
    families, `resnet` and `resnet.byobnet`: different code, different ops."""
    import timm
    from timm.models._registry import get_arch_name  # noqa: F401 (fails loudly if timm's registry moved)
    from timm.models import _registry

    by_name: dict[str, dict[str, list[str]]] = {}
    for name in timm.list_models():
        module = _registry._model_to_module[name]
        by_name.setdefault(timm_family(name), {}).setdefault(module, []).append(name)
    families = {}
    for head, modules in by_name.items():
        main = max(modules, key=lambda m: len(modules[m]))
        for module, names in modules.items():
            families[head if module == main else f"{head}.{module}"] = names
    return families


def build_timm(name: str, device: str | None = None) -> nn.Module:
    """Random weights, K classes; built for 64 px input where the architecture takes img_size (ViTs)."""
    import timm

    with warnings.catch_warnings(), torch.device(device or "cpu"):
        warnings.simplefilter("ignore")
        try:
            return timm.create_model(name, pretrained=False, num_classes=K, img_size=64)
        except TypeError:  # no img_size argument: a size-agnostic CNN
            return timm.create_model(name, pretrained=False, num_classes=K)


def smallest(names: list[str]) -> str:
    """The member with the fewest parameters (built on the meta device); unbuildable members last."""
    def count(name):
        try:
            return sum(p.numel() for p in build_timm(name, "meta").parameters())
        except Exception:  # noqa: BLE001
            return float("inf")
    return min(names, key=lambda n: (count(n), n))


def timm_representatives(families: dict[str, list[str]], cache: str | None = None) -> dict[str, str]:
    """family -> its smallest member, from `cache` where it names this timm's families, else counted."""
    import timm

    if cache and os.path.exists(cache):
        with open(cache) as f:
            stored = json.load(f)
        if stored.get("timm") == timm.__version__ and set(stored["families"]) == set(families):
            return stored["families"]
    chosen = {fam: smallest(names) for fam, names in sorted(families.items())}
    if cache:
        with open(cache, "w") as f:
            json.dump({"timm": timm.__version__, "families": chosen}, f, indent=1)
    return chosen


def check_timm(name: str) -> tuple[str, str, int | None]:
    try:
        model = randomize_norms(build_timm(name))
    except Exception as e:  # noqa: BLE001
        return "error", f"build: {type(e).__name__}: {str(e)[:200]}", None, ""
    return check(model)


# ---------------------------------------------------------------------------------------------------- transformers

def transformers_models() -> dict[str, Callable[[], nn.Module]]:
    """The transformers CNN image classifiers, built from small configs (no download)."""
    import transformers as tf

    small = dict(num_labels=K, num_channels=3)
    return {
        "ResNetForImageClassification": lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **small)),
        "ResNetForImageClassification(bottleneck)": lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
            embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2], layer_type="bottleneck",
            downsample_in_bottleneck=True, **small)),
        "RegNetForImageClassification": lambda: tf.RegNetForImageClassification(tf.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, layer_type="x", **small)),
        "RegNetForImageClassification(y)": lambda: tf.RegNetForImageClassification(tf.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, layer_type="y", **small)),
        "BitForImageClassification": lambda: tf.BitForImageClassification(tf.BitConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=2, **small)),
        "ConvNextForImageClassification": lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **small)),
        "MobileNetV1ForImageClassification": lambda: tf.MobileNetV1ForImageClassification(tf.MobileNetV1Config(
            depth_multiplier=0.25, **small)),
        "MobileNetV2ForImageClassification": lambda: tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config(
            depth_multiplier=0.25, **small)),
        "EfficientNetForImageClassification": lambda: tf.EfficientNetForImageClassification(tf.EfficientNetConfig(
            width_coefficient=1.0, depth_coefficient=1.0, image_size=64, hidden_dim=1280, **small)),
        "ConvNextV2ForImageClassification": lambda: tf.ConvNextV2ForImageClassification(tf.ConvNextV2Config(
            hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **small)),
        "HGNetV2ForImageClassification": lambda: tf.HGNetV2ForImageClassification(tf.HGNetV2Config(
            embedding_size=16, depths=[1, 1], hidden_sizes=[16, 32], stem_channels=[3, 8, 16],
            stage_in_channels=[16, 16], stage_mid_channels=[8, 16], stage_out_channels=[16, 32],
            stage_num_blocks=[1, 1], stage_downsample=[False, True], stage_light_block=[False, True],
            stage_kernel_size=[3, 5], stage_numb_of_layers=[2, 2], **small)),
        "TextNetForImageClassification": lambda: tf.TextNetForImageClassification(tf.TextNetConfig(
            stem_out_channels=8, hidden_sizes=[8, 8, 16], conv_layer_kernel_sizes=[[[3, 3]], [[3, 1], [1, 3]]],
            conv_layer_strides=[[1], [2, 1]], image_size=64, num_labels=K)),
        "TimmWrapperForImageClassification(resnet18)": lambda: tf.TimmWrapperForImageClassification(
            tf.TimmWrapperConfig(architecture="resnet18", num_labels=K)),
    }


def check_transformers(build: Callable[[], nn.Module]) -> tuple[str, str, int | None]:
    try:
        model = randomize_norms(build())
    except Exception as e:  # noqa: BLE001
        return "error", f"build: {type(e).__name__}: {str(e)[:200]}", None, ""
    return check(model, output="logits")


# ---------------------------------------------------------------------------------------------------- CLI

def run(rows: list[tuple[str, str, Callable[[], tuple]]], log=functools.partial(print, flush=True)) -> list[Outcome]:
    outcomes = []
    for family, model, job in rows:
        start = time.perf_counter()
        try:
            verdict, detail, size, serves = job()
        except Exception as e:  # noqa: BLE001 -- a crash inside unroll is a finding, recorded, not fatal
            where = traceback.format_exc(limit=-2)[-300:]
            verdict, detail, size, serves = "error", f"{type(e).__name__}: {str(e)[:200]} | {where}", None, ""
        outcome = Outcome(family, model, verdict, detail, size, round(time.perf_counter() - start, 1), serves)
        log(f"{family:24s} {model:40s} {verdict:8s} {detail[:150]} {serves} ({outcome.seconds}s)")
        outcomes.append(outcome)
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.verdict] = counts.get(o.verdict, 0) + 1
    return ", ".join(f"{v} {counts[v]}" for v in ("exact", "refused", "WRONG", "error") if v in counts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", choices=["timm", "transformers"])
    parser.add_argument("--families", help="comma-separated families (timm) or model names (transformers)")
    parser.add_argument("--json", help="write the outcomes here")
    parser.add_argument("--representatives", help="timm: a JSON file caching family -> smallest member (read if "
                        "it exists, written if not; counting every model's parameters takes minutes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.library == "timm":
        families = timm_families()
        chosen = sorted(families) if not args.families else args.families.split(",")
        unknown = [f for f in chosen if f not in families]
        if unknown:
            parser.error(f"--families: not timm families: {unknown}")
        representatives = timm_representatives(families, args.representatives)
        rows = [(fam, representatives[fam], lambda name=representatives[fam]: check_timm(name)) for fam in chosen]
    else:
        models = transformers_models()
        chosen = list(models) if not args.families else args.families.split(",")
        rows = [(m.split("For")[0], m, lambda m=m: check_transformers(models[m])) for m in chosen]
    outcomes = run(rows)
    print(summary(outcomes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(o) for o in outcomes], f, indent=1)
    return 0 if not any(o.verdict == "WRONG" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
