"""Saliency vs CAM for weakly supervised segmentation: every method x background resolve -> mIoU, FG-Prec, DR-Rec,
NDR-Rec, on digit scenes, single MNIST digits or PASCAL VOC 2012 val.

    python -m bench.wsss --dataset digits                 # trains a small classifier (cached in --out), ~5 min
    python -m bench.wsss --dataset mnist --checkpoint runs/clf.pt
    python -m bench.wsss --dataset digits --quick         # seconds: a smoke run (what the tests do)
    python -m bench.wsss --dataset voc --voc-root DIR --checkpoint runs/voc/classifier/classifier.pt \
        --arch resnet50 --device cuda                     # a 21-output VOC classifier, e.g. bench.voc's stage 1

VOC: the first --n-test images (default 100) of a seeded shuffle of Segmentation/val, each resized so its shorter
side is --size (default 256) and centre-cropped to a square (the maps are batched; a crop keeps aspect ratios), label
255 ignored, image labels = the classes of the crop's mask. The classifier must come from a checkpoint (this script
trains classifiers only on digits). Model-pert rows on VOC: train the classifier stage of bench.voc with
``--pretrain-perturb gaussian|binary`` and run this script on that checkpoint (its saliency row is the model-pert row).

Pipeline: classifier (a checkpoint, or `train_tensor_classifier` here, cached as OUT/classifier.pt) -> for each
method, the maps of each test image's positive classes (the image labels are known: weak supervision), from
`unroll.attribution` (CAM; vanilla saliency; input x gradient; SmoothGrad, BinaryMask, random crops / patches,
discriminative crops / patches, all batched through the unrolled decoder) and from "model-pert" classifiers (the
classifier fine-tuned with `perturb` noise, then vanilla saliency; plus a control fine-tuned without noise) -> each
background resolve of `unroll.segmentation.resolve` (basic and smooth at the best threshold of the 0.01..0.50 sweep,
superpixel at 0.3) -> `unroll.segmentation.wsss_metrics`. DR / NDR are the ground-truth pixels where the base
classifier's CAM of their class is >= / < 0.25, the same regions for every method.

Writes to OUT: results.json (everything, including the sweeps and timings), results.md (the tables), panel_<method>.png
(image, GT, CAM, saliency, the method's map, its three resolved masks), hyperplanes.png (the CAM / saliency scatter of
one image) and the classifier checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import unroll
from unroll import attribution as attr
from unroll.attribution import Perturb, perturb  # noqa: F401  (re-exported: the model-pert transform)

from bench.cli import add_threads_flag, progress_bar, set_threads
from unroll.segmentation.resolve import (DEFAULT_THRESHOLDS, RESOLVES, normalize, prepare, resolve_basic, superpixels,
                                         threshold_sweep)
from unroll.segmentation.wsss_metrics import TAU_CAM, wsss_metrics

__all__ = ["train_tensor_classifier", "classifier_scores", "console", "perturb", "Perturb", "run", "main", "METHOD_ORDER", "TABLES"]

# Piped output (logs, CI) gets 130 columns instead of rich's 80, so the tables are not wrapped cell by cell.
console = Console(width=None if sys.stdout.isatty() else 130)

METHOD_ORDER = [
    "cam", "saliency", "ixg",
    "smoothgrad", "binary_mask", "random_crops", "random_patches", "discriminative_crops", "discriminative_patches",
    "model_pert_none", "model_pert_gaussian", "model_pert_binary",
]
LABELS = {
    "cam": "CAM", "saliency": "Saliency", "ixg": "Input x Grad",
    "smoothgrad": "SmoothGrad", "binary_mask": "BinaryMask", "random_crops": "Random crops",
    "random_patches": "Random patches", "discriminative_crops": "Discr. crops",
    "discriminative_patches": "Discr. patches",
    "model_pert_none": "Fine-tune, no noise (control)", "model_pert_gaussian": "Model-pert gaussian",
    "model_pert_binary": "Model-pert binary",
}
# The paper's four tables: (title, methods, resolves)
TABLES = [
    ("Table 1: CAM vs gradient saliency (basic resolve)", ["cam", "saliency", "ixg"], ["basic"]),
    ("Table 2: background resolves", ["cam", "saliency"], list(RESOLVES)),
    ("Table 3: stochastic aggregation of saliency (input perturbation)",
     ["saliency", "smoothgrad", "binary_mask", "random_crops", "random_patches", "discriminative_crops",
      "discriminative_patches"], list(RESOLVES)),
    ("Table 4: model perturbation (fine-tuned classifier, vanilla saliency)",
     ["saliency", "model_pert_none", "model_pert_gaussian", "model_pert_binary"], list(RESOLVES)),
]
METRICS = ("miou", "fg_precision", "dr_recall", "ndr_recall")
METRIC_NAMES = {"miou": "mIoU", "fg_precision": "FG-Prec", "dr_recall": "DR-Rec", "ndr_recall": "NDR-Rec"}


# ---------------------------------------------------------------------------------------------------------- config


@dataclass
class Config:
    dataset: str = "digits"
    size: int = 64
    n_train: int = 6000
    n_test: int = 100
    epochs: int = 10
    finetune_epochs: int = 1
    batch_size: int = 64  # training
    lr: float = 3e-3
    widths: tuple[int, ...] = (16, 32, 64, 128)  # zoo.SmallVGG's default: an 8x8 CAM at 64x64
    samples: int = 50  # SmoothGrad / BinaryMask / patches
    crops: int = 140  # random and discriminative crop proposals
    attr_batch: int = 128  # perturbed copies per encoder/decoder pass
    seed: int = 0
    methods: list[str] = field(default_factory=lambda: list(METHOD_ORDER))
    panel_images: int = 3
    voc_root: str | None = None  # dataset "voc": the folder holding VOCdevkit/VOC2012
    device: str = "cpu"  # where the classifier and the decoder run (maps are gathered on the CPU)

    @classmethod
    def for_dataset(cls, dataset: str, quick: bool = False, **over) -> "Config":
        base = {"digits": {"size": 64}, "mnist": {"size": 56},
                "voc": {"size": 256, "finetune_epochs": 0, "attr_batch": 32}}[dataset]
        if quick:
            base.update(size=32, n_train=192, n_test=6, epochs=1, samples=3, crops=5, attr_batch=16, panel_images=2,
                        finetune_epochs=0 if dataset == "voc" else 1)
        base.update({k: v for k, v in over.items() if v is not None})
        return cls(dataset=dataset, **base)


# ---------------------------------------------------------------------------------------------------------- data


def load_split(cfg: Config, split: str):
    """(images (N, C, S, S), masks (N, S, S) long, labels (N, L) multi-hot with background = 1); L = 11 for digits,
    21 for VOC."""
    if cfg.dataset == "voc":
        return load_voc(cfg, split)
    from bench.data.digits import make_digit_scenes

    n = cfg.n_train if split == "train" else cfg.n_test
    seed = cfg.seed + (0 if split == "train" else 1000)
    if cfg.dataset == "digits":
        ds = make_digit_scenes("sklearn", split, n_scenes=n, size=cfg.size, seed=seed)
    else:
        ds = make_digit_scenes("mnist", split, n_scenes=n, size=cfg.size, seed=seed, scene="single")
    items = [ds[i] for i in range(len(ds))]
    return (torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items]),
            ds.labels.clone())


def load_voc(cfg: Config, split: str):
    """VOC 2012 Segmentation/val: n_test images of a seeded shuffle, shorter side resized to `size` (bilinear; masks
    nearest), centre-cropped to size x size. Labels: the classes in the cropped mask (255 ignored), background = 1."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from bench.data.voc import NUM_CLASSES, VOCPixelSet

    if split != "test":
        raise ValueError("bench.wsss trains no classifier on VOC: pass --checkpoint (e.g. bench.voc's stage 1)")
    ds = VOCPixelSet(cfg.voc_root, image_set="val", train=False)
    order = np.random.default_rng(cfg.seed).permutation(len(ds))[:cfg.n_test]
    images, masks, labels = [], [], []
    for i in order.tolist():
        item = ds[i]
        image = TF.resize(item["image"], cfg.size, InterpolationMode.BILINEAR, antialias=True)
        mask = TF.resize(item["mask"][None], cfg.size, InterpolationMode.NEAREST)[0]
        image, mask = TF.center_crop(image, cfg.size), TF.center_crop(mask, cfg.size)
        present = mask.unique()
        y = torch.zeros(NUM_CLASSES)
        y[present[present < NUM_CLASSES]] = 1
        y[0] = 1
        images.append(image)
        masks.append(mask)
        labels.append(y)
    return torch.stack(images), torch.stack(masks), torch.stack(labels)


def class_names(cfg: Config) -> list[str]:
    """Names of the label columns (background first)."""
    if cfg.dataset == "voc":
        from bench.data.voc import CLASSES

        return list(CLASSES)
    return ["background"] + [str(d) for d in range(10)]


# ---------------------------------------------------------------------------------------------------------- classifier


def train_tensor_classifier(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int,
                            batch_size: int = 64, lr: float = 3e-3, perturbation: str = "none", seed: int = 0,
                            progress: Progress | None = None, description: str = "train",
                            loss: str = "bce") -> list[float]:
    """Train on in-memory tensors with AdamW and a one-cycle schedule; returns the mean loss per epoch.

    The recipe of bench.wsss / bench.window (their published numbers come from it), not the shared loop of
    ``unroll.segmentation.classifier.train_classifier``: epochs over a tensor set, one-cycle learning rate, weight
    decay on every parameter, BCE on every logit (background column included) or single-label CE.

    loss="bce": multi-label, BCE on every logit against `labels` (N, L) multi-hot; if the model has fewer outputs
    K < L, its outputs are the last K label columns (a 10-way digit model against 11 labels with background first).
    loss="ce": single-label, cross-entropy with the first positive non-background label as the class (one digit per
    image). `perturbation` ("none", "gaussian", "binary") applies `unroll.attribution.perturb` to every batch (the
    "model-pert" fine-tuning). Seeded; leaves the model in eval mode.
    """
    if loss not in ("bce", "ce"):
        raise ValueError(f"loss must be 'bce' or 'ce', got {loss!r}")
    g = torch.Generator().manual_seed(seed)
    noise = torch.Generator().manual_seed(seed + 1)
    n = len(images)
    steps_per_epoch = math.ceil(n / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
    task = progress.add_task(description, total=epochs * steps_per_epoch) if progress else None
    history = []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x = perturb(images[idx], perturbation, noise)
            logits = model(x)
            target = labels[idx, -logits.shape[1]:]
            if loss == "bce":
                value = F.binary_cross_entropy_with_logits(logits, target)
            else:
                offset = labels.shape[1] - logits.shape[1]
                value = F.cross_entropy(logits, labels[idx, 1:].argmax(1) + 1 - offset)
            opt.zero_grad()
            value.backward()
            opt.step()
            sched.step()
            total += float(value.detach()) * len(idx)
            if progress:
                progress.advance(task)
        history.append(total / n)
    model.eval()
    return history


def classifier_scores(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> dict:
    """Macro F1 over the object classes (logit > 0), the exact-match rate of the image's class set, and top-1: how
    often the highest object logit is one of the image's classes."""
    from unroll.segmentation.metrics import MultilabelF1

    device = next(model.parameters()).device
    with torch.no_grad():
        logits = torch.cat([model(images[i:i + batch].to(device)).float().cpu()
                            for i in range(0, len(images), batch)])
    K, fg = logits.shape[1], labels.shape[1] - 1  # fg: the object (non-background) classes, the last columns
    full = torch.cat([torch.full((len(logits), labels.shape[1] - K), 10.0), logits], 1)
    f1 = MultilabelF1(labels.shape[1])
    f1.update(full, labels)
    exact = ((logits[:, -fg:] > 0) == labels[:, -fg:].bool()).all(1).float().mean()
    top = logits[:, -fg:].argmax(1)
    top1 = labels[:, -fg:].gather(1, top[:, None]).squeeze(1).float().mean()
    return {"f1": float(f1.compute()), "exact_match": float(exact), "top1": float(top1)}


def build_classifier(config: dict) -> nn.Module:
    import zoo

    kw = dict(config.get("kwargs", {}))
    return zoo.classifier(config["arch"], config["num_classes"], in_channels=config["in_channels"], **kw)


def infer_config(state: dict, arch: str | None = None) -> dict:
    """A classifier config from a state dict: SmallVGG (conv + BN in `features`) or PlainConvNet (conv only), or the
    torchvision `arch` given, with the class count and input channels read off the weights."""
    convs = [(k, v) for k, v in state.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4]
    convs.sort(key=lambda kv: int(kv[0].split(".")[1]))
    if "fc.weight" not in state:
        raise ValueError("cannot read the checkpoint: no fc.weight (expected a SmallVGG/PlainConvNet/ResNet layout)")
    K = state["fc.weight"].shape[0]
    if arch not in (None, "small_vgg", "plain_convnet"):
        first = next(v for k, v in state.items() if v.dim() == 4)
        return {"arch": arch, "num_classes": K, "in_channels": first.shape[1], "kwargs": {}}
    if not convs:
        raise ValueError("cannot infer the architecture from the checkpoint; pass --arch")
    outs = [v.shape[0] for _, v in convs]
    has_bn = any(k.endswith("running_mean") for k in state)
    if has_bn and arch != "plain_convnet":
        widths = [w for i, w in enumerate(outs) if i == 0 or w != outs[i - 1]]
        kwargs = {"widths": tuple(widths), "convs_per_stage": len(outs) // len(widths)}
        return {"arch": "small_vgg", "num_classes": K, "in_channels": convs[0][1].shape[1], "kwargs": kwargs}
    kwargs = {"kernel_size": convs[0][1].shape[-1], "depth": len(convs), "width": outs[0]}
    return {"arch": "plain_convnet", "num_classes": K, "in_channels": convs[0][1].shape[1], "kwargs": kwargs}


def load_classifier(path: str | Path, arch: str | None = None) -> tuple[nn.Module, dict]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    config = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    from zoo.backbones import checkpoint_state

    state = checkpoint_state(obj)
    config = config or infer_config(state, arch)
    model = build_classifier(config)
    model.load_state_dict(state)
    return model.eval(), config


def cached_classifier(path: Path, config: dict, train: Callable[[nn.Module], list[float]], init: nn.Module | None = None
                      ) -> tuple[nn.Module, bool]:
    """Load `path` if it holds a checkpoint made with the same `config`; else build (or copy `init`), train, save."""
    if path.is_file():
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if obj.get("config") == json.loads(json.dumps(config)):
            model = build_classifier(config)
            model.load_state_dict(obj["model"])
            return model.eval(), True
    model = copy.deepcopy(init) if init is not None else build_classifier(config)
    history = train(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": json.loads(json.dumps(config)), "history": history}, path)
    return model.eval(), False


# ---------------------------------------------------------------------------------------------------------- maps


def compute_maps(method: str, model: nn.Module, net, images: torch.Tensor, labels: torch.Tensor, cfg: Config,
                 progress: Progress | None = None, chunk: int = 16) -> torch.Tensor:
    """(N, L, H, W) maps in dataset class space (L = labels.shape[1]) for each image's positive foreground classes
    (zero maps elsewhere). A model with K < L outputs covers the last K classes."""
    L = labels.shape[1]
    device = torch.device(cfg.device)
    K = net.model(images[:1].to(device)).shape[1] if hasattr(net, "model") else L
    offset = L - K
    mask = labels.bool().clone()
    mask[:, 0] = False  # background is not a class of any map
    mask = mask[:, offset:]
    g = torch.Generator().manual_seed(cfg.seed)
    kw_agg = {"batch_size": cfg.attr_batch, "generator": g}
    fns: dict[str, Callable] = {
        "cam": lambda x, m: attr.cam(model, x, classes=m),
        "saliency": lambda x, m: attr.saliency(net, x, classes=m, batch_size=cfg.attr_batch),
        "ixg": lambda x, m: attr.ixg(net, x, classes=m),
        "smoothgrad": lambda x, m: attr.smoothgrad(net, x, m, n=cfg.samples, **kw_agg),
        "binary_mask": lambda x, m: attr.binary_mask(net, x, m, n=cfg.samples, **kw_agg),
        "random_crops": lambda x, m: attr.random_crops(net, x, m, n=cfg.crops, **kw_agg),
        "random_patches": lambda x, m: attr.random_patches(net, x, m, n=cfg.samples, **kw_agg),
        "discriminative_crops": lambda x, m: attr.discriminative_crops(net, x, m, n=cfg.crops, guide=m, **kw_agg),
        "discriminative_patches": lambda x, m: attr.discriminative_patches(net, x, m, n=cfg.samples, guide=m,
                                                                            **kw_agg),
    }
    fn = fns["saliency" if method.startswith("model_pert") else method]
    task = progress.add_task(f"maps: {method}", total=len(images)) if progress else None
    out = []
    for i in range(0, len(images), chunk):
        maps = fn(images[i:i + chunk].to(device), mask[i:i + chunk].to(device)).float().cpu()
        out.append(F.pad(maps, (0, 0, 0, 0, offset, 0)) if offset else maps)
        if progress:
            progress.advance(task, len(maps))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------- evaluation


def evaluate(maps: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor, cam_regions: torch.Tensor,
             segments: torch.Tensor, num_classes: int) -> dict:
    """Per resolve: the sweep, the threshold used (best of the sweep for basic / smooth, 0.3 for superpixel) and the
    four metrics at that threshold."""
    out = {}
    for method in RESOLVES:
        scores = prepare(maps, method, segments=segments)
        sweep = threshold_sweep(num_classes)
        sweep.update(scores, labels, masks)
        result = sweep.compute()
        threshold = DEFAULT_THRESHOLDS["superpixel"] if method == "superpixel" else result.best_threshold
        preds = resolve_basic(scores, labels, threshold, normalized=True)
        metrics = wsss_metrics(num_classes)
        metrics.update(preds, masks, cam=cam_regions)
        values = {k: float(v) for k, v in metrics.compute().items()}
        out[method] = {"threshold": threshold, **values, "sweep": result.as_dict()}
    return out


# ---------------------------------------------------------------------------------------------------------- reporting


def _cell(results: dict, method: str, resolve: str, metric: str, reference: str = "saliency") -> str:
    v = results[method][resolve][metric]
    text = "nan" if math.isnan(v) else f"{100 * v:.1f}"
    if method != reference and reference in results and not math.isnan(v):
        r = results[reference][resolve][metric]
        if not math.isnan(r):
            text += f" ({100 * (v - r):+.1f})"
    return text


def table_rows(results: dict, methods: list[str], resolves: list[str]) -> list[list[str]]:
    rows = []
    for method in methods:
        if method not in results:
            continue
        for resolve in resolves:
            thr = results[method][resolve]["threshold"]
            rows.append([LABELS[method], resolve, f"{thr:.2f}"] + [_cell(results, method, resolve, m)
                                                                   for m in METRICS])
    return rows


HEADER = ["Method", "Resolve", "thr", *[METRIC_NAMES[m] for m in METRICS]]


def rich_tables(results: dict) -> list[Table]:
    tables = []
    for title, methods, resolves in TABLES:
        t = Table(title=title, caption="% ; (difference to vanilla saliency, same resolve)")
        for h in HEADER:
            t.add_column(h, justify="left" if h in ("Method", "Resolve") else "right")
        for row in table_rows(results, methods, resolves):
            t.add_row(*row)
        tables.append(t)
    return tables


def markdown(results: dict, meta: dict) -> str:
    lines = [f"# Saliency vs CAM for WSSS — {meta['dataset']}", "",
             f"Classifier: {meta['classifier']['config']['arch']} {meta['classifier']['config'].get('kwargs', {})}, "
             f"test F1 {meta['classifier']['scores']['f1']:.3f}, exact match "
             f"{meta['classifier']['scores']['exact_match']:.3f}. Test images: {meta['n_test']} at "
             f"{meta['size']}x{meta['size']}. Values in %, (difference to vanilla saliency with the same resolve). "
             "basic / smooth: best threshold of the 0.01..0.50 sweep on these images; superpixel: 0.3. "
             f"DR / NDR: ground-truth pixels with base-classifier CAM >= / < {TAU_CAM} "
             f"({meta['region_pixels']['dr']} / {meta['region_pixels']['ndr']} pixels).", ""]
    for title, methods, resolves in TABLES:
        lines += [f"## {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in table_rows(results, methods, resolves)]
        lines.append("")
    lines += ["## Best mIoU of the threshold sweep (every resolve)", "", "| Method | " + " | ".join(RESOLVES) + " |",
              "|---|" + "---|" * len(RESOLVES)]
    for method in METHOD_ORDER:
        if method in results:
            sweeps = [results[method][r]["sweep"] for r in RESOLVES]
            cells = [f"{100 * sw['best_miou']:.1f} @ {sw['best_threshold']:.2f}" for sw in sweeps]
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += ["", "## Time per method (maps of all test images)", "", "| Method | seconds |", "|---|---|"]
    lines += [f"| {LABELS[m]} | {meta['timings'][m]:.1f} |" for m in METHOD_ORDER if m in meta["timings"]]
    return "\n".join(lines) + "\n"


def _mask_cmap(n: int):
    """Black background, then tab10 (digits) or tab20 (up to 20 object classes: VOC)."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    table = matplotlib.colormaps["tab10" if n <= 11 else "tab20"].colors
    return ListedColormap([(0, 0, 0)] + [tuple(c) for c in table][:n - 1])


def _show_mask(ax, mask, n: int):
    m = mask.numpy().astype(float)
    m[m == 255] = np.nan  # void: left blank
    ax.imshow(m, cmap=_mask_cmap(n), vmin=-0.5, vmax=n - 0.5, interpolation="nearest")


def _show_image(ax, image):
    """A grey image as is; a colour (normalised) image min-max scaled to [0, 1] for display."""
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray")
    else:
        img = image.permute(1, 2, 0)
        ax.imshow(((img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)).numpy())


def panel(path: Path, method: str, idx: list[int], images, masks, labels, cam_maps, sal_maps, maps, segments,
          thresholds: dict[str, float]):
    """One row per image: image | GT | CAM | saliency | this method | basic | smooth | superpixel (the maps shown
    class-agnostic: the max over the image's classes of the normalised maps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["image", "ground truth", "CAM", "saliency", LABELS[method], "basic", "smooth", "superpixel"]
    fig, axes = plt.subplots(len(idx), len(cols), figsize=(2 * len(cols), 2 * len(idx)), squeeze=False)
    sub = lambda t: t[idx]  # noqa: E731
    resolved = {}
    for r in RESOLVES:
        scores = prepare(sub(maps), r, segments=sub(segments))
        resolved[r] = resolve_basic(scores, sub(labels), thresholds[r], normalized=True)
    for row, i in enumerate(idx):
        shows = [("img", images[i]), ("mask", masks[i]),
                 ("map", normalize(cam_maps[i:i + 1])[0].amax(0)), ("map", normalize(sal_maps[i:i + 1])[0].amax(0)),
                 ("map", normalize(maps[i:i + 1])[0].amax(0))] + [("mask", resolved[r][row]) for r in RESOLVES]
        for col, (kind, data) in enumerate(shows):
            ax = axes[row, col]
            if kind == "img":
                _show_image(ax, data)
            elif kind == "mask":
                _show_mask(ax, data, labels.shape[1])
            else:
                ax.imshow(data.numpy(), cmap="jet", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(cols[col], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def hyperplane_scatter(path: Path, c: int, image, mask, cam_maps, sal_maps, tau_sal: float, name: str = ""):
    """For one image and one of its classes c: each pixel at (CAM_c - tau_cam, saliency_c - tau_sal), its signed
    distances to the CAM hyperplane {CAM = tau_cam} and the saliency hyperplane {saliency = tau_sal} (normalised maps).
    Ground-truth pixels of c coloured by quadrant: HSR/LSR (high / low saliency region) x DR/NDR; others grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cam_c = normalize(cam_maps[None])[0, c]
    sal_c = normalize(sal_maps[None])[0, c]
    dx, dy = (cam_c - TAU_CAM).flatten(), (sal_c - tau_sal).flatten()
    gt = (mask == c).flatten()
    groups = {"HSR-DR": (dy >= 0) & (dx >= 0), "LSR-DR": (dy < 0) & (dx >= 0), "HSR-NDR": (dy >= 0) & (dx < 0),
              "LSR-NDR": (dy < 0) & (dx < 0)}
    colours = {"HSR-DR": "tab:red", "LSR-DR": "tab:orange", "HSR-NDR": "tab:blue", "LSR-NDR": "tab:gray"}
    fig, (a0, a1, a2) = plt.subplots(1, 3, figsize=(14, 4.4))
    _show_image(a0, image)
    a0.set_title(f"image (class {name or c})")
    overlay = np.zeros((*mask.shape, 3))
    for name, sel in groups.items():
        from matplotlib.colors import to_rgb

        overlay.reshape(-1, 3)[(sel & gt).numpy()] = to_rgb(colours[name])
    a1.imshow(overlay)
    a1.set_title("ground-truth pixels by region")
    a2.scatter(dx[~gt], dy[~gt], s=3, c="lightgray", label="not this class")
    for name, sel in groups.items():
        m = sel & gt
        frac = float(m.sum()) / max(1, int(gt.sum()))
        a2.scatter(dx[m], dy[m], s=6, c=colours[name], label=f"{name} ({100 * frac:.0f}%)")
    a2.axvline(0, color="k", lw=0.8)
    a2.axhline(0, color="k", lw=0.8)
    a2.set_xlabel(f"signed distance to CAM hyperplane (CAM - {TAU_CAM})")
    a2.set_ylabel(f"signed distance to saliency hyperplane (sal - {tau_sal:.2f})")
    a2.legend(fontsize=8, loc="upper left")
    for ax in (a0, a1):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {name: int((sel & gt).sum()) for name, sel in groups.items()}


# ---------------------------------------------------------------------------------------------------------- run


def run(cfg: Config, out: Path, checkpoint: str | None = None, arch: str | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    timings: dict[str, float] = {}
    with progress_bar(console) as progress:
        t0 = time.time()
        test_x, test_m, test_y = load_split(cfg, "test")
        train_x = train_y = None
        if cfg.dataset == "voc" and checkpoint is None:
            raise ValueError("--dataset voc needs --checkpoint: a 21-output VOC classifier (bench.voc caches its "
                             "classification stage as OUT/classifier/classifier.pt; pass --arch with it)")
        if checkpoint is None or (cfg.finetune_epochs > 0 and any(m.startswith("model_pert") for m in cfg.methods)):
            train_x, _, train_y = load_split(cfg, "train")
        timings["data"] = time.time() - t0

        t0 = time.time()
        if checkpoint is not None:
            model, config = load_classifier(checkpoint, arch)
            cached = True
        else:
            config = {"arch": "small_vgg", "num_classes": test_y.shape[1], "in_channels": test_x.shape[1],
                      "kwargs": {"widths": list(cfg.widths)},
                      "train": {"dataset": cfg.dataset, "size": cfg.size, "n_train": cfg.n_train,
                                "epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed}}
            model, cached = cached_classifier(
                out / "classifier.pt", config,
                lambda m: train_tensor_classifier(m, train_x, train_y, cfg.epochs, cfg.batch_size, cfg.lr,
                                                  seed=cfg.seed, progress=progress, description="train classifier"))
        timings["classifier"] = time.time() - t0
        scores = classifier_scores(model.to(cfg.device), test_x, test_y)
        console.log(f"classifier {'loaded' if cached else 'trained'}: test F1 {scores['f1']:.3f}, "
                    f"exact match {scores['exact_match']:.3f}")

        models = {"base": model}
        for method in cfg.methods:
            if not method.startswith("model_pert"):
                continue
            kind = method.removeprefix("model_pert_")
            t0 = time.time()
            ft_config = {**config, "finetune": {"from": str(checkpoint) if checkpoint else "classifier.pt",
                                                "perturbation": kind, "epochs": cfg.finetune_epochs,
                                                "n_train": cfg.n_train, "seed": cfg.seed}}
            models[method], _ = cached_classifier(
                out / f"classifier-{method}.pt", ft_config,
                lambda m, kind=kind: train_tensor_classifier(
                    m, train_x, train_y, cfg.finetune_epochs, cfg.batch_size, lr=cfg.lr / 3, perturbation=kind,
                    seed=cfg.seed + 7, progress=progress, description=f"fine-tune ({kind})"),
                init=model.cpu())  # (the fine-tuning below trains on the CPU)
            timings[f"finetune_{kind}"] = time.time() - t0

        segments = superpixels(test_x)
        models = {name: m.eval().to(cfg.device) for name, m in models.items()}
        nets = {name: unroll.compile(m) for name, m in models.items()}
        L = test_y.shape[1]
        maps: dict[str, torch.Tensor] = {}
        results = {}
        for method in ["cam", "saliency"] + [m for m in cfg.methods if m not in ("cam", "saliency")]:
            key = method if method.startswith("model_pert") else "base"
            t0 = time.time()
            maps[method] = compute_maps(method, models[key], nets[key], test_x, test_y, cfg, progress)
            timings[method] = time.time() - t0
            console.log(f"maps: {method} ({timings[method]:.1f} s)")
        cam_regions = maps["cam"]
        regions = region_sizes(test_m, cam_regions)
        console.log(f"ground-truth foreground pixels: {regions['dr']} DR, {regions['ndr']} NDR "
                    f"(CAM of their class >= / < {TAU_CAM})")
        for method in maps:
            if method in cfg.methods or method in ("cam", "saliency"):
                results[method] = evaluate(maps[method], test_y, test_m, cam_regions, segments, L)

        idx = _panel_images(test_y, cfg.panel_images)
        for method in results:
            panel(out / f"panel_{method}.png", method, idx, test_x, test_m, test_y, maps["cam"], maps["saliency"],
                  maps[method], segments, {r: results[method][r]["threshold"] for r in RESOLVES})
        tau_sal = results["saliency"]["basic"]["threshold"]
        j, c = _scatter_pick(test_m, test_y, maps["cam"])
        quadrants = hyperplane_scatter(out / "hyperplanes.png", c, test_x[j], test_m[j], maps["cam"][j],
                                       maps["saliency"][j], tau_sal, class_names(cfg)[c])

    meta = {"dataset": cfg.dataset, "size": cfg.size, "n_test": len(test_x), "config": asdict(cfg),
            "classifier": {"config": config, "scores": scores, "cached": cached,
                           "checkpoint": str(checkpoint) if checkpoint else str(out / "classifier.pt")},
            "timings": timings, "wall_seconds": time.time() - t_start,
            "hyperplane_image": j, "hyperplane_class": c, "hyperplane_quadrants": quadrants, "region_pixels": regions,
            "panel_images": idx, "torch_threads": torch.get_num_threads()}
    report = {**meta, "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(results, meta))
    for t in rich_tables(results):
        console.print(t)
    console.log(f"wrote {out}/results.json, results.md, panel_*.png, hyperplanes.png "
                f"({meta['wall_seconds']:.0f} s)")
    return report


def region_sizes(masks: torch.Tensor, cams: torch.Tensor) -> dict[str, int]:
    """How many ground-truth foreground pixels fall in the DR and in the NDR (the recalls' denominators)."""
    fg = (masks != 0) & (masks != 255)
    own = cams.gather(1, torch.where(fg, masks, 0).long().unsqueeze(1)).squeeze(1)
    return {"dr": int((fg & (own >= TAU_CAM)).sum()), "ndr": int((fg & (own < TAU_CAM)).sum())}


def _scatter_pick(masks: torch.Tensor, labels: torch.Tensor, cams: torch.Tensor) -> tuple[int, int]:
    """The (test image, digit class) with the most NDR pixels (the most to see in the scatter); (0, its first class)
    when no ground-truth pixel is in the NDR."""
    best, best_count = (0, int(torch.nonzero(labels[0, 1:])[0]) + 1), 0
    norm = normalize(cams)
    for i in range(len(masks)):
        for c in (torch.nonzero(labels[i, 1:]).flatten() + 1).tolist():
            count = int(((masks[i] == c) & (norm[i, c] < TAU_CAM)).sum())
            if count > best_count:
                best, best_count = (i, c), count
    return best


def _panel_images(labels: torch.Tensor, k: int) -> list[int]:
    """The first k test images, preferring ones with several digits (more to see)."""
    counts = labels[:, 1:].sum(1)
    order = sorted(range(len(labels)), key=lambda i: (-min(int(counts[i]), 2), i))
    return order[:k]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.wsss", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["digits", "mnist", "voc"], default="digits",
                   help="digits: 1-3 sklearn digits per scene (default 64x64); mnist: one MNIST digit (default 56x56)")
    p.add_argument("--checkpoint", help="classifier checkpoint (state dict, or {'model': ...}); default: train one, "
                                        "cached in --out")
    p.add_argument("--voc-root", type=Path, help="folder holding VOCdevkit/VOC2012 (default: shared data voc12/)")
    p.add_argument("--arch", help="architecture of --checkpoint when it cannot be inferred (a torchvision name)")
    p.add_argument("--out", type=Path, help="output folder (default runs/wsss-DATASET)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--size", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--finetune-epochs", type=int, help="model-pert fine-tuning epochs (0 = skip those rows)")
    p.add_argument("--samples", type=int, help="copies per image for SmoothGrad/BinaryMask/patches (paper: 50)")
    p.add_argument("--crops", type=int, help="crop proposals per image (paper: up to 140)")
    p.add_argument("--attr-batch", type=int, help="perturbed copies per decoder pass (bounds memory)")
    p.add_argument("--methods", nargs="+", choices=METHOD_ORDER, help="subset of methods (CAM and saliency always)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the classifier and decoder run")
    add_threads_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.dataset == "voc":
        from bench.data import data_root
        from bench.data.voc import VOCMissingError, find_voc

        args.voc_root = args.voc_root or data_root() / "voc12"
        try:
            find_voc(args.voc_root)
        except VOCMissingError as e:
            console.print(f"[red]--dataset voc: PASCAL VOC 2012 images are not available here.[/red] {e}\n"
                          "Use --dataset digits or --dataset mnist.")
            return 2
        if args.checkpoint is None:
            console.print("[red]--dataset voc needs --checkpoint[/red]: a 21-output VOC classifier, e.g. the "
                          "classification stage bench.voc caches as OUT/classifier/classifier.pt (with --arch).")
            return 2
        if args.finetune_epochs:
            console.print("[red]--finetune-epochs: model-pert fine-tuning runs on digits only.[/red] On VOC, train "
                          "the classifier with `python -m bench.voc --pretrain-perturb gaussian|binary` and pass it "
                          "as --checkpoint.")
            return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        console.print("[red]--device cuda: no CUDA device is visible[/red]")
        return 2
    methods = args.methods
    if args.finetune_epochs == 0 or args.dataset == "voc":
        methods = [m for m in (methods or METHOD_ORDER) if not m.startswith("model_pert")]
    cfg = Config.for_dataset(args.dataset, args.quick, size=args.size, n_train=args.n_train, n_test=args.n_test,
                             epochs=args.epochs, finetune_epochs=args.finetune_epochs, samples=args.samples,
                             crops=args.crops, attr_batch=args.attr_batch, seed=args.seed, methods=methods,
                             voc_root=str(args.voc_root) if args.voc_root else None, device=args.device)
    out = args.out or Path("runs") / f"wsss-{args.dataset}{'-quick' if args.quick else ''}"
    try:
        run(cfg, out, args.checkpoint, args.arch)
    except (FileNotFoundError, ValueError) as e:
        console.print(f"[red]{e}[/red]")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
