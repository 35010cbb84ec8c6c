"""Experiment protocols of bench.voc: ours (the default, honest) and the reference code's (to reproduce its numbers).

A Protocol is a value consulted in a few places of the run: which data recipe (transforms, input scaling, void
label), the default step count and evaluation interval, the classification loss, the weight decay, whether the best
step is selected on the reported set, and the training gradient of the unrolled model.

``REFERENCE`` is what the public reference code (Kainmueller-Lab/TW-autoencoder) does, read from its sources (see
docs/reference_gradient.md for file/line references):

- loss: ``F.multilabel_soft_margin_loss`` (background weight 0) x batch size (9.52 x our BCE at batch 10, K = 21);
- input ``(x + 1) / 256`` (no mean/std), a random square crop resized to 256, photometric augmentation (blur,
  brightness/contrast, colour jitter, noise), void (255) counted as background in training and evaluation;
- 100 epochs of ceil(15676 / 10) batches = 156,800 steps at constant lr 1e-5 (AdamW's default weight decay 0.01);
- evaluation on the centre square crop of each val image resized to 256, every 300 steps (3000 images), keeping the
  best val mIoU -- selection on the reported set, so its numbers are optimistic;
- the unrolled model trained with the reference code's gradient (``unroll.reference.REFERENCE``).
"""
from __future__ import annotations

from dataclasses import dataclass

from unroll import reference

__all__ = ["Protocol", "OURS", "REFERENCE", "PROTOCOLS"]


@dataclass(frozen=True)
class Protocol:
    name: str
    recipe: str  # bench.data.voc recipe: transforms, input scaling, void handling
    steps: int  # default segmentation steps
    eval_every: int  # default evaluation / checkpoint interval
    cls_loss: str  # unroll.segmentation.train.TrainConfig.cls_loss
    weight_decay: float  # default AdamW weight decay
    select_on_val: bool  # keep the best step as measured on the reported (val) set: optimistic
    gradient: reference.ReferenceGradient | None  # the unrolled model's training gradient (None: exact)
    evaluation: str  # how val is scored, for metrics.json ({n}: images, {skipped}: bad ones left out, {size}: crop)

    @property
    def optimistic(self) -> bool:
        return self.select_on_val

    def selection_note(self, evaluations: int, best_step: int, steps: int) -> str:
        return (f"OPTIMISTIC: best val mIoU of {evaluations} evaluations on the reported set itself (step "
                f"{best_step} of {steps}), as the reference code selects")


OURS = Protocol(name="ours", recipe="ours", steps=10_000, eval_every=1000, cls_loss="bce", weight_decay=1e-4,
                select_on_val=False, gradient=None, evaluation="{n} full images{skipped}, 255 ignored")
REFERENCE = Protocol(name="reference", recipe="reference", steps=156_800, eval_every=300, cls_loss="reference",
                     weight_decay=1e-2, select_on_val=True, gradient=reference.REFERENCE,
                     evaluation="{n} images{skipped}, centre square crop resized to {size}x{size}, "
                                "void (255) counted as background")
PROTOCOLS = {p.name: p for p in (OURS, REFERENCE)}
