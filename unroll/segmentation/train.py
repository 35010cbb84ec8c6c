"""One training loop and one evaluation for every benchmark model and dataset (digits, VOC).

Plain on purpose (nanoGPT-style): a config dataclass, a step-based loop you can read top to bottom, the learning rate
a pure function of the step, checkpoints that hold everything the next step depends on.

    cfg = TrainConfig(steps=300, batch_size=16, lr=1e-3)
    result = train(model, cfg, pixel_set=labelled, image_set=all_train, val_set=held_out, num_classes=11,
                   out_dir="runs/x")                         # ... interrupted? train(..., resume=True) continues
    metrics = evaluate(model, test_set, num_classes=11)      # {"miou", "per_class", "f1"}

Datasets are map-style and yield dicts ``{"image": (C, H, W) float, "mask": (H, W) long (255 = no label),
"labels": (K,) multi-hot (background = column 0)}`` (extra keys are ignored). The model is a ``zoo.segmentation``
module: ``model(x, samples=rows) -> SegOutput(logits (B, K) or None, seg (len(rows), K, H, W) or None)``.

Batches. Every batch mixes ``round(pixel_fraction * batch_size)`` rows from ``pixel_set`` (pixel labels) with the rest
from ``image_set`` (image-level labels only; their masks are replaced by 255), pixel rows first. The model gets the
whole batch once (one encoder forward, so BatchNorm statistics move once per step) and computes segmentation maps
for the pixel rows only (``samples=``). The order is a pure function of ``(seed, step)``: each pool is walked in a
fresh permutation per epoch, and item-level randomness (augmentation) runs under a torch RNG seeded from
``(seed, step)``. Resuming therefore needs only the step, and gives exactly the batches an uninterrupted run sees.

Loss (the paper's): ``seg_weight * CE + cls_weight * BCE``. CE is the pixel-wise softmax cross-entropy over the K
stacked maps (heatmaps or segmentation logits) of the pixel-labelled rows, 255 ignored, averaged over labelled pixels;
BCE is the sigmoid cross-entropy of the logits against the image-level labels of every row, background column
weighted 0, averaged over rows and object classes. A model without logits (U-Net, FCN) gets the CE term only; one
without maps (the classifier) the BCE term only. ``cls_loss="reference"`` replaces the BCE term by the reference
code's: ``F.multilabel_soft_margin_loss`` with background weight 0 (averaged over all K columns, background
included) times ``batch_size`` -- with batch 10 and K = 21 that is 10 * 20/21 = 9.52 x the BCE term.

Selection. Every ``eval_every`` steps (and at the last step) the model is evaluated on ``val_set``, a held-out part of
the training data (never the test set), and the weights with the best ``cfg.select`` score ("miou" or "f1") are kept;
``train`` returns with those loaded. Checkpoints (``out_dir/ckpt.pt``, written atomically at each evaluation) hold the
model, optimizer, RNG states, step, the best weights so far and the history; ``resume=True`` continues from one and
ends bit-identical to a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "IGNORE",
    "SegOutput",
    "TrainConfig",
    "TrainResult",
    "BatchStream",
    "collate",
    "size_batches",
    "same_size_groups",
    "configure_optimizer",
    "get_lr",
    "compute_loss",
    "loss_terms",
    "backward_and_step",
    "PerLossOptimizer",
    "evaluate",
    "predict",
    "train",
    "rng_state",
    "set_rng_state",
    "stable_seed",
]

IGNORE = 255
BALANCES = ("sum", "normalize", "separate")
CLS_LOSSES = ("bce", "reference")
CKPT_NAME = "ckpt.pt"
_CKPT_FORMAT = "unroll-bench-train/1"


class SegOutput(NamedTuple):
    """What a model returns to the loop: class logits (B, K) (None for seg-only models) and maps (len(samples), K, H,
    W) of the ``samples`` rows (None for the classifier alone)."""

    logits: Tensor | None
    seg: Tensor | None


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    pixel_fraction: float = 0.5  # share of each batch drawn from the pixel-labelled pool (when both pools are given)
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay from lr to min_lr over `steps`
    warmup: int = 0  # linear warmup steps
    weight_decay: float = 1e-4  # on weights of dim >= 2 only (not biases, BatchNorm, scalars)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    seg_weight: float = 1.0
    cls_weight: float = 1.0
    calibration_lr_scale: float = 1.0  # lr factor of calibration scalars (see configure_optimizer)
    background_weight: float = 0.0  # weight of the background column in the BCE (the paper: 0)
    # How the two losses share the weights: "sum" (one gradient of seg_weight * CE + cls_weight * BCE), "normalize"
    # (each loss's gradient scaled to unit global norm before the weighted sum), "separate" (one AdamW state per
    # loss, each stepped with its own gradient). See bench/ablation.py for what each does on digit scenes.
    balance: str = "sum"
    eval_every: int = 50
    eval_batch_size: int = 64
    select: str = "miou"  # "miou" or "f1" on val_set
    cls_loss: str = "bce"  # "bce" (ours) or "reference" (multilabel soft margin x batch_size, see the module doc)
    seed: int = 0
    num_workers: int = 0  # DataLoader workers for the training batches

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError(f"steps, batch_size and eval_every must be >= 1: {self}")
        if not 0.0 <= self.pixel_fraction <= 1.0:
            raise ValueError(f"pixel_fraction must lie in [0, 1], got {self.pixel_fraction}")
        if self.balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {self.balance!r}")
        if self.select not in ("miou", "f1"):
            raise ValueError(f"select must be 'miou' or 'f1', got {self.select!r}")
        if self.cls_loss not in CLS_LOSSES:
            raise ValueError(f"cls_loss must be one of {CLS_LOSSES}, got {self.cls_loss!r}")
        self.betas = tuple(self.betas)


@dataclass
class TrainResult:
    best_step: int
    best_score: float
    steps_done: int
    history: list[dict] = field(default_factory=list)  # one row per evaluation: step, loss parts, val metrics, lr
    snapshots: list[tuple[int, Any]] = field(default_factory=list)  # (step, on_eval output), e.g. heatmaps
    seconds: float = 0.0  # wall time of this call (excludes earlier, interrupted calls)
    interrupted: bool = False  # stopped by stop_after before cfg.steps


# ------------------------------------------------------------------------------------------------------------ batches


def stable_seed(*parts: int | str) -> int:
    """One 32-bit seed from integers and strings, the same in every process (``hash(str)`` is salted per process,
    so strings enter as their UTF-8 bytes); a pure function of ``parts``, e.g. ``stable_seed(seed, "classifier")``."""
    ints: list[int] = []
    for p in parts:
        ints += list(p.encode()) if isinstance(p, str) else [int(p)]
    return int(np.random.SeedSequence(ints).generate_state(1)[0])


def collate(items: Sequence[dict]) -> dict[str, Tensor]:
    """Stack image / mask / labels; items of different sizes are padded bottom-right (image 0, mask 255) and
    ``size`` keeps each item's own (h, w), so evaluation can run every image at its size (see `evaluate`)."""
    h = max(it["image"].shape[-2] for it in items)
    w = max(it["image"].shape[-1] for it in items)

    def pad(t, value):
        return F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=value) if t.shape[-2:] != (h, w) else t

    return {
        "image": torch.stack([pad(it["image"], 0.0) for it in items]),
        "mask": torch.stack([pad(torch.as_tensor(it["mask"]).long(), IGNORE) for it in items]),
        "labels": torch.stack([torch.as_tensor(it["labels"]).float() for it in items]),
        "size": torch.tensor([tuple(it["image"].shape[-2:]) for it in items]),
    }


class BatchStream(Dataset):
    """Training batch number ``step`` (``stream[step]``), a pure function of ``(seed, step)``.

    Rows ``[0, n_pixel)`` come from ``pixel_set`` with their masks; rows ``[n_pixel, batch_size)`` from ``image_set``
    with masks set to 255. ``batch["has_mask"]`` marks the pixel rows. With only one pool given, every row comes
    from it. Indexable by step, so a ``DataLoader(stream, batch_size=None, sampler=range(start, stop))`` loads
    batches in worker processes and still resumes exactly.
    """

    def __init__(self, pixel_set: Dataset | None, image_set: Dataset | None, batch_size: int,
                 pixel_fraction: float = 0.5, seed: int = 0, collate_fn: Callable = collate,
                 shard: tuple[int, int] = (0, 1)):
        pixel_set = pixel_set if pixel_set is not None and len(pixel_set) else None
        image_set = image_set if image_set is not None and len(image_set) else None
        if pixel_set is None and image_set is None:
            raise ValueError("BatchStream needs a non-empty pixel_set or image_set")
        if pixel_set is None:
            n_pixel = 0
        elif image_set is None:
            n_pixel = batch_size
        else:
            n_pixel = min(batch_size - 1, max(1, round(pixel_fraction * batch_size))) if batch_size > 1 else 1
            if pixel_fraction == 0.0:
                n_pixel = 0
            elif pixel_fraction == 1.0:
                n_pixel = batch_size
        self.pixel_set, self.image_set = pixel_set, image_set
        self.batch_size, self.n_pixel, self.n_image = batch_size, n_pixel, batch_size - n_pixel
        self.seed, self.collate_fn = seed, collate_fn
        # (rank, world): this process loads rows rank, rank + world, ... of each pool's part of the global batch
        # (DistributedSampler's strided split, per batch). (0, 1), the default, is the whole batch.
        self.rank, self.world = int(shard[0]), int(shard[1])
        if not 0 <= self.rank < self.world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")

    def __len__(self) -> int:  # a DataLoader wants one; the stream is infinite
        return 2**62

    def indices(self, stream: int, step: int) -> list[int]:
        """Dataset indices of pool ``stream`` (0 pixel, 1 image) in batch ``step``."""
        per_step = (self.n_pixel, self.n_image)[stream]
        if per_step == 0:
            return []
        size = len((self.pixel_set, self.image_set)[stream])
        out, perms = [], {}
        for pos in range(step * per_step, (step + 1) * per_step):
            epoch = pos // size
            if epoch not in perms:
                perms[epoch] = np.random.default_rng(stable_seed(self.seed, stream, epoch)).permutation(size)
            out.append(int(perms[epoch][pos % size]))
        return out

    def __getitem__(self, step: int) -> dict[str, Tensor]:
        r, w = self.rank, self.world
        with torch.random.fork_rng(devices=[]):
            # augmentation randomness, a function of the step (and of the shard when the batch is split)
            torch.manual_seed(stable_seed(self.seed, 2, step) if w == 1 else stable_seed(self.seed, 2, step, r))
            items = [self.pixel_set[i] for i in self.indices(0, step)[r::w]]
            image_items = [self.image_set[i] for i in self.indices(1, step)[r::w]]
        n_pixel = len(items)
        for it in image_items:  # image-level rows never carry pixel labels, whatever the dataset holds
            it = it if isinstance(it, dict) else dict(it)
            items.append({**it, "mask": torch.full(it["image"].shape[-2:], IGNORE, dtype=torch.long)})
        batch = self.collate_fn(items)
        batch["has_mask"] = torch.arange(len(items)) < n_pixel
        batch["step"] = step
        return batch


# ---------------------------------------------------------------------------------------------- optimizer, lr, loss


def configure_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model's unique parameters (a tied weight is one tensor, stepped once): weight decay on
    weights of dim >= 2, none on biases, norms and scalars."""
    unique = {id(p): p for p in model.parameters() if p.requires_grad}  # parameters() dedups too; be explicit
    # Calibration scalars (a heatmap temperature, a background level; marked ``p.calibration = True``) take
    # cfg.calibration_lr_scale times the lr: Adam moves a parameter by about lr per step whatever its gradient, so
    # at lr 3e-3 a log-temperature could change by 0.6 in 200 steps -- it would stay where it was initialised.
    calib = [p for p in unique.values() if getattr(p, "calibration", False)]
    rest = [p for p in unique.values() if not getattr(p, "calibration", False)]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": calib, "weight_decay": 0.0, "lr_scale": cfg.calibration_lr_scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup for cfg.warmup steps, then cosine from cfg.lr to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def loss_terms(out, batch: dict[str, Tensor], cfg: TrainConfig, background: int = 0) -> dict[str, Tensor]:
    """The paper's two loss terms on one batch, unweighted: {"seg": CE, "cls": BCE}, each only where the model gives
    what it needs (maps of pixel rows, logits) and its weight is not 0.

    ``out.seg`` holds the maps of the pixel rows only (in the order of ``batch["has_mask"]``'s True rows)."""
    terms: dict[str, Tensor] = {}
    seg = getattr(out, "seg", None)
    if seg is not None and seg.shape[0] > 0 and cfg.seg_weight != 0:
        target = batch["mask"][batch["has_mask"]]
        if seg.shape[0] != target.shape[0]:
            raise ValueError(f"model returned maps for {seg.shape[0]} rows, the batch has {target.shape[0]} "
                             "pixel-labelled rows")
        ce = F.cross_entropy(seg, target, ignore_index=IGNORE)
        if torch.isnan(ce):  # every pixel ignored: no pixel signal in this batch
            ce = seg.sum() * 0.0
        terms["seg"] = ce
    logits = getattr(out, "logits", None)
    if logits is not None and cfg.cls_weight != 0:
        labels = batch["labels"].to(logits.dtype)
        weight = torch.ones(labels.shape[1], dtype=logits.dtype, device=logits.device)
        weight[background] = cfg.background_weight
        if cfg.cls_loss == "reference":
            # the reference code's multilabel soft margin (mean over the weighted columns) times the batch size
            terms["cls"] = F.multilabel_soft_margin_loss(logits, labels, weight=weight) * cfg.batch_size
        else:
            bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            # averaged over rows and the weighted columns (the object classes, with the paper's background weight 0)
            terms["cls"] = (bce * weight).sum() / (labels.shape[0] * weight.sum())
    if not terms:
        raise ValueError("nothing to train: the model gave neither maps for pixel rows nor logits (or weights are 0)")
    return terms


def compute_loss(out, batch: dict[str, Tensor], cfg: TrainConfig, background: int = 0) -> tuple[Tensor, dict]:
    """The paper's loss on one batch, ``seg_weight * CE + cls_weight * BCE``; returns
    (total, {"seg": float|None, "cls": float|None, "loss": float}) (see `loss_terms`)."""
    terms = loss_terms(out, batch, cfg, background)
    weights = {"seg": cfg.seg_weight, "cls": cfg.cls_weight}
    total = sum(weights[k] * v for k, v in terms.items())
    parts: dict[str, float | None] = {"seg": None, "cls": None}
    parts.update({k: float(v.detach()) for k, v in terms.items()})
    parts["loss"] = float(total.detach())
    return total, parts


class PerLossOptimizer:
    """One AdamW state per loss term over the same (shared) parameters: ``balance="separate"``. Each term's gradient
    is stepped by its own optimizer, so neither term's second-moment estimate normalises the other's step. Looks
    enough like one optimizer for the loop and its checkpoints (param_groups, zero_grad, state_dict)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, names: Sequence[str] = ("seg", "cls")):
        self.optimizers = {n: configure_optimizer(model, cfg) for n in names}

    @property
    def param_groups(self) -> list[dict]:
        # read live: Optimizer.load_state_dict replaces its group dicts, and the loop sets the lr on these
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {n: o.state_dict() for n, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for n, o in self.optimizers.items():
            o.load_state_dict(state[n])


def backward_and_step(model: nn.Module, optimizer, terms: dict[str, Tensor], cfg: TrainConfig) -> None:
    """One parameter update from the loss terms, as ``cfg.balance`` says (zero_grad included)."""
    weights = {"seg": cfg.seg_weight, "cls": cfg.cls_weight}
    optimizer.zero_grad(set_to_none=True)
    params = [p for p in {id(p): p for p in model.parameters() if p.requires_grad}.values()]
    if cfg.balance == "sum" or len(terms) == 1:
        sum(weights[k] * v for k, v in terms.items()).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if isinstance(optimizer, PerLossOptimizer):  # one term only: its own state steps
            optimizer.optimizers[next(iter(terms))].step()
        else:
            optimizer.step()
        return
    names = list(terms)
    grads = {}
    for i, k in enumerate(names):
        g = torch.autograd.grad(terms[k], params, retain_graph=i < len(names) - 1, allow_unused=True)
        grads[k] = list(g)  # None: the term does not reach that parameter (e.g. the temperature and the BCE)
    if cfg.balance == "normalize":
        norms = {k: torch.sqrt(sum((gi.double() ** 2).sum() for gi in g if gi is not None)).clamp_min(1e-12)
                 for k, g in grads.items()}
        for j, p in enumerate(params):
            parts = [(weights[k] / norms[k]).to(p.dtype) * grads[k][j] for k in names if grads[k][j] is not None]
            p.grad = sum(parts) if parts else None
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        return
    for k in names:  # "separate": each term steps its own AdamW state with its own (weighted) gradient
        for j, p in enumerate(params):  # a parameter this term does not reach is not stepped by its state
            p.grad = None if grads[k][j] is None else weights[k] * grads[k][j]
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.optimizers[k].step()


# --------------------------------------------------------------------------------------------------------- devices


def _to_device(batch: dict, device: torch.device | str | None, channels_last: bool = False) -> dict:
    """Tensors of a batch to ``device`` (non-blocking: pinned host memory copies asynchronously); the image in
    channels_last memory format if asked. ``device=None`` and ``channels_last=False`` return the batch unchanged."""
    if device is None and not channels_last:
        return batch
    out = dict(batch)
    for k, v in batch.items():
        if isinstance(v, Tensor) and device is not None:
            out[k] = v.to(device, non_blocking=True)
    if channels_last and out["image"].dim() == 4:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


def _autocast(device: torch.device | str | None, dtype: torch.dtype | None):
    """torch.autocast for ``dtype`` on the device's type; a no-op context when dtype is None."""
    if dtype is None:
        return torch.autocast("cpu", enabled=False)
    kind = torch.device(device).type if device is not None else "cpu"
    return torch.autocast(kind, dtype=dtype)


# --------------------------------------------------------------------------------------------------------- evaluation


def _classifier_logits(model: nn.Module, x: Tensor, out) -> Tensor | None:
    if out.logits is not None:
        return out.logits
    clf = getattr(model, "classifier", None)
    return clf(x) if clf is not None else None


def size_batches(dataset: Dataset, batch_size: int) -> list[list[int]] | None:
    """Evaluation batches of equal-size items, when the dataset can tell its item sizes cheaply (``sizes()``, e.g.
    VOC val read from the JPEG headers): full images then run batched without padding. None: plain batches."""
    sizes = dataset.sizes() if hasattr(dataset, "sizes") else None
    if sizes is None:
        return None
    batches: list[list[int]] = []
    for i in sorted(range(len(sizes)), key=lambda i: (tuple(sizes[i]), i)):
        if batches and len(batches[-1]) < batch_size and tuple(sizes[batches[-1][0]]) == tuple(sizes[i]):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def same_size_groups(batch: dict) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(image, mask, labels) of the rows of a padded batch that share a size, cropped to it. A full-image prediction
    must not depend on which images share its batch: padding would enter the global average pool (the logits) and
    the gates near the border (the maps)."""
    sizes = batch.get("size")
    x = batch["image"]
    if sizes is None or bool((sizes == torch.tensor(x.shape[-2:], device=sizes.device)).all()):
        yield x, batch["mask"], batch["labels"]
        return
    for hw in torch.unique(sizes, dim=0).tolist():
        rows = (sizes == torch.tensor(hw, device=sizes.device)).all(1).nonzero().squeeze(1)
        h, w = hw
        yield x[rows, :, :h, :w], batch["mask"][rows, :h, :w], batch["labels"][rows]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, batch_size: int = 64,
             collate_fn: Callable = collate, background: int = 0, classify: bool = True,
             device: torch.device | str | None = None, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, num_workers: int = 0,
             progress: bool | Callable[[int, int], None] = False) -> dict:
    """mIoU and per-class IoU of argmax(seg) on ``dataset`` (255 ignored), and image-level macro F1 (background
    excluded, logit > 0) of the model's logits -- or, for seg-only models, of ``model.classifier`` (so a U-Net's
    encoder drift shows as a change in the classifier it shares) -- and how many ``images`` were scored. Runs in
    eval mode, restores the mode after.

    device / amp_dtype / channels_last / num_workers: where batches go (the model must be there already), autocast
    dtype (e.g. torch.bfloat16), memory format, loader workers. The defaults keep everything as it was (CPU, fp32).
    progress: True shows a rich progress bar (images done, time left), a callable gets (images done, total) after
    every batch; full-image evaluation on a CPU can take hours, and the default (False) is silent.
    An exception raised part-way (KeyboardInterrupt included) carries ``err.partial``: the same dict over the images
    scored before it, so a caller can still write what it has."""
    from .metrics import SegmentationIoU, image_level_f1  # torchmetrics (an extra): needed here only

    was_training = model.training
    model.eval()
    # sync_on_compute=False: one process evaluates the whole set (under torch.distributed, rank 0 alone); without a
    # process group torchmetrics never syncs anyway, so this changes nothing there.
    iou = SegmentationIoU(num_classes, ignore_index=IGNORE, sync_on_compute=False)
    f1 = image_level_f1(num_classes, background_index=background, sync_on_compute=False)
    if device is not None:
        iou, f1 = iou.to(device), f1.to(device)
    seen = {"seg": False, "cls": False, "images": 0}

    def result() -> dict[str, Any]:
        out: dict[str, Any] = {"miou": None, "per_class": None, "f1": None, "images": seen["images"]}
        if seen["seg"]:
            r = iou.compute()
            out["miou"] = float(r["miou"])
            out["per_class"] = [None if math.isnan(v) else float(v) for v in r["per_class"].tolist()]
        if seen["cls"]:
            out["f1"] = float(f1.compute())
        return out

    try:
        # generator=: a DataLoader otherwise draws its base seed from the global RNG (and resume would drift)
        batches = size_batches(dataset, batch_size)
        loader = DataLoader(dataset, collate_fn=collate_fn, generator=torch.Generator(), num_workers=num_workers,
                            pin_memory=device is not None and torch.device(device).type == "cuda",
                            **({"batch_size": batch_size, "shuffle": False} if batches is None
                               else {"batch_sampler": batches}))
        with _progress_bar(progress, len(dataset)) as advance:
            for batch in loader:
                batch = _to_device(batch, device, channels_last)
                _eval_batch(model, batch, iou, f1, classify, device, amp_dtype, seen)
                seen["images"] += len(batch["image"])
                advance(len(batch["image"]))
    except BaseException as err:  # Ctrl-C, a file that broke after validation, out of memory, ...
        err.partial = result()  # the scores of the images done so far; the caller writes them, marked partial
        raise
    finally:
        model.train(was_training)
    return result()


def _eval_batch(model, batch, iou, f1, classify, device, amp_dtype, seen) -> None:
    for x, mask, labels in same_size_groups(batch):
        with _autocast(device, amp_dtype):
            out = model(x)
            logits = _classifier_logits(model, x, out) if classify else out.logits
        if out.seg is not None:
            iou.update(out.seg.argmax(1), mask)
            seen["seg"] = True
        if logits is not None:
            f1.update(logits.float(), labels)
            seen["cls"] = True


@contextlib.contextmanager
def _progress_bar(progress: bool | Callable[[int, int], None], total: int):
    """Yields advance(n): a rich bar when progress is True, progress(done, total) when it is a callable."""
    done = [0]
    if callable(progress):
        def advance(n):
            done[0] += n
            progress(done[0], total)
        yield advance
    elif progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("evaluate"), BarColumn(), MofNCompleteColumn(), TextColumn("images"),
                      TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task("evaluate", total=total)
            yield lambda n: bar.advance(task, n)
    else:
        yield lambda n: None


@torch.no_grad()
def predict(model: nn.Module, images: Tensor) -> dict[str, Tensor | None]:
    """Eval-mode outputs for a few images (figures): {"logits", "seg" (maps), "pred" (argmax)}."""
    was_training = model.training
    model.eval()
    try:
        out = model(images)
    finally:
        model.train(was_training)
    return {"logits": out.logits, "seg": out.seg, "pred": None if out.seg is None else out.seg.argmax(1)}


# ------------------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------------------------------------------- loop


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    model: nn.Module,
    cfg: TrainConfig,
    *,
    num_classes: int,
    pixel_set: Dataset | None = None,
    image_set: Dataset | None = None,
    val_set: Dataset | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    on_step: Callable[[int, dict], None] | None = None,
    on_eval: Callable[[int, nn.Module], Any] | None = None,
    collate_fn: Callable = collate,
    background: int = 0,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    pin_memory: bool = False,
    distributed: bool = False,
    catch_interrupt: bool = False,
    on_log: Callable[[dict], None] | None = None,
    eval_workers: int = 0,
    meta: dict | None = None,
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` steps (see the module docstring); returns with the selected weights loaded.

    on_step(step, loss_parts) is called after every step (progress bars); on_eval(step, model) at step 0 and at every
    evaluation, its return value kept in ``result.snapshots`` and in checkpoints (e.g. heatmaps of a few fixed images,
    for the "evolution over training" figure). stop_after=n stops after step n, as an interruption would (a
    checkpoint is written first). Without val_set the last step's weights are kept.

    Optional, all off by default (which is the plain CPU fp32 loop): ``device`` moves each batch there (the model
    must be there already); ``amp_dtype`` runs forward and loss under torch.autocast (e.g. torch.bfloat16);
    ``channels_last`` feeds images in that memory format; ``pin_memory`` pins loaded batches. ``distributed=True``
    with an initialised torch.distributed group of world size > 1 wraps the model in DistributedDataParallel and
    gives each rank its strided shard of every global batch (cfg.batch_size is the global batch); rank 0 alone
    evaluates, selects and writes checkpoints, every rank reads the checkpoint on resume. ``catch_interrupt=True``
    turns Ctrl-C (SIGINT, main thread only) into: finish the current step, write a checkpoint, raise
    KeyboardInterrupt -- so ``resume=True`` then continues exactly. ``on_log(row)`` gets every history row (after
    each evaluation). ``eval_workers``: DataLoader workers of the evaluations. ``meta`` (JSON-able) is stored in
    every checkpoint as ``ckpt["meta"]``: what a later reader needs to rebuild the model (its name, classes, ...).
    """
    t0 = time.perf_counter()
    rank, world = 0, 1
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if world > 1 and cfg.batch_size < world:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the world size {world}")
    if world > 1 and cfg.balance != "sum":  # per-loss gradients use autograd.grad, which bypasses DDP's all-reduce
        raise ValueError(f"balance={cfg.balance!r} is single-process only; use balance='sum' with distributed=True")
    is_main = rank == 0
    ckpt_path = Path(out_dir) / CKPT_NAME if out_dir is not None else None
    optimizer = PerLossOptimizer(model, cfg) if cfg.balance == "separate" else configure_optimizer(model, cfg)
    state: dict[str, Any] = {"step": 0, "best_score": -math.inf, "best_step": 0, "best_model": None,
                             "history": [], "snapshots": [], "running": {}}
    if resume and ckpt_path is not None and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ckpt.get("format") != _CKPT_FORMAT:
            raise ValueError(f"{ckpt_path} is not an unroll.segmentation.train checkpoint")
        # a field added to TrainConfig after the checkpoint was written had its default then
        saved = {**_cfg_dict(TrainConfig()), **ckpt["config"]}
        if saved != _cfg_dict(cfg):
            diff = {k: (saved.get(k), v) for k, v in _cfg_dict(cfg).items() if saved.get(k) != v}
            raise ValueError(f"{ckpt_path} was written with another config (saved, now): {diff}; "
                             "delete it or rerun without --resume")
        model.load_state_dict(ckpt["model"])
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:  # parameter groups of another model or code version: never resume half a state
            raise ValueError(f"{ckpt_path}: its optimizer state does not fit this model's parameter groups ({e}); "
                             "it was written by another model or version -- delete it or rerun without --resume"
                             ) from e
        set_rng_state(ckpt["rng"])
        state = ckpt["state"]
    elif on_eval is not None and is_main:
        state["snapshots"].append((0, on_eval(0, model)))

    def checkpoint():
        if ckpt_path is not None and is_main:
            _save_atomic({"format": _CKPT_FORMAT, "config": _cfg_dict(cfg), "meta": meta,
                          "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(),
                          "state": state}, ckpt_path)

    stream = BatchStream(pixel_set, image_set, cfg.batch_size, cfg.pixel_fraction, cfg.seed, collate_fn,
                         shard=(rank, world))
    stop = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    loader = DataLoader(stream, batch_size=None, sampler=range(state["step"], stop), num_workers=cfg.num_workers,
                        generator=torch.Generator(),  # keeps the global RNG untouched, so resume is exact
                        pin_memory=pin_memory, persistent_workers=False)
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        dev = torch.device(device) if device is not None else torch.device("cpu")
        # find_unused_parameters: a rank whose shard has no pixel rows leaves the decoder out of its graph, and
        # seg-only models never use the classifier's last layer.
        forward = DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None,
                                          find_unused_parameters=True)
    stop_flag = {"set": False}
    previous_handler = None
    if catch_interrupt and threading.current_thread() is threading.main_thread():
        def _on_sigint(signum, frame):
            stop_flag["set"] = True
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once
        previous_handler = signal.signal(signal.SIGINT, _on_sigint)
    model.train()
    running: dict[str, list[float]] = state["running"]  # loss parts since the last evaluation
    try:
        _loop(loader, forward, model, optimizer, cfg, state, running, stop, device, amp_dtype, channels_last,
              background, num_classes, val_set, collate_fn, on_step, on_eval, on_log, checkpoint, stop_flag,
              is_main, world, eval_workers)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    interrupted = state["step"] < cfg.steps
    if not interrupted:
        if state["best_model"] is not None:
            model.load_state_dict(state["best_model"])
        else:
            state["best_step"] = state["step"]
    return TrainResult(best_step=state["best_step"], best_score=float(state["best_score"]), steps_done=state["step"],
                       history=list(state["history"]), snapshots=list(state["snapshots"]),
                       seconds=time.perf_counter() - t0, interrupted=interrupted)


def _loop(loader, forward, model, optimizer, cfg, state, running, stop, device, amp_dtype, channels_last, background,
          num_classes, val_set, collate_fn, on_step, on_eval, on_log, checkpoint, stop_flag, is_main, world,
          eval_workers):
    for batch in loader:
        batch = _to_device(batch, device, channels_last)
        step = batch["step"]
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        pixel_rows = batch["has_mask"].nonzero().squeeze(1)
        samples = None if len(pixel_rows) == len(batch["has_mask"]) else pixel_rows
        with _autocast(device, amp_dtype):
            out = forward(batch["image"], samples=samples)
            terms = loss_terms(out, batch, cfg, background)
        parts = {"seg": None, "cls": None, **{k: float(v.detach()) for k, v in terms.items()}}
        parts["loss"] = float(sum({"seg": cfg.seg_weight, "cls": cfg.cls_weight}[k] * v for k, v in parts.items()
                                  if v is not None))
        backward_and_step(model, optimizer, terms, cfg)
        state["step"] = step = step + 1
        for k, v in parts.items():
            if v is not None:
                running.setdefault(k, []).append(v)
        if on_step is not None:
            on_step(step, parts)

        interrupt = False
        if stop_flag["set"] or world > 1:
            flag = torch.tensor([float(stop_flag["set"])], device=device)
            if world > 1:  # every rank stops at the same step, whichever got the signal
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            interrupt = bool(flag.item())

        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = {"step": step, "lr": lr, **{k: float(np.mean(v)) for k, v in running.items()}}
            running.clear()
            if val_set is not None and is_main:
                metrics = evaluate(model, val_set, num_classes, cfg.eval_batch_size, collate_fn, background,
                                   classify=cfg.select == "f1", device=device, amp_dtype=amp_dtype,
                                   channels_last=channels_last, num_workers=eval_workers)
                row.update({f"val_{k}": v for k, v in metrics.items() if k != "per_class"})
                score = metrics[cfg.select]
                if score is None:
                    raise ValueError(f"select={cfg.select!r} but the model gives no {cfg.select} on val_set")
                if score > state["best_score"]:  # strict: ties keep the earlier step
                    state.update(best_score=score, best_step=step, best_model=copy.deepcopy(model.state_dict()))
            state["history"].append(row)
            if on_eval is not None and is_main:
                state["snapshots"].append((step, on_eval(step, model)))
            checkpoint()
            if on_log is not None:
                on_log(dict(row))
        elif step == stop or interrupt:
            checkpoint()
        if interrupt:
            raise KeyboardInterrupt


def _cfg_dict(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["betas"] = list(d["betas"])
    d.pop("num_workers")  # how batches are loaded does not change them
    return d
