"""python -m bench.voc -- one run of the paper's PASCAL VOC 2012 protocol (Table 1 and its ablation).

1. Classifier. ``--classifier PATH`` (a 21-output classifier already fine-tuned on VOC image-level labels) is used
   as is. Otherwise a classification-only stage trains one first from ``--weights`` (imagenet | PATH | none) on the
   image-level pool for ``--pretrain-steps`` / ``--pretrain-epochs`` and caches it in ``--classifier-dir``
   (default OUT/classifier; reused when its settings match, so a grid can share one per backbone and seed).
2. Segmentation. ``--labels N`` of the 1464 segmentation ``train`` images get pixel labels (picked from ``--seed``
   by ``bench.data.voc.sample_labelled``); every VOC 2012 image outside segmentation ``val`` gives image-level
   labels (read once from the XML, cached beside the data). Batches of ``--batch-size`` (10) hold about half of
   each; maps are computed for the pixel-labelled rows only. Loss ``--seg-weight`` x pixel-wise softmax CE over the
   21 stacked maps + ``--cls-weight`` x sigmoid CE on the logits (background weight 0). AdamW, ``--lr`` 1e-5.
   Augmentation: random scale (0.5-2), crop ``--image-size`` (256), horizontal flip. One loop:
   ``unroll.segmentation.train``.
3. Evaluation on the 1449 segmentation ``val`` images, full images, 255 ignored: mIoU, per-class IoU, and the image-
   level macro F1 over the 20 object classes (logit > 0). Val is never used for selection: ``--select-on K`` holds
   out K segmentation-train images outside the N labelled ones and keeps the step with the best held-out mIoU;
   without it (the default) the last step is reported. metrics.json says which.

``--protocol reference`` runs the reference code's protocol instead (bench.protocol: its loss weighting, input
scaling, augmentation, 156,800 steps, centre-crop evaluation with void as background, selection on val -- labelled
optimistic in metrics.json and the log -- and the unrolled model on its training gradient, unroll.reference).

Writes OUT/metrics.json, OUT/history.jsonl, OUT/labelled.txt, OUT/ckpt.pt (every evaluation and on Ctrl-C;
``--resume`` continues exactly), OUT/predictions.png and OUT/evolution.png (tied models).

    python -m bench.voc --root ~/data --labels 20                       # unrolled resnet50, 1 GPU
    torchrun --standalone --nproc_per_node=4 -m bench.voc --root ~/data --labels 20 --amp
    python -m bench.voc --root DIR --labels 2 --backbone resnet18 --weights none --image-size 64 \\
        --steps 2 --pretrain-steps 2 --device cpu                       # a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.cli import class_chunks, integer, number
from bench.protocol import PROTOCOLS
from zoo.segmentation import SEG_MODELS, TIED

__all__ = ["main", "build_parser", "MODELS"]

MODELS = SEG_MODELS
N_FIGURE = 4
N_EVOLUTION = 3
EVOLUTION_SIZE = 128  # evolution snapshots: images resized to this, heatmaps stored at half of it (fp16)


# ----------------------------------------------------------------------------------------------------------- parser


def _scale(text: str) -> float | str:
    if text == "learn":
        return "learn"
    try:
        return number(0.0, True)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--heatmap-scale takes a positive number or 'learn', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,  # bench.voc_table routes flags by their full names
        prog="python -m bench.voc",
        description="PASCAL VOC 2012 semi-supervised segmentation (the paper's Table 1 protocol), one run. "
                    "Writes OUT/metrics.json, OUT/history.jsonl and figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default="ours",
                   help="ours (honest: held-out selection, full images) or reference (the reference code's protocol, "
                        "selection on val: optimistic; see bench/protocol.py)")
    g.add_argument("--root", default="data", help="folder holding VOCdevkit/VOC2012 (torchvision's root)")
    g.add_argument("--download", action="store_true", help="download VOC 2012 trainval (~2 GB) into --root if absent")
    g.add_argument("--labels", type=integer(1), default=20, help="pixel-labelled images out of the 1464 of train")
    g.add_argument("--image-size", type=integer(16), default=256,
                   help="training crop side (pixels); under --protocol reference also the evaluation crop")
    g.add_argument("--select-on", type=integer(0), default=0,
                   help="hold out this many segmentation-train images (outside the labelled ones) and keep the "
                        "step with the best held-out mIoU; 0 = report the last step. Val is never used.")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODELS, default="unrolled")
    g.add_argument("--backbone", default="resnet50",
                   help="torchvision classifier: resnet50, vgg16_bn, resnet18, ... (unet/mt-unet/fcn: ResNet or VGG)")
    g.add_argument("--weights", default="imagenet",
                   help="initial classifier weights: imagenet (torchvision's default, downloads), a PATH, or none")
    g.add_argument("--classifier", default=None,
                   help="a classifier already fine-tuned on VOC (21 outputs, state dict): skips the pretrain stage")
    g.add_argument("--classifier-dir", default=None, help="where the pretrained classifier is cached (OUT/classifier)")
    g.add_argument("--heatmap-scale", type=_scale, default=1.0,
                   help="factor on the tied models' heatmaps before the CE (1 = the paper), or 'learn'")
    g.add_argument("--init-scale", type=number(0.0, True), default=1.0, help="initial value of a learnt scale")
    g.add_argument("--epsilon", type=number(0.0, True), default=1e-2, help="LRP-epsilon's epsilon (unrolled-eps)")
    g.add_argument("--classes-per-chunk", type=class_chunks, default="auto",
                   help="tied models: decode N of the 21 classes at a time (N, 'none' = one pass, 'auto' = one pass "
                        "on CUDA); same numbers, less memory: see the README's memory table")
    g.add_argument("--decoder-checkpoint", action="store_true",
                   help="tied models: recompute the decoder in backward instead of storing it (same numbers)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=integer(1), default=None,
                   help="segmentation steps (default 10000; 156800 under --protocol reference)")
    g.add_argument("--epochs", type=number(0.0, True), default=None,
                   help="instead of --steps: passes over the image-level pool")
    g.add_argument("--pretrain-steps", type=integer(0), default=None, help="classification-only steps (default 5000)")
    g.add_argument("--pretrain-epochs", type=number(0.0, True), default=None,
                   help="instead of --pretrain-steps: passes over the image-level pool")
    g.add_argument("--batch-size", type=integer(1), default=10, help="global batch (pixel + image-level rows)")
    g.add_argument("--pixel-fraction", type=number(0.0, True), default=0.5, help="share of pixel-labelled rows")
    g.add_argument("--lr", type=number(0.0, True), default=1e-5, help="AdamW learning rate (constant)")
    g.add_argument("--pretrain-lr", type=number(0.0, True), default=1e-4, help="classifier stage learning rate")
    g.add_argument("--pretrain-perturb", choices=("none", "gaussian", "binary"), default="none",
                   help="model-pert: train the classifier stage on perturbed inputs (gaussian sigma 0.15 of the "
                        "image's range, or binary pixel keep-probability 0.9)")
    g.add_argument("--weight-decay", type=number(0.0, False), default=None,
                   help="AdamW weight decay (default 1e-4; 0.01 under --protocol reference)")
    g.add_argument("--seg-weight", type=number(0.0, False), default=1.0, help="weight of the pixel-wise CE")
    g.add_argument("--cls-weight", type=number(0.0, False), default=1.0, help="weight of the sigmoid CE")
    g.add_argument("--eval-every", type=integer(1), default=None,
                   help="checkpoint (and held-out evaluation) interval (default 1000; 300 under --protocol reference)")
    g.add_argument("--eval-batch-size", type=integer(1), default=4, help="full-image evaluation batch")
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--amp", action="store_true", help="bf16 autocast")
    g.add_argument("--no-channels-last", action="store_true", help="keep NCHW on CUDA (channels_last is the default)")
    g.add_argument("--workers", type=integer(0), default=None, help="DataLoader workers (default: 4 on CUDA, 0 on CPU)")
    g.add_argument("--seed", type=integer(0), default=0)
    g.add_argument("--out", default="runs/voc", help="output folder")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g.add_argument("--no-figures", action="store_true")
    g.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    g.add_argument("--stop-after", type=integer(1), default=None, help=argparse.SUPPRESS)  # tests: simulate Ctrl-C
    return p


def check(args: argparse.Namespace) -> None:
    """What argparse cannot check alone (ValueError -> usage error). Fills the protocol's defaults."""
    protocol = PROTOCOLS[args.protocol]
    if args.eval_every is None:
        args.eval_every = protocol.eval_every
    if args.weight_decay is None:
        args.weight_decay = protocol.weight_decay
    if protocol.select_on_val and args.select_on:
        raise ValueError(f"--select-on: --protocol {protocol.name} selects on val itself (that is what makes it "
                         "optimistic); drop --select-on or use --protocol ours")
    if args.steps is not None and args.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if args.pretrain_steps is not None and args.pretrain_epochs is not None:
        raise ValueError("give --pretrain-steps or --pretrain-epochs, not both")
    if not 0.0 < args.pixel_fraction < 1.0:
        raise ValueError(f"--pixel-fraction must lie strictly between 0 and 1, got {args.pixel_fraction}")
    if args.batch_size < 2:
        raise ValueError("--batch-size must be >= 2 (pixel-labelled and image-level rows)")
    if args.seg_weight == 0 and args.cls_weight == 0:
        raise ValueError("--seg-weight and --cls-weight cannot both be 0")
    if args.classifier is not None and not Path(args.classifier).is_file():
        raise ValueError(f"--classifier {args.classifier}: no such file")
    w = args.weights.lower()
    if w not in ("imagenet", "none") and not Path(args.weights).is_file():
        raise ValueError(f"--weights takes imagenet, none or an existing file; got {args.weights!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available here (use --device cpu or auto)")
    if args.model not in TIED and (args.classes_per_chunk != "auto" or args.decoder_checkpoint):
        raise ValueError(f"--classes-per-chunk / --decoder-checkpoint apply to the tied models ({', '.join(TIED)}); "
                         f"--model {args.model} has a free decoder")


# -------------------------------------------------------------------------------------------------- distributed


def _dist_setup(args) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if use_cuda else "gloo",
                                                 timeout=datetime.timedelta(hours=2))
        rank = torch.distributed.get_rank()
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
        return rank, world, device
    return 0, 1, torch.device("cuda" if use_cuda else "cpu")


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


# ------------------------------------------------------------------------------------------------------------- data


def _stable_seed(*parts) -> int:
    ints = []
    for p in parts:
        ints += list(p.encode()) if isinstance(p, str) else [int(p)]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


def load_data(args, rank: int, world: int) -> dict[str, Any]:
    """Splits, image-level labels (cached beside the data), the labelled and held-out ids, and the datasets."""
    from bench.data import voc

    error = [None]
    if rank == 0:  # one process downloads; the others learn whether the data is there (and never hang on a barrier)
        try:
            voc.find_voc(args.root, download=args.download)
        except voc.VOCMissingError as err:
            error = [str(err)]
    if world > 1:
        torch.distributed.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise voc.VOCMissingError(error[0])
    voc_dir = voc.find_voc(args.root)
    train_ids = voc.split_ids(voc_dir, "train")
    val_ids = voc.split_ids(voc_dir, "val")
    pool = voc.image_level_ids(voc_dir)
    if rank == 0:  # one process reads the XML and writes the cache; the others read the cache
        labels = voc.image_labels(voc_dir, sorted(set(pool) | set(train_ids)))
    _barrier(world)
    labels = voc.image_labels(voc_dir, sorted(set(pool) | set(train_ids)))
    if args.labels > len(train_ids):
        raise ValueError(f"--labels {args.labels} exceeds the {len(train_ids)} images of Segmentation/train")
    labelled = voc.sample_labelled(train_ids, labels, args.labels, seed=args.seed)
    held_out: list[str] = []
    if args.select_on:
        rest = sorted(set(train_ids) - set(labelled))
        if args.select_on > len(rest):
            raise ValueError(f"--select-on {args.select_on}: only {len(rest)} segmentation-train images lie outside "
                             f"the {args.labels} labelled ones (use a smaller number, or 0 to report the last step)")
        rng = np.random.default_rng(_stable_seed(args.seed, "select-on"))
        held_out = sorted(rng.choice(rest, args.select_on, replace=False).tolist())
    size = args.image_size
    recipe = {"recipe": PROTOCOLS[args.protocol].recipe}
    return {
        "voc_dir": voc_dir, "train_ids": train_ids, "val_ids": val_ids, "pool": pool, "labelled": labelled,
        "held_out": held_out,
        "pixel": voc.VOCPixelSet(args.root, ids=labelled, image_set="train", train=True, image_size=size, **recipe),
        "image": voc.VOCImageLevelSet(args.root, pool, labels, train=True, image_size=size, **recipe),
        "held": (voc.VOCPixelSet(args.root, ids=held_out, image_set="train", train=False, image_size=size, **recipe)
                 if held_out else None),
        # (our evaluation uses full images whatever image_size is; the reference's crops image_size squares)
        "val": voc.VOCPixelSet(args.root, image_set="val", train=False, image_size=size, **recipe),
    }


# ------------------------------------------------------------------------------------------------------- classifier


def _weights_arg(weights: str):
    w = weights.lower()
    return "DEFAULT" if w == "imagenet" else None if w == "none" else weights


def _steps_from(steps, epochs, pool_size: int, rows: int, default: int) -> int:
    if steps is not None:
        return steps
    if epochs is not None:
        return max(1, math.ceil(epochs * pool_size / max(1, rows)))
    return default


def get_classifier(args, data, device, rank, world, run_kw, console) -> tuple[torch.nn.Module, dict]:
    """The 21-output classifier the segmentation model starts from: --classifier, or the cached / freshly trained
    classification-only stage."""
    import zoo
    from zoo import segmentation as bench_models
    from bench.data.voc import NUM_CLASSES
    from unroll.segmentation.train import TrainConfig, train

    if args.classifier is not None:
        clf = zoo.classifier(args.backbone, NUM_CLASSES, weights=args.classifier)
        return clf, {"source": "given", "path": str(args.classifier)}
    steps = _steps_from(args.pretrain_steps, args.pretrain_epochs, len(data["image"]), args.batch_size, 5000)
    spec = {"backbone": args.backbone, "weights": args.weights, "steps": steps, "lr": args.pretrain_lr,
            "batch_size": args.batch_size, "image_size": args.image_size, "weight_decay": args.weight_decay,
            "seed": args.seed, "held_out": data["held_out"], "root": str(Path(args.root).resolve())}
    if args.pretrain_perturb != "none":  # (absent otherwise, so classifiers cached before the flag stay valid)
        spec["perturb"] = args.pretrain_perturb
    if args.protocol != "ours":  # another input scaling and augmentation: another classifier
        spec["protocol"] = args.protocol
    folder = Path(args.classifier_dir) if args.classifier_dir else Path(args.out) / "classifier"
    cached = folder / "classifier.pt"
    spec_file = folder / "spec.json"
    if cached.is_file() and spec_file.is_file() and json.loads(spec_file.read_text()) == spec:
        clf = zoo.classifier(args.backbone, NUM_CLASSES, weights=cached)
        return clf, {"source": "cached", "path": str(cached), **spec}
    torch.manual_seed(_stable_seed(args.seed, "classifier-init"))
    clf = zoo.classifier(args.backbone, NUM_CLASSES, weights=_weights_arg(args.weights))
    if steps == 0:
        return clf, {"source": "initial weights, no classification stage", **spec}
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        console.log(f"classification stage: {steps} steps on {len(data['image'])} image-level images -> {folder}")
    _barrier(world)
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.pretrain_lr, min_lr=args.pretrain_lr,
                      weight_decay=args.weight_decay, eval_every=min(steps, args.eval_every), select="f1",
                      eval_batch_size=args.eval_batch_size, seed=_stable_seed(args.seed, "classifier-batches"),
                      num_workers=run_kw["workers"])
    model = bench_models.build("classifier", clf, NUM_CLASSES, perturbation=args.pretrain_perturb,
                               seed=_stable_seed(args.seed, "classifier-noise"))
    model = model.to(device, memory_format=run_kw["memory_format"])
    with _Progress(console, "classifier", steps, cfg.batch_size, rank == 0 and not args.no_progress) as bar:
        train(model, cfg, num_classes=NUM_CLASSES, image_set=data["image"], val_set=data["held"],
              out_dir=folder, resume=True, on_step=bar.step, on_log=bar.log, **run_kw["train"])
    clf = clf.cpu()
    if rank == 0:
        torch.save(clf.state_dict(), cached)
        spec_file.write_text(json.dumps(spec, indent=1))
        (folder / "ckpt.pt").unlink(missing_ok=True)
    _barrier(world)
    return clf, {"source": "trained here", "path": str(cached), **spec}


# --------------------------------------------------------------------------------------------------------- progress


class _Progress:
    """A rich progress bar (loss, last held-out mIoU, images/s) on rank 0, and the training images/s measured
    between steps (evaluation time excluded)."""

    def __init__(self, console, name: str, total: int, batch_size: int, show: bool):
        self.console, self.name, self.total, self.batch = console, name, total, batch_size
        self.show = show
        self.train_seconds, self.images, self.last = 0.0, 0, None
        self.info = {"loss": None, "miou": None}

    def __enter__(self):
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.name, total=self.total, info="")
        self.last = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.show:
            self.bar.__exit__(*exc)

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.train_seconds if self.train_seconds > 0 else None

    def step(self, step: int, parts: dict) -> None:
        now = time.perf_counter()
        self.train_seconds += now - self.last
        self.images += self.batch
        self.last = now
        self.info["loss"] = parts.get("loss")
        if self.show:
            ips = self.images_per_s
            text = " ".join(s for s in (
                f"loss {self.info['loss']:.3f}" if self.info["loss"] is not None else "",
                f"held-out mIoU {100 * self.info['miou']:.1f}" if self.info["miou"] is not None else "",
                f"{ips:.1f} img/s" if ips else "") if s)
            self.bar.update(self.task, completed=step, info=text)

    def log(self, row: dict) -> None:
        self.info["miou"] = row.get("val_miou")
        self.last = time.perf_counter()  # evaluation and checkpoint time do not count as training
        if not self.show and self.console is not None:
            self.console.log(f"{self.name} step {row['step']}: " + ", ".join(
                f"{k} {v:.3g}" if k == "lr" else f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))


# ---------------------------------------------------------------------------------------------------------- figures


def _denorm(images: torch.Tensor, recipe: str = "ours") -> torch.Tensor:
    from bench.data.voc import IMAGENET_MEAN, IMAGENET_STD

    if recipe == "reference":  # (x + 1) / 256 back to 0..1
        return ((images.float().cpu() * 256 - 1) / 255).clamp(0, 1)

    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0, 1)


def predictions_figure(path, images, masks, pred, maps, title: str, max_classes: int = 3) -> Path:
    """Rows = images (sequences of per-image tensors, sizes may differ); columns: image, ground truth, prediction,
    then the maps of the classes present in the ground truth (up to max_classes; red +, blue -)."""
    from bench import figures
    from bench.data.voc import CLASSES, IGNORE, voc_palette

    plt = figures.plt
    palette = voc_palette()
    n = len(images)
    cols = 3 + max_classes
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.6 * n + 0.4), squeeze=False)
    for i in range(n):
        m = masks[i].cpu().numpy()
        valid = m != IGNORE
        axes[i, 0].imshow(figures._image(images[i]))
        axes[i, 1].imshow(figures.colorize(m, palette))
        axes[i, 2].imshow(figures.colorize(pred[i].cpu().numpy(), palette))
        present = [c for c in np.unique(m[valid]).tolist() if 0 < c < len(CLASSES)][:max_classes]
        for j in range(max_classes):
            ax = axes[i, 3 + j]
            if j < len(present):
                h = maps[i][present[j]].float().cpu().numpy()
                lim = float(np.abs(h).max()) or 1.0
                ax.imshow(h, cmap="bwr", vmin=-lim, vmax=lim)
                ax.set_title(CLASSES[present[j]], fontsize=7)
        for ax in axes[i]:
            figures._off(ax)
    for j, name in enumerate(("image", "ground truth", "prediction")):
        axes[0, j].set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return figures._save(fig, path)


def _figure_batch(dataset, n: int, size: int):
    """The first n items, each resized to size x size on its own (no padding), stacked."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    image = torch.cat([F.interpolate(it["image"][None], size=(size, size), mode="bilinear", align_corners=False)
                       for it in items])
    mask = torch.cat([F.interpolate(it["mask"][None, None].float(), size=(size, size), mode="nearest")[:, 0].long()
                      for it in items])
    return {"image": image, "mask": mask}


def _gradient_info(model) -> dict:
    """What the model trained with: the exact gradient, or the reference code's (with whether its tied weights still
    share storage after the model was moved to its device -- .to('cuda') gives each Parameter its own, as in the
    reference code, whose decoder is built before the move)."""
    net = getattr(model, "net", None)
    cfg = getattr(net, "reference", None)
    if cfg is None:
        return {"kind": "exact" if net is not None else "not a tied decoder"}
    from unroll import reference

    pairs = reference.decoder_weights(net).values()
    shared = [enc.data_ptr() == dec.data_ptr() for enc, dec in pairs]
    state = ("aliased: two AdamW steps per tied weight" if shared and all(shared) else
             "untied copies (moved after the decoder was built)" if shared else "one tensor per weight")
    return {"kind": "reference", **{k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "decoder_weights": state}


# ------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check(args)
    except ValueError as err:
        parser.error(str(err))
    rank, world, device = _dist_setup(args)
    console = Console(stderr=False, quiet=rank != 0)
    try:
        return _run(args, parser, rank, world, device, console)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run(args, parser, rank, world, device, console) -> int:
    from zoo import segmentation as bench_models
    from bench.data.voc import CLASSES, NUM_CLASSES, VOCMissingError
    from unroll.segmentation.train import TrainConfig, collate, evaluate, predict, train

    out = Path(args.out)
    protocol = PROTOCOLS[args.protocol]
    try:
        data = load_data(args, rank, world)
    except VOCMissingError as err:
        console.print(f"[red]error:[/] {err}", highlight=False)
        return 2
    except ValueError as err:
        parser.error(str(err))
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "labelled.txt").write_text("".join(f"{i}\n" for i in data["labelled"]))
    cuda = device.type == "cuda"
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    channels_last = cuda and not args.no_channels_last
    amp_dtype = torch.bfloat16 if args.amp else None
    run_kw = {"workers": workers, "memory_format": torch.channels_last if channels_last else torch.preserve_format,
              "train": {"device": device, "amp_dtype": amp_dtype, "channels_last": channels_last,
                        "pin_memory": cuda, "distributed": world > 1, "catch_interrupt": True,
                        "eval_workers": min(workers, 2)}}
    console.print(f"[bold]bench.voc[/]: {args.model} on {args.backbone}, N={args.labels} pixel-labelled of "
                  f"{len(data['train_ids'])}, {len(data['pool'])} image-level, val {len(data['val'])}; "
                  f"{device}{' x ' + str(world) if world > 1 else ''}{', bf16' if args.amp else ''} -> {out}",
                  highlight=False)
    if protocol.optimistic:
        console.print(f"[yellow]protocol {protocol.name}[/]: the best step is selected on val, the set it reports "
                      "-- its mIoU is OPTIMISTIC, not comparable to held-out selection", highlight=False)
    try:
        try:
            clf, clf_info = get_classifier(args, data, device, rank, world, run_kw, console)
            torch.manual_seed(_stable_seed(args.seed, args.labels, args.model, "init"))
            model = bench_models.build(args.model, clf, NUM_CLASSES, epsilon=args.epsilon,
                                       heatmap_scale=args.heatmap_scale, init_scale=args.init_scale,
                                       classes_per_chunk=args.classes_per_chunk, checkpoint=args.decoder_checkpoint,
                                       gradient=protocol.gradient if args.model == "unrolled" else None)
        except Exception as err:  # unknown backbone, a model the compiler rejects, a bad checkpoint
            import unroll

            if isinstance(err, (ValueError, unroll.UnsupportedModelError, RuntimeError, KeyError)):
                console.print(f"[red]error:[/] {type(err).__name__}: {err}", highlight=False)
                return 2
            raise
        model = model.to(device, memory_format=run_kw["memory_format"])
        rows_image = args.batch_size - max(1, round(args.pixel_fraction * args.batch_size))
        steps = _steps_from(args.steps, args.epochs, len(data["image"]), rows_image, protocol.steps)
        cfg = TrainConfig(steps=steps, batch_size=args.batch_size, pixel_fraction=args.pixel_fraction, lr=args.lr,
                          min_lr=args.lr, weight_decay=args.weight_decay, seg_weight=args.seg_weight,
                          cls_weight=args.cls_weight, eval_every=min(args.eval_every, steps),
                          eval_batch_size=args.eval_batch_size, select="miou", cls_loss=protocol.cls_loss,
                          seed=_stable_seed(args.seed, args.labels, "batches"), num_workers=workers)
        on_eval = None
        evo = None
        if args.model in TIED and not args.no_figures and rank == 0:
            evo = _figure_batch(data["val"], N_EVOLUTION, EVOLUTION_SIZE)
            evo_x = evo["image"].to(device)

            def on_eval(step, m):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    seg = predict(m, evo_x)["seg"].float()
                return F.avg_pool2d(seg, 2).to(torch.float16).cpu()
        with _Progress(console, f"{args.model} N={args.labels}", steps, args.batch_size,
                       rank == 0 and not args.no_progress) as bar:
            result = train(model, cfg, num_classes=NUM_CLASSES, pixel_set=data["pixel"], image_set=data["image"],
                           val_set=data["val"] if protocol.select_on_val else data["held"], out_dir=out,
                           resume=args.resume, stop_after=args.stop_after,
                           on_step=bar.step, on_eval=on_eval, on_log=bar.log, **run_kw["train"])
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: checkpoint in {out / 'ckpt.pt'}; rerun the same command with "
                      "--resume to continue", highlight=False)
        return 130
    if rank == 0:
        with (out / "history.jsonl").open("w") as f:
            for row in result.history:
                f.write(json.dumps(row) + "\n")
    if result.interrupted:
        console.print(f"stopped after step {result.steps_done} of {steps}; rerun with --resume to continue")
        return 0
    if rank == 0:
        t0 = time.perf_counter()
        metrics = evaluate(model, data["val"], NUM_CLASSES, args.eval_batch_size, collate, device=device,
                           amp_dtype=amp_dtype, channels_last=channels_last, num_workers=min(workers, 2))
        eval_seconds = time.perf_counter() - t0
        selection = (f"best held-out mIoU on {len(data['held_out'])} segmentation-train images outside the labelled "
                     f"ones (step {result.best_step} of {steps})" if data["held_out"] else
                     f"last step ({steps}); no selection")
        if protocol.select_on_val:
            selection = protocol.selection_note(len(result.history), result.best_step, steps)
        per_class = {name: v for name, v in zip(CLASSES, metrics["per_class"] or [None] * NUM_CLASSES)}
        summary = {
            "format": "unroll-bench-voc/1",
            "miou": metrics["miou"],
            "per_class_iou": per_class,
            "f1": metrics["f1"],
            "f1_note": "macro F1 over the 20 object classes, logit > 0" + (
                "" if args.model not in ("unet", "fcn") else
                "; unet/fcn have no logits: the shared classifier, after segmentation training moved its encoder"),
            "evaluated_on": f"VOC 2012 segmentation val, {len(data['val'])} images, "
                           f"{protocol.evaluation.format(size=args.image_size)}",
            "reported": selection,
            "protocol": protocol.name,
            "optimistic": protocol.optimistic,
            "training_gradient": _gradient_info(model),
            "steps": steps,
            "best_step": result.best_step,
            "held_out_miou": None if not data["held_out"] else result.best_score,
            "val_selected_miou": result.best_score if protocol.select_on_val else None,
            "images_per_s": bar.images_per_s,
            "train_seconds": bar.train_seconds,
            "eval_seconds": eval_seconds,
            "labels": args.labels,
            "labelled_ids": data["labelled"],
            "held_out_ids": data["held_out"],
            "image_level_images": len(data["image"]),
            "classifier": clf_info,
            "heatmap_scale": (float(model.scale.log_scale.detach().exp()) if getattr(
                getattr(model, "scale", None), "learn", False) else None),
            "config": {k: v for k, v in vars(args).items() if k != "stop_after"},
            "environment": {"device": str(device), "world_size": world, "torch": torch.__version__,
                            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                            "amp": "bf16" if args.amp else None, "channels_last": channels_last,
                            "workers": workers},
        }
        (out / "metrics.json").write_text(json.dumps(summary, indent=1))
        if not args.no_figures:
            try:
                # one image at a time, at its own size: no padding in the picture or in the prediction
                items = [data["val"][i] for i in range(min(N_FIGURE, len(data["val"])))]
                preds = []
                for it in items:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        preds.append(predict(model, it["image"][None].to(device)))
                predictions_figure(out / "predictions.png",
                                   [_denorm(it["image"][None], protocol.recipe)[0] for it in items],
                                   [it["mask"] for it in items], [p["pred"][0].cpu() for p in preds],
                                   [p["seg"][0].float().cpu() for p in preds],
                                   f"{args.model} ({args.backbone}), N={args.labels}, VOC val")
                if evo is not None and result.snapshots:
                    from bench import figures

                    snaps = result.snapshots
                    if len(snaps) > 8:
                        keep = sorted(set(np.linspace(0, len(snaps) - 1, 8).round().astype(int).tolist()))
                        snaps = [snaps[i] for i in keep]
                    small = F.interpolate(evo["mask"][:, None].float(), scale_factor=0.5, mode="nearest")[:, 0]
                    figures.evolution_figure(out / "evolution.png",
                                             _denorm(F.avg_pool2d(evo["image"], 2), protocol.recipe),
                                             small.long(), [(s, h.float()) for s, h in snaps], list(CLASSES),
                                             title=f"{args.model} heatmaps during training (VOC val images)")
            except Exception as err:  # figures are a bonus; never lose the metrics for them
                console.print(f"[yellow]figures failed[/]: {err!r}")
        console.print(f"val mIoU {100 * metrics['miou']:.2f}  F1 {100 * (metrics['f1'] or 0):.2f}  "
                      f"({selection}); protocol {protocol.name}; wrote {out / 'metrics.json'}", highlight=False)
    _barrier(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
