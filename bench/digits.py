"""python -m bench.digits -- the paper's experiment, end to end, offline, on handwritten digit scenes, on a CPU.

1. Train a classifier on the image-level labels of all training scenes (SmallVGG by default; --backbone).
2. From that classifier, with --labels N pixel-labelled scenes (default a sweep 10, 50, 250, all), train the models
   (default unrolled, unet, mt-unet, ws-ae, fcn) with the same loss, the same batches (half pixel-labelled, half
   image-level only) and the same selection rule (best validation mIoU on held-out scenes; never the test set).
3. Evaluate on the test scenes: mIoU, per-class IoU, and image-level F1 before and after segmentation training.
4. Print a table like the paper's (mean +- std over --seeds), write OUT/results.json, OUT/results.md and figures.

Every run checkpoints; an interrupted experiment continues with --resume and ends with the same numbers.
Runs go to --jobs worker processes (one thread each); results do not depend on --jobs.

    python -m bench.digits                    # the default experiment: 10 min on 2 idle cores (measured)
    python -m bench.digits --quick            # a smoke test: 1-2 minutes
    python -m bench.digits --source mnist --root ../shared/data/mnist --labels 10,100
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from zoo import segmentation as bench_models
from bench.cli import Help, check_calibration_lr, integer, number
from zoo.segmentation import TIED  # models whose maps are heatmaps of the classifier
from unroll.segmentation.classifier import train_classifier
from unroll.segmentation.train import BALANCES, CLS_LOSSES, TrainConfig, evaluate, predict, stable_seed, train

__all__ = ["main", "build_parser", "plan", "DEFAULT_MODELS"]

DEFAULT_MODELS = ("unrolled", "unet", "mt-unet", "ws-ae", "fcn")
INPUTS = ("raw", "centered", "offset")
N_FIGURE_SCENES = 6
N_EVOLUTION_SCENES = 4

# What --quick changes (anything given explicitly on the command line wins).
QUICK = {"seeds": 1, "labels": "10,all", "clf_steps": 300, "steps": 60, "eval_every": 30, "val_scenes": 64,
         "test_scenes": 128, "train_scenes": 400}
DEFAULTS = {"seeds": 3, "labels": "10,50,250,all", "clf_steps": 600, "steps": 200, "eval_every": 50,
            "val_scenes": 128, "test_scenes": None, "train_scenes": None}


# ----------------------------------------------------------------------------------------------------------- parser


_positive_int = integer(1)
_positive_float = number(0.0, strict=True)
_weight = number(0.0, strict=False)


def _labels(text: str) -> list[int | str]:
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "all":
            value: int | str = "all"
        else:
            try:
                value = int(part)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"--labels takes positive integers and 'all', comma-separated (e.g. 10,50,all); got {part!r}"
                ) from None
            if value < 1:
                raise argparse.ArgumentTypeError(f"--labels counts must be >= 1, got {value}")
        if value not in out:
            out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("--labels is empty")
    return out


def _models(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in bench_models.SEG_MODELS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown model(s) {', '.join(bad) or '(none)'}; choose from {', '.join(bench_models.SEG_MODELS)}")
    return list(dict.fromkeys(names))


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--widths takes comma-separated positive integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"--widths takes comma-separated positive integers, got {text!r}")
    return widths


def _scale(text: str) -> float | str:
    if text == "learn":
        return "learn"
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"--heatmap-scale takes a positive number or 'learn', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.digits",
        description="Unrolled heatmap models vs U-Nets on handwritten digit scenes with few pixel labels "
                    "(the paper's experiment, offline, CPU). Writes OUT/results.json, OUT/results.md, OUT/*.png.",
        formatter_class=Help,
    )
    g = p.add_argument_group("data")
    g.add_argument("--source", choices=("sklearn", "mnist"), default="sklearn",
                   help="digits: scikit-learn's bundled 8x8 digits (offline) or MNIST read from --root")
    g.add_argument("--root", default=None, help="MNIST folder (default: ../shared/data/mnist beside the checkout)")
    g.add_argument("--scene", choices=("scenes", "single"), default="scenes",
                   help="1-3 digits per canvas, or one digit per image")
    g.add_argument("--size", type=_positive_int, default=32, help="image side in pixels")
    g.add_argument("--input", choices=INPUTS, default="raw",
                   help="model input: intensities x in [0, 1] (black background = 0), 'centered' (x - 0.5) / 0.5, "
                        "or 'offset' (255 x + 1) / 256 in [1/256, 1], never 0 (the reference code's)")
    g.add_argument("--train-scenes", type=_positive_int, default=None,
                   help="training scenes (default: one per training digit; --quick: 400)")
    g.add_argument("--val-scenes", type=_positive_int, default=None,
                   help="held-out scenes for model selection, from the training digits' val part (default 128)")
    g.add_argument("--test-scenes", type=_positive_int, default=None,
                   help="test scenes (default: one per test digit, at most 1000; --quick: 128)")
    g = p.add_argument_group("experiment")
    g.add_argument("--labels", type=_labels, default=None,
                   help="pixel-labelled training scenes, comma-separated counts or 'all' (default 10,50,250,all)")
    g.add_argument("--models", type=_models, default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated, from {', '.join(bench_models.SEG_MODELS)}")
    g.add_argument("--seeds", type=_positive_int, default=None, help="repetitions (seeds 0..n-1; default 3)")
    g.add_argument("--backbone", default="small_vgg",
                   help="classifier: small_vgg or a torchvision name (resnet18, vgg11_bn, ...), random init")
    g.add_argument("--widths", type=_widths, default=None,
                   help="small_vgg stage widths, comma-separated (default 16,32,64,128: zoo.SmallVGG's)")
    g.add_argument("--weights", default=None,
                   help="initial classifier weights: a checkpoint path or a torchvision weights name (downloads)")
    g = p.add_argument_group("training")
    g.add_argument("--clf-steps", type=_positive_int, default=None, help="classifier training steps (default 600)")
    g.add_argument("--clf-lr", type=_positive_float, default=3e-3, help="classifier AdamW learning rate")
    g.add_argument("--clf-batch-size", type=_positive_int, default=32, help="classifier batch size")
    g.add_argument("--clf-perturb", choices=("none", "gaussian", "binary"), default="none",
                   help="model-pert: train the classifier on perturbed inputs (gaussian sigma 0.15 of the image's "
                        "range, or binary pixel keep-probability 0.9)")
    g.add_argument("--steps", type=_positive_int, default=None, help="segmentation training steps (default 200)")
    g.add_argument("--batch-size", type=_positive_int, default=12, help="segmentation batch (pixel + image rows)")
    g.add_argument("--pixel-fraction", type=float, default=0.5, help="share of pixel-labelled rows in a batch")
    g.add_argument("--lr", type=_positive_float, default=1e-3,
                   help="AdamW learning rate of the free-decoder models (unet, mt-unet, fcn)")
    g.add_argument("--tied-lr", type=_positive_float, default=3e-3,
                   help="AdamW learning rate of the tied models (unrolled, unrolled-eps, ws-ae)")
    g.add_argument("--weight-decay", type=_weight, default=1e-4, help="AdamW weight decay (weights, not biases/BN)")
    g.add_argument("--seg-weight", type=_weight, default=1.0, help="weight of the pixel-wise cross-entropy")
    g.add_argument("--cls-weight", type=_weight, default=1.0, help="weight of the image-level BCE (background 0)")
    g.add_argument("--heatmap-scale", type=_scale, default="learn",
                   help="factor on the tied models' heatmaps before the cross-entropy: a number (1 = the paper's "
                        "plain heatmaps) or 'learn' (one learnable temperature, initialised at --init-scale)")
    g.add_argument("--init-scale", type=_positive_float, default=10.0, help="initial learnable heatmap scale")
    g.add_argument("--epsilon", type=_positive_float, default=1e-2, help="LRP-epsilon's epsilon (unrolled-eps)")
    g.add_argument("--cls-loss", choices=CLS_LOSSES, default="bce",
                   help="image-level loss of the segmentation stage: 'bce' (ours, mean over classes) or 'reference' "
                        "(the reference code's multilabel soft margin times the batch size); the classifier stage "
                        "always uses BCE")
    g.add_argument("--gradient", choices=("exact", "reference"), default="exact",
                   help="the unrolled model's training gradient: 'exact' (unroll.compile, input x gradient) or "
                        "'reference' (the reference code's, unroll.reference: LRP-epsilon relevance on live "
                        "activations, aliased tied weights, overwriting unpooling)")
    g.add_argument("--background", choices=bench_models.BACKGROUNDS, default="heatmap",
                   help="tied models: the background map is the background class's heatmap, or one learnable "
                        "constant (a threshold the object heatmaps must exceed)")
    g.add_argument("--presence", choices=bench_models.PRESENCES, default="prior-detached",
                   help="tied models: 'prior-detached' (default, chosen by bench.ablation on validation) adds the "
                        "classifier's log sigmoid(logit), as a constant, to each object class's map (a class called "
                        "absent needs a larger heatmap to win a pixel); 'prior' the same with its gradient; 'none' "
                        "the paper's maps")
    g.add_argument("--calibration-lr", type=_positive_float, default=1.0,
                   help="lr factor of the tied models' calibration scalars (learned heatmap temperature, "
                        "constant background level)")
    g.add_argument("--background-weight", type=_weight, default=0.0,
                   help="weight of the background column in the image-level BCE (the paper: 0)")
    g.add_argument("--bn", choices=bench_models.BN_MODES, default="grad",
                   help="tied models' BatchNorm in training: 'grad' (batch variance kept in the gradient graph), "
                        "'const' (held constant), 'frozen' (eval-mode BatchNorm, running statistics)")
    g.add_argument("--balance", choices=BALANCES, default="sum",
                   help="how CE and BCE share the weights: one summed gradient, each gradient normalised to unit "
                        "norm, or a separate AdamW state per loss")
    g.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="segmentation lr schedule: cosine to lr/10, or constant")
    g.add_argument("--warmup", type=integer(0), default=0, help="segmentation lr warmup steps")
    g.add_argument("--eval-every", type=_positive_int, default=None, help="validation interval in steps (default 50)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/digits", help="output folder")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g.add_argument("--jobs", type=_positive_int, default=None,
                   help="parallel worker processes (default: the number of CPU cores)")
    g.add_argument("--threads", type=_positive_int, default=1, help="torch threads per job")
    g.add_argument("--quick", action="store_true",
                   help="smoke test (1-2 minutes): 1 seed, labels 10,all, 400/64/128 train/val/test scenes, "
                        "300 classifier + 60 segmentation steps; its numbers mean little (flags you give win)")
    g.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep each run's ckpt.pt after it finishes")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that --quick changes, and check what argparse cannot check alone."""
    base = QUICK if args.quick else DEFAULTS
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            value = base.get(key, default)
            setattr(args, key, _labels(value) if key == "labels" else value)
    if not 0.0 < args.pixel_fraction < 1.0:
        raise ValueError(f"--pixel-fraction must lie strictly between 0 and 1, got {args.pixel_fraction}")
    if args.scene == "scenes" and args.size < 8:
        raise ValueError(f"--size {args.size} is too small for digit scenes (at least 8)")
    if args.widths is not None and args.backbone != "small_vgg":
        raise ValueError("--widths applies to --backbone small_vgg only")
    if args.gradient != "exact" and "unrolled" not in args.models:
        raise ValueError("--gradient applies to the 'unrolled' model; --models has none")
    if args.gradient == "reference" and args.bn == "const":
        raise ValueError("--bn const does not apply to --gradient reference (its BatchNorm ratios are detached "
                         "anyway); use --bn grad or frozen")
    check_calibration_lr(args.calibration_lr, args.heatmap_scale, args.background)
    if args.seg_weight == 0 and args.cls_weight == 0:
        raise ValueError("--seg-weight and --cls-weight cannot both be 0")
    return args


# ------------------------------------------------------------------------------------------------------------- data


class ModelInput(Dataset):
    """Digit-scene items as the models take them: the image in [0, 1] ("raw"), (x - 0.5) / 0.5 ("centered"), or
    (255 x + 1) / 256 ("offset": a black pixel is 1/256, so no heatmap x * gradient is forced to 0 there)."""

    def __init__(self, scenes: Dataset, mode: str = "raw"):
        self.scenes, self.mode = scenes, mode

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.scenes[i])
        if self.mode == "centered":
            item["image"] = (item["image"] - 0.5) / 0.5
        elif self.mode == "offset":
            item["image"] = (item["image"] * 255 + 1) / 256
        return item


def in_channels(backbone: str) -> int:
    return 1 if backbone in ("small_vgg", "plain_convnet") else 3


@cache
def _scenes(source: str, root: str | None, scene: str, size: int, split: str, n: int | None, channels: int):
    from bench.data.digits import load_source, make_digit_scenes

    if n is None and split == "test":
        n = min(len(load_source(source, root).indices("test")), 1000)
    return make_digit_scenes(source, split, n_scenes=n, size=size, seed=0, root=root, scene=scene, channels=channels)


def datasets(d: dict) -> dict[str, Any]:
    """train / val / test scenes (cached per process) for a task's data settings."""
    ch = in_channels(d["backbone"])
    out = {split: _scenes(d["source"], d["root"], d["scene"], d["size"], split, d[f"{split}_scenes"], ch)
           for split in ("train", "val", "test")}
    return {**out, **{f"{k}_input": ModelInput(v, d["input"]) for k, v in out.items()}}


def labelled_indices(n_train: int, n: int | str, seed: int) -> list[int]:
    """The pixel-labelled training scenes for (seed, N): the first N of a seed's permutation, so the sets are nested
    (10 inside 50 inside 250) and every model of a seed sees the same ones."""
    order = np.random.default_rng([seed, 12345]).permutation(n_train)
    count = n_train if n == "all" else int(n)
    return sorted(order[:count].tolist())


# ------------------------------------------------------------------------------------------------------------ tasks


def plan(args: argparse.Namespace, n_train: int) -> list[dict]:
    """Every run of the experiment as a plain dict (what a worker needs, and what a result is checked against)."""
    data = {k: getattr(args, k) for k in ("source", "root", "scene", "size", "input", "backbone", "widths",
                                          "train_scenes", "val_scenes", "test_scenes")}
    out = Path(args.out)
    tasks = []
    counts = [n_train if n == "all" else n for n in args.labels]
    for seed in range(args.seeds):
        clf_dir = out / "runs" / f"seed{seed}" / "classifier"
        tasks.append({
            "kind": "classifier", "id": f"seed {seed} · classifier", "seed": seed, "data": data, "dir": str(clf_dir),
            "weights": args.weights, "threads": args.threads, "keep": args.keep_checkpoints,
            "perturb": args.clf_perturb, "tied_eval": any(m in TIED for m in args.models),
            "train": asdict(TrainConfig(steps=args.clf_steps, batch_size=args.clf_batch_size, lr=args.clf_lr,
                                        min_lr=args.clf_lr / 10, weight_decay=args.weight_decay,
                                        eval_every=args.eval_every * 2, select="f1",
                                        seed=stable_seed(seed, "classifier"))),
        })
        for n, count in zip(args.labels, counts):
            for model in args.models:
                lr = args.tied_lr if model in TIED else args.lr
                tasks.append({
                    "kind": "seg", "id": f"seed {seed} · N={count} · {model}", "seed": seed, "labels": count,
                    "label_arg": n, "model": model, "data": data, "classifier_dir": str(clf_dir),
                    "dir": str(out / "runs" / f"seed{seed}" / f"N{count}" / model), "threads": args.threads,
                    "figures": not args.no_figures and seed == 0, "keep": args.keep_checkpoints,
                    "heatmap_scale": args.heatmap_scale, "init_scale": args.init_scale, "epsilon": args.epsilon,
                    **({"background": args.background, "bn": args.bn} if model in TIED else {}),
                    # keys only when not the old behaviour (exact gradient, no prior): a run cached before the
                    # flags existed stays the same run
                    **({"gradient": args.gradient} if model == "unrolled" and args.gradient != "exact" else {}),
                    **({"presence": args.presence} if model in TIED and args.presence != "none" else {}),
                    "train": asdict(TrainConfig(steps=args.steps, batch_size=args.batch_size,
                                                pixel_fraction=args.pixel_fraction, lr=lr,
                                                min_lr=lr if args.schedule == "constant" else lr / 10,
                                                warmup=args.warmup, weight_decay=args.weight_decay,
                                                seg_weight=args.seg_weight, cls_weight=args.cls_weight,
                                                background_weight=args.background_weight,
                                                calibration_lr_scale=args.calibration_lr,
                                                cls_loss=args.cls_loss,
                                                balance=args.balance if model in TIED or model == "mt-unet"
                                                else "sum",
                                                eval_every=args.eval_every,
                                                select="miou", seed=stable_seed(seed, count, "batches"))),
                })
    return tasks


def _make_classifier(task: dict) -> torch.nn.Module:
    import zoo
    from bench.data.digits import NUM_CLASSES

    backbone = task["data"]["backbone"]
    kwargs = {"in_channels": in_channels(backbone)}
    if task["data"].get("widths"):
        kwargs["widths"] = tuple(task["data"]["widths"])
    return zoo.classifier(backbone, NUM_CLASSES, weights=task.get("weights"), **kwargs)


_REPORT = None  # worker side: a queue for progress messages (None: progress goes to a callback in this process)


def _init_worker(queue, threads: int):
    global _REPORT
    _REPORT = queue
    torch.set_num_threads(threads)


def _identity(task: dict) -> dict:
    """What a run's result depends on: the task without its folders and display names (a copied output folder, or a
    renamed bench.ablation row, stays valid)."""
    out = {k: v for k, v in json.loads(json.dumps(task)).items() if k not in ("dir", "classifier_dir", "id", "row")}
    if "train" in out:  # a TrainConfig field at its default is the same run as one from before the field existed
        defaults = json.loads(json.dumps(asdict(TrainConfig())))
        out["train"] = {k: v for k, v in out["train"].items() if k not in defaults or defaults[k] != v}
    return out


def _same_task(path: Path, task: dict) -> dict | None:
    if path.is_file():
        result = json.loads(path.read_text())
        if _identity(result.get("task", {})) == _identity(task):
            result["task"] = task
            return result
    return None


def finished_run(task: dict) -> dict | None:
    """The recorded result of ``task`` if a run with exactly its settings finished in its folder, else None."""
    return _same_task(Path(task["dir"]) / "result.json", task)


def run_task(task: dict, resume: bool = False, report=None) -> dict:
    """Run one task (in a worker or in this process) and return its result dict (also written to dir/result.json).

    report(task_id, step, total, parts) is called during training; in a worker the messages go to the queue."""
    from bench.data.digits import NUM_CLASSES

    if report is None and _REPORT is not None:
        queue = _REPORT

        def report(tid, step, total, parts):
            queue.put((tid, step, total, parts))
    report = report or (lambda *a: None)
    torch.set_num_threads(task["threads"])
    run_dir = Path(task["dir"])
    done = run_dir / "result.json"
    spec = run_dir / "task.json"
    if resume:
        previous = _same_task(done, task)
        if previous is not None:
            report(task["id"], task["train"]["steps"], task["train"]["steps"], {"cached": True})
            return {**previous, "reused": True}
    if not resume or not spec.is_file() or _identity(json.loads(spec.read_text())) != _identity(task):
        shutil.rmtree(run_dir, ignore_errors=True)  # fresh start, or a checkpoint from other settings: start over
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(task, indent=1))
    t0, c0 = time.perf_counter(), time.process_time()
    data = datasets(task["data"])
    cfg = TrainConfig(**task["train"])
    steps = cfg.steps

    step_loss: list[float] = []  # every step's training loss (a loss curve at step resolution)

    def on_step(step, parts):
        step_loss.append(round(parts["loss"], 5))
        report(task["id"], step, steps, parts)

    result: dict[str, Any] = {"task": task}
    if task["kind"] == "classifier":
        torch.manual_seed(stable_seed(task["seed"], "init"))
        clf = _make_classifier(task)
        if task["tied_eval"]:  # the heatmaps of the untrained (initial) classifier: the floor
            result["test_heatmaps_initial"] = evaluate(bench_models.build("unrolled", clf, NUM_CLASSES),
                                                       data["test_input"], NUM_CLASSES)
        # run_dir/classifier.pt is what the segmentation tasks of this seed load
        r = train_classifier(clf, cfg, data["train_input"], NUM_CLASSES, folder=run_dir, key=_identity(task),
                             val_set=data["val_input"], perturbation=task.get("perturb", "none"),
                             noise_seed=stable_seed(task["seed"], "classifier-noise"), resume=resume,
                             keep_checkpoint=task["keep"], on_step=on_step).result
        result["test"] = evaluate(bench_models.build("classifier", clf, NUM_CLASSES), data["test_input"], NUM_CLASSES)
        if task["tied_eval"]:  # the classifier's own heatmaps, before any segmentation training
            untrained = bench_models.build("unrolled", clf, NUM_CLASSES)
            result["test_heatmaps_untrained"] = evaluate(untrained, data["test_input"], NUM_CLASSES)
    else:
        clf = _make_classifier({**task, "weights": None})
        clf.load_state_dict(torch.load(Path(task["classifier_dir"]) / "classifier.pt", weights_only=True))
        torch.manual_seed(stable_seed(task["seed"], task["labels"], task["model"]))
        tied = {k: task[k] for k in ("background", "bn", "presence") if k in task}
        if task.get("gradient") == "reference":
            from unroll import reference

            tied["gradient"] = reference.ReferenceGradient()
        model = bench_models.build(task["model"], clf, NUM_CLASSES, epsilon=task["epsilon"],
                                   heatmap_scale=task["heatmap_scale"], init_scale=task["init_scale"], **tied)
        pixel_set = Subset(data["train_input"], labelled_indices(len(data["train"]), task["labels"], task["seed"]))
        on_eval = None
        if task["figures"] and task["model"] in TIED:
            evo = torch.stack([data["val_input"][i]["image"] for i in range(N_EVOLUTION_SCENES)])

            def on_eval(step, m):
                return predict(m, evo)["seg"].to(torch.float16)
        r = train(model, cfg, num_classes=NUM_CLASSES, pixel_set=pixel_set, image_set=data["train_input"],
                  val_set=data["val_input"], out_dir=run_dir, resume=resume, on_step=on_step, on_eval=on_eval)
        result["test"] = evaluate(model, data["test_input"], NUM_CLASSES)
        if hasattr(model, "scale") and model.scale.learn:
            result["heatmap_scale"] = float(model.scale.log_scale.detach().exp())
        if task["figures"]:
            figs = torch.stack([data["test_input"][i]["image"] for i in range(N_FIGURE_SCENES)])
            out = predict(model, figs)
            fig = {"pred": out["pred"].to(torch.uint8)}
            if task["model"] in TIED:
                fig["heatmaps"] = out["seg"].to(torch.float16)
                fig["snapshots"] = r.snapshots
            torch.save(fig, run_dir / "figdata.pt")
    result.update({
        "best_step": r.best_step, "best_val": r.best_score, "history": r.history,
        "step_loss": step_loss if not resume or len(step_loss) == r.steps_done else None,
        "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
    })
    done.write_text(json.dumps(result, indent=1))
    if not task["keep"]:
        (run_dir / "ckpt.pt").unlink(missing_ok=True)
    return result


# ----------------------------------------------------------------------------------------------------------- runner


# Relative cost of one training step, for a progress bar whose ETA means something (measured on 2 CPU cores).
STEP_COST = {"classifier": 1.0, "unrolled": 1.8, "unrolled-eps": 2.0, "ws-ae": 1.8, "unet": 0.6, "mt-unet": 0.6,
             "fcn": 0.55}
EVAL_COST = 15.0  # one validation pass, in the same units (rough)


def _step_cost(task: dict) -> float:
    return STEP_COST["classifier" if task["kind"] == "classifier" else task["model"]]


def _eval_cost(task: dict) -> float:
    return math.ceil(task["train"]["steps"] / task["train"]["eval_every"]) * EVAL_COST


def _cost(task: dict) -> float:
    return task["train"]["steps"] * _step_cost(task) + _eval_cost(task)


def execute(tasks: list[dict], jobs: int, resume: bool, console) -> list[dict]:
    """Run the tasks (classifiers first; a seed's segmentation runs once its classifier is trained) with rich
    progress: one overall bar with ETA, one bar per active run."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    results: dict[str, dict] = {}
    costs = {t["id"]: _cost(t) for t in tasks}
    with Progress(*columns, console=console, speed_estimate_period=300, transient=False) as progress:
        overall = progress.add_task("[bold]all runs", total=round(sum(costs.values())), info=f"0/{len(tasks)} runs")
        bars: dict[str, Any] = {}
        last: dict[str, int] = {}
        by_id = {t["id"]: t for t in tasks}

        def report(tid, step, total, parts):
            if tid not in bars:
                bars[tid] = progress.add_task(tid, total=total, info="")
                last[tid] = 0
            loss = parts.get("loss")
            progress.update(bars[tid], completed=step, info="" if loss is None else f"loss {loss:.3f}")
            progress.advance(overall, (step - last[tid]) * _step_cost(by_id[tid]))
            last[tid] = step

        def finished(task, result):
            results[task["id"]] = result
            if task["id"] in bars:
                progress.remove_task(bars.pop(task["id"]))
            remaining = (task["train"]["steps"] - last.get(task["id"], 0)) * _step_cost(task)
            progress.advance(overall, _eval_cost(task) + remaining)
            progress.update(overall, info=f"{len(results)}/{len(tasks)} runs")
            test = result["test"]
            scores = ", ".join(f"{k} {100 * test[k]:.1f}" for k in ("miou", "f1") if test.get(k) is not None)
            progress.console.print(f"[{len(results)}/{len(tasks)}] {task['id']}: test {scores} "
                                   f"(best step {result['best_step']}, {result['seconds']:.0f} s)", highlight=False)

        classifiers = [t for t in tasks if t["kind"] == "classifier"]
        # a segmentation run waits for the classifier it starts from
        dependents = {t["id"]: [s for s in tasks if s["kind"] == "seg" and s["classifier_dir"] == t["dir"]]
                      for t in classifiers}
        if jobs == 1:
            for clf in classifiers:
                for task in [clf, *dependents[clf["id"]]]:
                    finished(task, run_task(task, resume, report))
        else:
            ctx = mp.get_context("spawn")  # fork + torch threads can deadlock; spawn is safe everywhere
            queue = ctx.Queue()
            with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                        initargs=(queue, tasks[0]["threads"])) as pool:
                futures = {pool.submit(run_task, t, resume): t for t in classifiers}
                try:
                    while futures:
                        done, _ = cf.wait(futures, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                        _drain(queue, report)
                        for fut in done:
                            task = futures.pop(fut)
                            finished(task, fut.result())
                            for dep in dependents.get(task["id"], []):
                                futures[pool.submit(run_task, dep, resume)] = dep
                    _drain(queue, report)
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    return [results[t["id"]] for t in tasks]


def _drain(queue, report):
    while True:
        try:
            msg = queue.get_nowait()
        except Exception:  # queue.Empty
            return
        report(*msg)


# ---------------------------------------------------------------------------------------------------------- results


def _stats(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return {"mean": None, "std": None, "values": []}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def summarize(args: argparse.Namespace, results: list[dict], n_train: int, wall: float, argv: list[str]) -> dict:
    from bench.data.digits import class_names

    clf = [r for r in results if r["task"]["kind"] == "classifier"]
    seg = [r for r in results if r["task"]["kind"] == "seg"]
    counts = [n_train if n == "all" else n for n in args.labels]
    f1_before = {r["task"]["seed"]: r["test"]["f1"] for r in clf}
    summary: dict[str, dict] = {}
    for model in args.models:
        summary[model] = {}
        for n in counts:
            runs = [r for r in seg if r["task"]["model"] == model and r["task"]["labels"] == n]
            per_class = np.array([[np.nan if v is None else v for v in r["test"]["per_class"]] for r in runs])
            summary[model][str(n)] = {
                "miou": _stats([r["test"]["miou"] for r in runs]),
                "f1_after": _stats([r["test"]["f1"] for r in runs]),
                "f1_before": _stats([f1_before[r["task"]["seed"]] for r in runs]),
                "per_class_iou": [None if np.isnan(c).all() else float(np.nanmean(c)) for c in per_class.T],
                "best_step": _stats([r["best_step"] for r in runs]),
                "seconds": _stats([r["seconds"] for r in runs]),
            }
    untrained = [r["test_heatmaps_untrained"]["miou"] for r in clf if "test_heatmaps_untrained" in r]
    initial = [r["test_heatmaps_initial"]["miou"] for r in clf if "test_heatmaps_initial" in r]
    return {
        "format": "unroll-bench-digits/1",
        "argv": list(argv),
        "config": {k: v for k, v in vars(args).items()},
        "classes": class_names,
        "train_scenes": n_train,
        "label_counts": counts,
        "models": list(args.models),
        "classifier": {
            "test_f1": _stats([r["test"]["f1"] for r in clf]),
            "test_miou_of_untrained_heatmaps": _stats(untrained),  # trained classifier, no segmentation training
            "test_miou_of_initial_heatmaps": _stats(initial),  # the classifier at initialisation, nothing trained
            "seconds": _stats([r["seconds"] for r in clf]),
        },
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "reused"} for r in results],
        "timing": {"wall_seconds": wall,  # this invocation (with --resume: without the runs it reused)
                   "cpu_seconds": sum(r["cpu_seconds"] for r in results),  # all runs, reused ones included
                   "run_seconds": sum(r["seconds"] for r in results),  # each run's own wall time, summed
                   "reused_runs": sum(bool(r.get("reused")) for r in results),
                   "jobs": args.jobs, "threads_per_job": args.threads},
        "environment": {"torch": torch.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count()},
    }


def _pm(stats: dict, scale: float = 100.0) -> str:
    if stats["mean"] is None:
        return "-"
    return f"{stats['mean'] * scale:.1f} ± {stats['std'] * scale:.1f}"


def tables(res: dict) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Header and rows of the mIoU table and of the F1 table (strings, for rich and markdown alike)."""
    counts = res["label_counts"]
    header = ["model"] + [f"N={n}" for n in counts]
    miou_rows, f1_rows = [], []
    untrained = res["classifier"]["test_miou_of_untrained_heatmaps"]
    for model in res["models"]:
        s = res["summary"][model]
        miou_rows.append([model] + [_pm(s[str(n)]["miou"]) for n in counts])
        f1_rows.append([model] + [_pm(s[str(n)]["f1_after"]) for n in counts])
    if untrained["mean"] is not None:
        miou_rows.append(["(classifier heatmaps, no seg. training)"] + [_pm(untrained)] * len(counts))
    f1_rows.append(["(classifier before seg. training)"] + [_pm(res["classifier"]["test_f1"])] * len(counts))
    return header, miou_rows, f1_rows


def _bold_best(rows: list[list[str]], n_models: int) -> list[list[str]]:
    out = [list(r) for r in rows]
    for j in range(1, len(rows[0])):
        vals = [float(r[j].split(" ")[0]) if r[j] != "-" else -1 for r in rows[:n_models]]
        best = int(np.argmax(vals))
        out[best][j] = f"**{out[best][j]}**"
    return out


def markdown(res: dict) -> str:
    header, miou_rows, f1_rows = tables(res)
    n_models = len(res["models"])
    seeds = res["config"]["seeds"]

    def table(h, rows):
        lines = ["| " + " | ".join(h) + " |", "|" + "---|" * len(h)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)

    cfg = res["config"]
    per_class_n = res["label_counts"][0]
    pc_header = ["model"] + res["classes"]
    pc_rows = []
    for model in res["models"]:
        pc = res["summary"][model][str(per_class_n)]["per_class_iou"]
        pc_rows.append([model] + ["-" if v is None else f"{100 * v:.0f}" for v in pc])
    t = res["timing"]
    reused = (f"; {t['reused_runs']} of {len(res['runs'])} runs reused from an interrupted invocation (--resume)"
              if t["reused_runs"] else "")
    return "\n\n".join([
        "# bench.digits results",
        f"Source `{cfg['source']}`, {cfg['scene']} {cfg['size']}x{cfg['size']}, input `{cfg['input']}`, backbone "
        f"`{cfg['backbone']}`, {res['train_scenes']} training scenes (image-level labels for all), N of them with "
        f"pixel labels; {seeds} seed(s); mean ± std over seeds. Selection: best validation mIoU on held-out scenes.",
        "## Test mIoU (%), background included",
        table(header, _bold_best(miou_rows, n_models)),
        "## Test image-level F1 (%) after segmentation training (macro, object classes)",
        "U-Net / FCN have no classification head of their own: their row is the classifier they share the encoder "
        "with, evaluated after their training moved that encoder.",
        table(header, f1_rows),
        f"## Per-class test IoU (%) at N={per_class_n}",
        table(pc_header, pc_rows),
        f"Wall time {t['wall_seconds'] / 60:.1f} min ({t['jobs']} jobs x {t['threads_per_job']} thread){reused}; "
        f"CPU time of all runs {t['cpu_seconds'] / 60:.1f} min; torch {res['environment']['torch']}, "
        f"{res['environment']['cpus']} CPUs.",
    ]) + "\n"


def print_tables(res: dict, console) -> None:
    from rich.table import Table

    header, miou_rows, f1_rows = tables(res)
    n_models = len(res["models"])
    for title, rows, bold in (
        (f"Test mIoU % (mean ± std over {res['config']['seeds']} seed(s)) vs pixel-labelled scenes N", miou_rows,
         True),
        ("Test image-level F1 % after segmentation training", f1_rows, False),
    ):
        table = Table(title=title, title_justify="left")
        for j, h in enumerate(header):
            table.add_column(h, justify="left" if j == 0 else "right")
        rows = _bold_best(rows, n_models) if bold else rows
        for i, r in enumerate(rows):
            cells = [c.replace("**", "") for c in r]
            if bold:
                cells = [f"[bold green]{c}[/]" if "**" in r[j] else c for j, c in enumerate(cells)]
            table.add_row(*cells, style="dim" if i >= n_models else None)
        console.print(table)


def make_figures(args: argparse.Namespace, res: dict, out: Path) -> list[Path]:
    from bench import figures
    from bench.data.digits import class_names

    data = datasets(res["runs"][0]["task"]["data"])
    paths = []
    test, val = data["test"], data["val"]
    imgs = torch.stack([test[i]["image"][:1] for i in range(N_FIGURE_SCENES)])
    masks = torch.stack([test[i]["mask"] for i in range(N_FIGURE_SCENES)])
    evo_imgs = torch.stack([val[i]["image"][:1] for i in range(N_EVOLUTION_SCENES)])
    evo_masks = torch.stack([val[i]["mask"] for i in range(N_EVOLUTION_SCENES)])
    for n in res["label_counts"]:
        preds, heat, histories = {}, None, {}
        for model in res["models"]:
            run_dir = out / "runs" / "seed0" / f"N{n}" / model
            if (run_dir / "figdata.pt").is_file():
                fig = torch.load(run_dir / "figdata.pt", weights_only=True)
                preds[model] = fig["pred"]
                if "heatmaps" in fig and heat is None:
                    heat = (model, fig["heatmaps"].float(), fig["snapshots"])
            r = next((r for r in res["runs"] if r["task"]["kind"] == "seg" and r["task"]["seed"] == 0
                      and r["task"]["labels"] == n and r["task"]["model"] == model), None)
            if r is not None:
                histories[model] = r["history"]
        if preds:
            paths.append(figures.scenes_figure(out / f"predictions_N{n}.png", imgs, masks, preds, class_names,
                                               title=f"test scenes, seed 0, N={n} pixel-labelled scenes"))
        if heat is not None:
            model, h, snaps = heat
            # what the softmax sees: the scaled heatmaps, plus the classifier's log sigmoid(logit) under the prior
            what = "maps (scaled heatmap + presence prior)" if res["config"].get("presence", "none") != "none" \
                else "heatmaps"
            paths.append(figures.heatmaps_figure(out / f"heatmaps_N{n}.png", imgs, h, class_names, masks,
                                                 title=f"{model} {what} per class (test scenes, seed 0, N={n})"))
            snaps = [(s, x.float()) for s, x in snaps]
            paths.append(figures.evolution_figure(out / f"evolution_N{n}.png", evo_imgs, evo_masks, snaps, class_names,
                                                  title=f"{model} {what} during training (validation scenes, N={n})"))
        if histories:
            paths.append(figures.curves_figure(out / f"curves_N{n}.png", histories,
                                               title=f"seed 0, N={n}: validation mIoU and training loss"))
    sweep = {m: {n: (100 * s["miou"]["mean"], 100 * s["miou"]["std"]) for n, s in
                 ((int(k), v) for k, v in res["summary"][m].items()) if s["miou"]["mean"] is not None}
             for m in res["models"]}
    paths.append(figures.sweep_figure(out / "sweep.png", sweep, title="test mIoU vs pixel-labelled scenes"))
    return paths


# ------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    try:
        args = resolve(args)
    except ValueError as err:
        parser.error(str(err))
    args.jobs = args.jobs or os.cpu_count() or 1

    from bench.data.digits import load_source

    try:
        source = load_source(args.source, args.root)
        source.indices("train"), source.indices("val"), source.indices("test")
    except FileNotFoundError as err:
        where = args.root or "../shared/data/mnist (the default)"
        console.print(f"[red]error:[/] {args.source} digits not found under {where}: {err}\n"
                      "Pass --root DIR with the MNIST files (torchvision layout, idx files or *.npz), "
                      "or use the offline default --source sklearn.", highlight=False)
        return 2
    args.root = None if args.root is None else str(Path(args.root).expanduser().resolve())
    data = {k: getattr(args, k) for k in ("source", "root", "scene", "size", "input", "backbone", "widths",
                                          "train_scenes", "val_scenes", "test_scenes")}
    try:
        n_train = len(datasets(data)["train"])
        if args.backbone not in ("small_vgg",):
            _make_classifier({"data": data, "weights": args.weights})  # fail early on a bad name / weights
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]error:[/] {err}", highlight=False)
        return 2
    too_many = [n for n in args.labels if n != "all" and n > n_train]
    if too_many:
        parser.error(f"--labels {too_many} exceed the {n_train} training scenes (use 'all' or --train-scenes)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = plan(args, n_train)
    console.print(f"[bold]bench.digits[/]: {len(tasks)} runs ({args.seeds} seed(s) x (classifier + "
                  f"{len(args.labels)} label counts x {len(args.models)} models)), {n_train} training scenes, "
                  f"{args.jobs} job(s) -> {out}", highlight=False)
    t0 = time.perf_counter()
    try:
        results = execute(tasks, args.jobs, args.resume, console)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: rerun the same command with --resume to continue from {out}")
        return 130
    res = summarize(args, results, n_train, time.perf_counter() - t0, sys.argv[1:] if argv is None else argv)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    print_tables(res, console)
    if not args.no_figures:
        try:
            paths = make_figures(args, res, out)
            console.print(f"figures: {', '.join(p.name for p in paths)}")
        except Exception:  # figures are a bonus; never lose the results for them
            console.print(f"[yellow]figures failed[/]:\n{traceback.format_exc()}")
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'} in {res['timing']['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
