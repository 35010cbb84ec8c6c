"""The semi-supervised segmentation experiment shared by ``bench.voc`` and ``bench.folder``: one runner, two data
sources.

A CLI parses its data flags, then hands :func:`run` a loader that builds an :class:`Experiment` (datasets, class
names, what was validated). The runner does the rest, in this order, so that every refusal comes before any work:

1. the output folder: an existing checkpoint is resumed (``--resume``) or replaced (``--overwrite``), never
   overwritten silently;
2. the data: the loader validates every file the run will read (exit 2 listing each bad file, or ``--skip-bad``);
3. the model: built once on an untrained classifier, so a backbone the compiler refuses is refused before the
   classification stage trains;
4. the classification stage (``--classifier`` or a cached / trained one), segmentation training
   (``unroll.segmentation.train``), the final evaluation, OUT/metrics.json, history, figures. The evaluation writes
   metrics.json whatever happens (``"partial": true`` and the error when it did not finish).

Checkpoints (OUT/ckpt.pt) carry ``meta``: model, backbone, classes, normalisation, image size -- everything
:func:`load_trained` needs to rebuild the model for ``bench.folder predict`` / ``evaluate``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from rich.markup import escape  # messages hold paths and '[role]' tags, never markup

from bench.cli import check_calibration_lr, class_chunks, integer, number
from bench.protocol import OURS, Protocol
from unroll.segmentation.train import stable_seed
from unroll.segmentation.transforms import denormalize
from zoo.segmentation import BACKGROUNDS, PRESENCES, SEG_MODELS, TIED

__all__ = ["MODELS", "Experiment", "add_arguments", "check", "run", "load_trained", "Progress",
           "report_problems"]

MODELS = SEG_MODELS
N_FIGURE = 4
N_EVOLUTION = 3
EVOLUTION_SIZE = 128  # evolution snapshots: images resized to this, heatmaps stored at half of it (fp16)
META_FORMAT = "unroll-bench-run/1"


# ----------------------------------------------------------------------------------------------------------- parser


def _scale(text: str) -> float | str:
    if text == "learn":
        return "learn"
    try:
        return number(0.0, True)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--heatmap-scale takes a positive number or 'learn', got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser, *, default_out: str, default_backbone: str = "resnet50",
                  default_steps: int = 10000, default_pretrain_steps: int = 5000, default_image_size: int = 256,
                  default_labels: int = 20, protocols: Sequence[Protocol] = ()) -> None:
    """The flags every experiment shares (model, training, run); the CLI adds its data flags.

    ``protocols``: the CLI has a ``--protocol`` flag choosing among these (bench.protocol); --steps, --eval-every
    and --weight-decay then default to None, their help lists each protocol's default, and the CLI's check fills
    them in (:func:`fill_protocol_defaults`)."""

    def by_protocol(field_: str, fallback) -> tuple[Any, str]:
        if not protocols:
            return fallback, ""
        return None, " (default: " + ", ".join(f"{getattr(q, field_):g} under --protocol {q.name}"
                                               for q in protocols) + ")"
    g = p.add_argument_group("labels and crops")
    g.add_argument("--labels", type=integer(1), default=default_labels,
                   help="pixel-labelled training images (picked class-balanced from --seed)")
    g.add_argument("--image-size", type=integer(16), default=default_image_size,
                   help="training crop side (pixels)" + ("; under --protocol reference also the evaluation crop"
                                                         if any(q.name == "reference" for q in protocols) else ""))
    g.add_argument("--skip-bad", action="store_true",
                   help="leave out the files the validation pass finds bad (listed in metrics.json) instead of "
                        "stopping with the list")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=MODELS, default="unrolled",
                   help="segmentation model (see zoo.segmentation): tied heatmap decoders (unrolled, unrolled-eps, "
                        "ws-ae) or free decoders on the classifier's stages (unet, mt-unet, fcn)")
    g.add_argument("--backbone", default=default_backbone,
                   help="torchvision classifier: resnet50, vgg16_bn, resnet18, ... (unet/mt-unet/fcn: ResNet or VGG)")
    g.add_argument("--weights", default="imagenet",
                   help="initial classifier weights: imagenet (torchvision's default, downloads), a PATH, or none")
    g.add_argument("--classifier", default=None,
                   help="a classifier already fine-tuned on this data (K outputs, state dict): skips the pretrain "
                        "stage")
    g.add_argument("--classifier-dir", default=None,
                   help="where the pretrained classifier is cached (default: OUT/classifier)")
    g.add_argument("--heatmap-scale", type=_scale, default=1.0,
                   help="factor on the tied models' heatmaps before the CE (1 = the paper), or 'learn'")
    g.add_argument("--init-scale", type=number(0.0, True), default=1.0, help="initial value of a learnt scale")
    g.add_argument("--epsilon", type=number(0.0, True), default=1e-2, help="LRP-epsilon's epsilon (unrolled-eps)")
    g.add_argument("--background", choices=BACKGROUNDS, default="heatmap",
                   help="tied models: the background map is the background class's heatmap, or one learnable "
                        "constant (a threshold the object heatmaps must exceed; see bench.ablation)")
    g.add_argument("--presence", choices=PRESENCES, default="none",
                   help="tied models: 'prior' adds the classifier's log sigmoid(logit) to each object class's map, "
                        "'prior-detached' the same without its gradient; 'none' the paper's maps")
    g.add_argument("--classes-per-chunk", type=class_chunks, default="auto",
                   help="tied models: decode N classes at a time (N, 'none' = one pass, 'auto' = one pass "
                        "on CUDA); same numbers, less memory: see the README's memory table")
    g.add_argument("--decoder-checkpoint", action="store_true",
                   help="tied models: recompute the decoder in backward instead of storing it (same numbers)")
    g = p.add_argument_group("training")
    steps_help = by_protocol("steps", None)[1] or f" (default {default_steps})"
    g.add_argument("--steps", type=integer(1), default=None, help=f"segmentation steps{steps_help}")
    g.add_argument("--epochs", type=number(0.0, True), default=None,
                   help="instead of --steps: passes over the image-level pool")
    g.add_argument("--pretrain-steps", type=integer(0), default=None,
                   help=f"classification-only steps (default {default_pretrain_steps})")
    g.add_argument("--pretrain-epochs", type=number(0.0, True), default=None,
                   help="instead of --pretrain-steps: passes over the image-level pool")
    g.add_argument("--batch-size", type=integer(1), default=10, help="global batch (pixel + image-level rows)")
    g.add_argument("--pixel-fraction", type=number(0.0, True), default=0.5, help="share of pixel-labelled rows")
    g.add_argument("--lr", type=number(0.0, True), default=1e-5, help="AdamW learning rate (constant)")
    g.add_argument("--pretrain-lr", type=number(0.0, True), default=1e-4, help="classifier stage learning rate")
    g.add_argument("--pretrain-perturb", choices=("none", "gaussian", "binary"), default="none",
                   help="model-pert: train the classifier stage on perturbed inputs (gaussian sigma 0.15 of the "
                        "image's range, or binary pixel keep-probability 0.9)")
    default, note = by_protocol("weight_decay", 1e-4)
    g.add_argument("--weight-decay", type=number(0.0, False), default=default,
                   help="AdamW weight decay (weights only, not biases / BatchNorm), both stages" + note)
    g.add_argument("--seg-weight", type=number(0.0, False), default=1.0, help="weight of the pixel-wise CE")
    g.add_argument("--cls-weight", type=number(0.0, False), default=1.0, help="weight of the sigmoid CE")
    g.add_argument("--calibration-lr", type=number(0.0, True), default=1.0,
                   help="lr factor of the tied models' calibration scalars (learnt heatmap scale, constant background "
                        "level): Adam moves a scalar by about lr per step, 1e-5 x 10,000 steps cannot move a scale")
    default, note = by_protocol("eval_every", 1000)
    g.add_argument("--eval-every", type=integer(1), default=default,
                   help="checkpoint (and held-out evaluation) interval" + note)
    g.add_argument("--eval-batch-size", type=integer(1), default=4, help="full-image evaluation batch")
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    g.add_argument("--amp", action="store_true", help="bf16 autocast")
    g.add_argument("--no-channels-last", action="store_true", help="keep NCHW on CUDA (channels_last is the default)")
    g.add_argument("--workers", type=integer(0), default=None, help="DataLoader workers (default: 4 on CUDA, 0 on CPU)")
    g.add_argument("--seed", type=integer(0), default=0,
                   help="picks the labelled images, the held-out ones, initialisation and batch order")
    g.add_argument("--out", default=default_out, help="output folder")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh even if --out holds a run's checkpoint (a cached classification stage with "
                        "the same settings is still reused)")
    g.add_argument("--no-figures", action="store_true", help="skip OUT/predictions.png and OUT/evolution.png")
    g.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    g.add_argument("--stop-after", type=integer(1), default=None, help=argparse.SUPPRESS)  # tests: simulate Ctrl-C
    p.set_defaults(default_steps=default_steps, default_pretrain_steps=default_pretrain_steps)


def fill_protocol_defaults(args: argparse.Namespace, protocol: Protocol) -> None:
    """The protocol's defaults for the flags left unset (see add_arguments(protocols=))."""
    if args.eval_every is None:
        args.eval_every = protocol.eval_every
    if args.weight_decay is None:
        args.weight_decay = protocol.weight_decay
    args.default_steps = protocol.steps


def check(args: argparse.Namespace) -> None:
    """What argparse cannot check alone (ValueError -> usage error)."""
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
    check_calibration_lr(args.calibration_lr, args.heatmap_scale, args.background)
    for flag, value, default in (("--presence", args.presence, "none"), ("--background", args.background, "heatmap")):
        if args.model not in TIED and value != default:
            raise ValueError(f"{flag} {value} applies to the tied models ({', '.join(TIED)}), not --model {args.model}")
    if args.resume and args.overwrite:
        raise ValueError("give --resume or --overwrite, not both")


# -------------------------------------------------------------------------------------------------- distributed


def dist_setup(device_flag: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
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


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def from_rank0(value, world: int):
    """``value`` as rank 0 has it, on every rank (a picklable object)."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------------------- experiment


@dataclass
class Experiment:
    """What a data source hands the runner."""

    name: str  # "voc" / "folder": metrics.json format "unroll-bench-<name>/1"
    classes: list[str]
    pixel: Any  # pixel-labelled training set (train=True)
    image: Any  # image-level training set
    held: Any | None  # held-out selection set (full images) or None: report the last step
    test: Any  # final evaluation set (full images)
    labelled: list[str]
    held_out: list[str]
    evaluated_on: str  # e.g. "VOC 2012 segmentation val, 1449 full images, 255 ignored"
    source: str  # the data's identity for the classifier cache (a resolved path)
    mean: Sequence[float]
    std: Sequence[float]
    info: dict = field(default_factory=dict)  # extra metrics.json fields (split sizes, skipped files, ...)
    data_meta: dict = field(default_factory=dict)  # extra checkpoint meta (e.g. the folder spec)
    palette: np.ndarray | None = None
    # bench.protocol: the loss, the selection set, the unrolled model's training gradient (the data recipe and the
    # flag defaults are the loader's / the CLI's); OURS unless the CLI has --protocol
    protocol: Protocol = OURS

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def report_problems(err, console, skip_hint: bool = True) -> int:
    """Print a DataError (every bad file) and return the exit code 2."""
    console.print(f"[red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    if skip_hint:
        console.print("fix or remove these files, or rerun with --skip-bad to leave them out of the run",
                      highlight=False)
    return 2


# ------------------------------------------------------------------------------------------------------- classifier


def _weights_arg(weights: str):
    w = weights.lower()
    return "DEFAULT" if w == "imagenet" else None if w == "none" else weights


def steps_from(steps, epochs, pool_size: int, rows: int, default: int) -> int:
    if steps is not None:
        return steps
    if epochs is not None:
        return max(1, math.ceil(epochs * pool_size / max(1, rows)))
    return default


def model_kwargs(args) -> dict:
    """zoo.segmentation.build's keyword arguments from the flags (stored in checkpoints for load_trained)."""
    return {"epsilon": args.epsilon, "heatmap_scale": args.heatmap_scale, "init_scale": args.init_scale,
            "classes_per_chunk": args.classes_per_chunk, "checkpoint": args.decoder_checkpoint,
            "background": args.background, "presence": args.presence}


def training_gradient(args, exp: Experiment):
    """The protocol's training gradient for the model (an unroll.reference.ReferenceGradient applies to "unrolled"
    only; the other models train with their own gradient under every protocol), or None: exact."""
    return exp.protocol.gradient if args.model == "unrolled" else None


def gradient_info(model) -> dict:
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
    return {"kind": "reference", **asdict(cfg), "decoder_weights": state}


def check_model_builds(args, num_classes: int, gradient=None) -> None:
    """Build the segmentation model once on an untrained classifier (no weights loaded): an unknown backbone or one
    the compiler refuses fails here, before the classification stage spends any time. The classifier is
    initialised from a private RNG so the global one (the run's seeds) is untouched."""
    import zoo
    from zoo import segmentation as seg_models

    with torch.random.fork_rng(devices=[]):
        clf = zoo.classifier(args.backbone, num_classes, weights=None)
        seg_models.build(args.model, clf, num_classes, **model_kwargs(args), gradient=gradient)


def get_classifier(args, exp: Experiment, device, rank, world, run_kw, console) -> tuple[torch.nn.Module, dict]:
    """The K-output classifier the segmentation model starts from: --classifier, or the cached / freshly trained
    classification-only stage (``unroll.segmentation.classifier.train_classifier``)."""
    import zoo
    from unroll.segmentation.classifier import cached_classifier_state, train_classifier
    from unroll.segmentation.train import TrainConfig

    k = exp.num_classes
    if args.classifier is not None:
        clf = zoo.classifier(args.backbone, k, weights=args.classifier)
        return clf, {"source": "given", "path": str(args.classifier)}
    steps = steps_from(args.pretrain_steps, args.pretrain_epochs, len(exp.image), args.batch_size,
                       args.default_pretrain_steps)
    spec = {"backbone": args.backbone, "weights": args.weights, "steps": steps, "lr": args.pretrain_lr,
            "batch_size": args.batch_size, "image_size": args.image_size, "weight_decay": args.weight_decay,
            "seed": args.seed, "held_out": exp.held_out, "root": exp.source}
    if args.pretrain_perturb != "none":  # (absent otherwise, so classifiers cached before the flag stay valid)
        spec["perturb"] = args.pretrain_perturb
    if exp.name != "voc":  # the pool depends on the split (VOC's is fixed; its cached classifiers stay valid)
        spec["pool"] = sorted(exp.image.ids)
    if exp.protocol is not OURS:  # another input scaling and augmentation: another classifier (absent for ours)
        spec["protocol"] = exp.protocol.name
    folder = Path(args.classifier_dir) if args.classifier_dir else Path(args.out) / "classifier"
    state = cached_classifier_state(folder, spec)
    if state is not None:  # (checked first: the initial weights need not be built, or downloaded)
        clf = zoo.classifier(args.backbone, k)
        clf.load_state_dict(state)
        return clf, {"source": "cached", "path": str(folder / "classifier.pt"), **spec}
    torch.manual_seed(stable_seed(args.seed, "classifier-init"))
    clf = zoo.classifier(args.backbone, k, weights=_weights_arg(args.weights))
    if steps == 0:
        return clf, {"source": "initial weights, no classification stage", **spec}
    console.log(f"classification stage: {steps} steps on {len(exp.image)} image-level images -> {folder}")
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.pretrain_lr, min_lr=args.pretrain_lr,
                      weight_decay=args.weight_decay, eval_every=min(steps, args.eval_every), select="f1",
                      eval_batch_size=args.eval_batch_size, seed=stable_seed(args.seed, "classifier-batches"),
                      num_workers=run_kw["workers"])
    clf = clf.to(device, memory_format=run_kw["memory_format"])
    with Progress(console, "classifier", steps, cfg.batch_size, rank == 0 and not args.no_progress) as bar:
        stage = train_classifier(clf, cfg, exp.image, k, folder=folder, key=spec, val_set=exp.held,
                                 perturbation=args.pretrain_perturb,
                                 noise_seed=stable_seed(args.seed, "classifier-noise"), on_step=bar.step,
                                 on_log=bar.log, **run_kw["train"])
    return clf.cpu(), {"source": "trained here", "path": str(stage.path), **spec}


# --------------------------------------------------------------------------------------------------------- progress


class Progress:
    """A rich progress bar (loss, last held-out mIoU, images/s) on rank 0, and the training images/s measured
    between steps (evaluation time excluded)."""

    def __init__(self, console, name: str, total: int, batch_size: int, show: bool,
                 score_name: str = "held-out mIoU"):
        self.console, self.name, self.total, self.batch = console, name, total, batch_size
        self.show, self.score_name = show, score_name
        self.train_seconds, self.images, self.last = 0.0, 0, None
        self.info = {"loss": None, "miou": None}

    def __enter__(self):
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
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
                f"{self.score_name} {100 * self.info['miou']:.1f}" if self.info["miou"] is not None else "",
                f"{ips:.1f} img/s" if ips else "") if s)
            self.bar.update(self.task, completed=step, info=text)

    def log(self, row: dict) -> None:
        self.info["miou"] = row.get("val_miou")
        self.last = time.perf_counter()  # evaluation and checkpoint time do not count as training
        if not self.show and self.console is not None:
            self.console.log(f"{self.name} step {row['step']}: " + ", ".join(
                f"{k} {v:.3g}" if k == "lr" else f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))


# ---------------------------------------------------------------------------------------------------------- figures


def predictions_figure(path, images, masks, pred, maps, title: str, classes: Sequence[str], palette: np.ndarray,
                       max_classes: int = 3) -> Path:
    """Rows = images (sequences of per-image tensors, sizes may differ); columns: image, ground truth, prediction,
    then the maps of the classes present in the ground truth (up to max_classes; red +, blue -, each with its
    colour scale). A legend names the classes' colours."""
    from bench import figures

    plt = figures.plt
    n = len(images)
    cols = 3 + max_classes
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.7 * n + 0.6), squeeze=False)
    for i in range(n):
        m = masks[i].cpu().numpy()
        p = pred[i].cpu().numpy()
        valid = m != figures.IGNORE
        axes[i, 0].imshow(figures._image(images[i]))
        axes[i, 1].imshow(figures.colorize(m, palette))
        axes[i, 2].imshow(figures.colorize(p, palette))
        present = [c for c in np.unique(m[valid]).tolist() if 0 < c < len(classes)][:max_classes]
        for j in range(max_classes):
            ax = axes[i, 3 + j]
            if j < len(present) and maps is not None:
                h = maps[i][present[j]].float().cpu().numpy()
                lim = float(np.abs(h).max()) or 1.0
                figures.heatmap_colorbar(fig, ax.imshow(h, cmap="bwr", vmin=-lim, vmax=lim), ax)
                ax.set_title(f"map: {classes[present[j]]}", fontsize=7)
        for ax in axes[i]:
            figures._off(ax)
    for j, name in enumerate(("image", "ground truth", "prediction")):
        axes[0, j].set_title(name, fontsize=8)
    figures._legend(fig, figures._present(*masks, *pred, num_classes=len(classes)), palette, classes)
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


# ----------------------------------------------------------------------------------------------------- output folder


def check_out_dir(args) -> str | None:
    """An error message when OUT holds a run's checkpoint and neither --resume nor --overwrite says what to do
    with it (the next run would silently replace it)."""
    ckpt = Path(args.out) / "ckpt.pt"
    if not ckpt.is_file() or args.resume:
        return None
    if args.overwrite:
        return None
    metrics = Path(args.out) / "metrics.json"
    finished = metrics.is_file() and not json.loads(metrics.read_text()).get("partial", False)
    state = "a finished run" if finished else "an unfinished run"
    return (f"{args.out} holds {state} ({ckpt}): add --resume to continue it, --overwrite to start afresh, "
            "or choose another --out")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def evaluate_and_write(model, dataset, num_classes: int, path: Path, summary: Callable[[dict], dict], *,
                       batch_size: int, device, amp_dtype=None, channels_last=False, workers: int = 0,
                       progress: bool = False) -> tuple[dict, BaseException | None]:
    """Evaluate and write ``summary(metrics)`` to ``path``, always: when evaluation fails or is interrupted, the
    scores of the images done so far, ``"partial": true`` and the error. Returns (metrics, error or None)."""
    from unroll.segmentation.train import collate, evaluate

    error = None
    try:
        metrics = evaluate(model, dataset, num_classes, batch_size, collate, device=device, amp_dtype=amp_dtype,
                           channels_last=channels_last, num_workers=workers, progress=progress)
    except BaseException as err:  # noqa: B036 -- Ctrl-C too: write what we have, then re-raise at the caller
        metrics = getattr(err, "partial", None) or {"miou": None, "per_class": None, "f1": None, "images": 0}
        error = err
    out = summary(metrics)
    out["partial"] = error is not None
    out["images_scored"] = metrics.get("images")
    if error is not None:
        out["error"] = f"{type(error).__name__}: {error}"
        out["images_total"] = len(dataset)
    write_json_atomic(path, out)
    return metrics, error


# ------------------------------------------------------------------------------------------------------------- run


def main(args, parser: argparse.ArgumentParser, load: Callable[..., Experiment], check: Callable) -> int:
    """A CLI's whole run: `check(args)` (ValueError -> usage error, before any work), the process group under
    torchrun, the experiment, and the process group torn down again."""
    from rich.console import Console

    try:
        check(args)
    except ValueError as err:
        parser.error(str(err))
    rank, world, device = dist_setup(args.device)
    console = Console(stderr=False, quiet=rank != 0)
    try:
        return run(args, load, console, rank, world, device, parser)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(args, load: Callable[..., Experiment], console, rank: int, world: int, device: torch.device,
        parser: argparse.ArgumentParser | None = None) -> int:
    """The experiment (see the module docstring). ``load(args, rank=, world=, console=)`` returns the Experiment
    or raises DataError (exit 2 with every bad file) / ValueError (usage error)."""
    from zoo import segmentation as seg_models

    import unroll
    from unroll.segmentation.train import TrainConfig, predict, train
    from unroll.segmentation.validate import DataError

    out = Path(args.out)
    message = check_out_dir(args)
    if message is not None:
        console.print(f"[red]error:[/] {escape(message)}", highlight=False)
        return 2
    try:
        exp = load(args, rank=rank, world=world, console=console)
    except DataError as err:
        return report_problems(err, console, skip_hint=not args.skip_bad)
    except (FileNotFoundError, ValueError, KeyError) as err:
        if parser is not None and isinstance(err, ValueError) and not isinstance(err, DataError):
            parser.error(str(err))
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return 2
    k = exp.num_classes
    protocol = exp.protocol
    gradient = training_gradient(args, exp)
    try:
        check_model_builds(args, k, gradient)
    except Exception as err:  # unknown backbone, a model the compiler rejects
        if isinstance(err, (ValueError, unroll.UnsupportedModelError, RuntimeError, KeyError)):
            console.print(f"[red]error:[/] {type(err).__name__}: {escape(str(err))}", highlight=False)
            return 2
        raise
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            for name in ("ckpt.pt", "metrics.json", "history.jsonl"):
                (out / name).unlink(missing_ok=True)
        (out / "labelled.txt").write_text("".join(f"{i}\n" for i in exp.labelled))
    cuda = device.type == "cuda"
    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    channels_last = cuda and not args.no_channels_last
    amp_dtype = torch.bfloat16 if args.amp else None
    run_kw = {"workers": workers, "memory_format": torch.channels_last if channels_last else torch.preserve_format,
              "train": {"device": device, "amp_dtype": amp_dtype, "channels_last": channels_last,
                        "pin_memory": cuda, "distributed": world > 1, "catch_interrupt": True,
                        "eval_workers": min(workers, 2)}}
    console.print(f"[bold]bench.{exp.name}[/]: {args.model} on {args.backbone}, N={len(exp.labelled)} "
                  f"pixel-labelled, {len(exp.image)} image-level, evaluation on {len(exp.test)}; "
                  f"{device}{' x ' + str(world) if world > 1 else ''}{', bf16' if args.amp else ''} -> {out}",
                  highlight=False)
    if protocol.optimistic:
        console.print(f"[yellow]protocol {protocol.name}[/]: the best step is selected on the evaluation set, the "
                      "set it reports -- its mIoU is OPTIMISTIC, not comparable to held-out selection",
                      highlight=False)
    meta = {"format": META_FORMAT, "experiment": exp.name, "model": args.model, "backbone": args.backbone,
            "classes": list(exp.classes), "model_kwargs": model_kwargs(args), "mean": list(exp.mean),
            "std": list(exp.std), "image_size": args.image_size,
            "training_gradient": None if gradient is None else asdict(gradient), **exp.data_meta}
    try:
        clf, clf_info = get_classifier(args, exp, device, rank, world, run_kw, console)
        torch.manual_seed(stable_seed(args.seed, args.labels, args.model, "init"))
        model = seg_models.build(args.model, clf, k, **model_kwargs(args), gradient=gradient)
        model = model.to(device, memory_format=run_kw["memory_format"])
        rows_image = args.batch_size - max(1, round(args.pixel_fraction * args.batch_size))
        steps = steps_from(args.steps, args.epochs, len(exp.image), rows_image, args.default_steps)
        cfg = TrainConfig(steps=steps, batch_size=args.batch_size, pixel_fraction=args.pixel_fraction, lr=args.lr,
                          min_lr=args.lr, weight_decay=args.weight_decay, seg_weight=args.seg_weight,
                          cls_weight=args.cls_weight, calibration_lr_scale=args.calibration_lr,
                          eval_every=min(args.eval_every, steps),
                          eval_batch_size=args.eval_batch_size, select="miou", cls_loss=protocol.cls_loss,
                          seed=stable_seed(args.seed, args.labels, "batches"), num_workers=workers)
        on_eval = None
        evo = None
        if args.model in TIED and not args.no_figures and rank == 0:
            evo = _figure_batch(exp.test, N_EVOLUTION, EVOLUTION_SIZE)
            evo_x = evo["image"].to(device)

            def on_eval(step, m):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    seg = predict(m, evo_x)["seg"].float()
                return F.avg_pool2d(seg, 2).to(torch.float16).cpu()
        # the selection set: held-out training images (or none: the last step), or, under a protocol that selects
        # on the set it reports (optimistic), the evaluation set itself
        selection_set = exp.test if protocol.select_on_val else exp.held
        with Progress(console, f"{args.model} N={len(exp.labelled)}", steps, args.batch_size,
                      rank == 0 and not args.no_progress,
                      "val mIoU (optimistic)" if protocol.select_on_val else "held-out mIoU") as bar:
            result = train(model, cfg, num_classes=k, pixel_set=exp.pixel, image_set=exp.image,
                           val_set=selection_set, out_dir=out, resume=args.resume, stop_after=args.stop_after,
                           on_step=bar.step, on_eval=on_eval, on_log=bar.log, meta=meta, **run_kw["train"])
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
        selection = (f"best held-out mIoU on {len(exp.held_out)} training images outside the labelled ones "
                     f"(step {result.best_step} of {steps})" if exp.held_out else f"last step ({steps}); no selection")
        if protocol.select_on_val:
            selection = protocol.selection_note(len(result.history), result.best_step, steps)
        eval_start = time.perf_counter()

        def summary(metrics: dict) -> dict:
            per_class = {name: v for name, v in zip(exp.classes, metrics["per_class"] or [None] * k)}
            return {
                "format": f"unroll-bench-{exp.name}/1",
                "miou": metrics["miou"],
                "per_class_iou": per_class,
                "f1": metrics["f1"],
                "f1_note": f"macro F1 over the {k - 1} classes after {exp.classes[0]!r} (class 0), logit > 0" + (
                    "" if args.model not in ("unet", "fcn") else
                    "; unet/fcn have no logits: the shared classifier, after segmentation training moved its encoder"),
                "evaluated_on": exp.evaluated_on,
                "reported": selection,
                "protocol": protocol.name,
                "optimistic": protocol.optimistic,
                "training_gradient": gradient_info(model),
                "steps": steps,
                "best_step": result.best_step,
                "held_out_miou": None if not exp.held_out else result.best_score,
                "val_selected_miou": result.best_score if protocol.select_on_val else None,
                "images_per_s": bar.images_per_s,
                "train_seconds": bar.train_seconds,
                "eval_seconds": time.perf_counter() - eval_start,
                "labels": args.labels,
                "labelled_ids": exp.labelled,
                "held_out_ids": exp.held_out,
                "image_level_images": len(exp.image),
                **exp.info,
                "classifier": clf_info,
                "heatmap_scale": (float(model.scale.log_scale.detach().exp()) if getattr(
                    getattr(model, "scale", None), "learn", False) else None),
                "config": {k_: v for k_, v in vars(args).items() if k_ not in ("stop_after", "default_steps",
                                                                               "default_pretrain_steps")},
                "environment": {"device": str(device), "world_size": world, "torch": torch.__version__,
                                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                "amp": "bf16" if args.amp else None, "channels_last": channels_last,
                                "workers": workers},
            }

        metrics, error = evaluate_and_write(model, exp.test, k, out / "metrics.json", summary,
                                            batch_size=args.eval_batch_size, device=device, amp_dtype=amp_dtype,
                                            channels_last=channels_last, workers=min(workers, 2),
                                            progress=not args.no_progress)
        if error is not None:
            console.print(f"[red]evaluation stopped[/] after {metrics.get('images')} of {len(exp.test)} images: "
                          f"{type(error).__name__}: {escape(str(error))}; wrote what it had to "
                          f"{out / 'metrics.json'} (\"partial\": true)", highlight=False)
            return 130 if isinstance(error, KeyboardInterrupt) else 1
        if not args.no_figures:
            try:
                _run_figures(args, exp, model, result, evo, device, amp_dtype, out)
            except Exception as err:  # figures are a bonus; never lose the metrics for them
                console.print(f"[yellow]figures failed[/]: {err!r}")
        note = "" if protocol is OURS else f"; protocol {protocol.name}"
        console.print(f"mIoU {100 * metrics['miou']:.2f}  F1 {100 * (metrics['f1'] or 0):.2f}  "
                      f"({selection}){note}; wrote {out / 'metrics.json'}", highlight=False)
    barrier(world)
    return 0


def _run_figures(args, exp: Experiment, model, result, evo, device, amp_dtype, out: Path) -> None:
    from bench import figures
    from unroll.segmentation.train import predict

    palette = exp.palette if exp.palette is not None else figures.class_palette(exp.num_classes)
    # one image at a time, at its own size: no padding in the picture or in the prediction
    items = [exp.test[i] for i in range(min(N_FIGURE, len(exp.test)))]
    preds = []
    for it in items:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            preds.append(predict(model, it["image"][None].to(device)))
    predictions_figure(out / "predictions.png", [denormalize(it["image"], exp.mean, exp.std) for it in items],
                       [it["mask"] for it in items], [p["pred"][0].cpu() for p in preds],
                       [p["seg"][0].float().cpu() for p in preds],
                       f"{args.model} ({args.backbone}), N={len(exp.labelled)}, {exp.evaluated_on}",
                       exp.classes, palette)
    if evo is not None and result.snapshots:
        snaps = result.snapshots
        if len(snaps) > 8:
            keep = sorted(set(np.linspace(0, len(snaps) - 1, 8).round().astype(int).tolist()))
            snaps = [snaps[i] for i in keep]
        small = F.interpolate(evo["mask"][:, None].float(), scale_factor=0.5, mode="nearest")[:, 0]
        figures.evolution_figure(out / "evolution.png", denormalize(F.avg_pool2d(evo["image"], 2), exp.mean, exp.std),
                                 small.long(), [(s, h.float()) for s, h in snaps], list(exp.classes),
                                 title=f"{args.model} heatmaps during training (evaluation images)")


# ------------------------------------------------------------------------------------------------------ load_trained


def load_trained(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, meta) from a run's ckpt.pt: the selected weights (the best held-out step, else the
    last), rebuilt from what the checkpoint says (model, backbone, classes, normalisation); no flags needed."""
    import zoo
    from zoo import segmentation as seg_models

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    if not meta or meta.get("format") != META_FORMAT:
        raise ValueError(f"{path} carries no run description (meta): it was not written by bench.folder / "
                         "bench.voc train (or by an older version); retrain, or use the training code directly")
    k = len(meta["classes"])
    clf = zoo.classifier(meta["backbone"], k, weights=None)
    gradient = meta.get("training_gradient")
    if gradient is not None:  # (its tied weights are parameters of their own: the state dict holds them)
        from unroll import reference

        gradient = reference.ReferenceGradient(**gradient)
    model = seg_models.build(meta["model"], clf, k, **meta["model_kwargs"], gradient=gradient)
    state = ckpt["state"]
    weights = state.get("best_model") or ckpt["model"]
    model.load_state_dict(weights)
    meta = copy.deepcopy(meta)
    meta["step"] = state.get("best_step") if state.get("best_model") else state.get("step")
    meta["finished"] = state.get("step") == ckpt["config"]["steps"]
    return model.to(device).eval(), meta
