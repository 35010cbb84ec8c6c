"""The classification stage: train a classifier on image-level labels with the shared loop, cached by a key.

    stage = train_classifier(clf, TrainConfig(steps=600, select="f1"), image_set, num_classes=11,
                             folder="runs/clf", key={"backbone": "small_vgg", "seed": 0})
    stage.classifier          # trained (or loaded from the cache), the same module as clf
    stage.cached              # True when folder held a classifier made with an equal key

The loss is the BCE term of ``compute_loss`` on ``ClassifierModel(classifier)``'s logits (background weight 0); the
segmentation models of ``zoo.segmentation`` start from the result. The cache is ``folder/classifier.pt`` (the
classifier's state dict, what ``zoo.classifier(..., weights=path)`` loads), ``folder/spec.json`` (the key) and
``folder/train.json`` (the training summary). An interrupted stage resumes from ``folder/ckpt.pt``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from unroll.attribution import perturb

from .train import SegOutput, TrainConfig, TrainResult, train

__all__ = ["PERTURBATIONS", "ClassifierModel", "ClassifierStage", "cached_classifier_state", "train_classifier"]

PERTURBATIONS = ("none", "gaussian", "binary")  # model-pert training of the classifier stage

WEIGHTS, SPEC, SUMMARY = "classifier.pt", "spec.json", "train.json"


class ClassifierModel(nn.Module):
    """The classifier alone: SegOutput(logits, None). Image-level training.

    ``perturbation`` ("gaussian" sigma 0.15 of each image's range, "binary" keep-probability 0.9; see
    ``unroll.attribution.perturb``) perturbs every training batch: the saliency-vs-CAM paper's "model-pert"
    fine-tuning. The noise of call n is drawn from a generator seeded with (seed, rank, n), and n is part of the
    state dict, so a resumed run draws exactly the noise an uninterrupted one would; ranks draw different noise.
    Evaluation (``eval()``) never perturbs.
    """

    has_logits, has_seg = True, False

    def __init__(self, classifier: nn.Module, perturbation: str = "none", seed: int = 0):
        super().__init__()
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {perturbation!r}")
        self.classifier = classifier
        self.perturbation, self.seed, self.calls = perturbation, seed, 0

    def forward(self, x: Tensor, samples: Tensor | None = None) -> SegOutput:
        if self.training and self.perturbation != "none":
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            g = torch.Generator().manual_seed(hash((self.seed, rank, self.calls)) % 2**63)
            self.calls += 1
            x = perturb(x, self.perturbation, g)
        return SegOutput(self.classifier(x), None)

    # the noise counter travels with checkpoints (a Python int: no device tensor, no host sync to read it)
    def get_extra_state(self) -> dict:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict) -> None:
        self.calls = int(state.get("calls", 0))

    def extra_repr(self) -> str:
        return f"perturbation={self.perturbation!r}" if self.perturbation != "none" else ""


@dataclass
class ClassifierStage:
    classifier: nn.Module
    cached: bool  # loaded from folder (an equal key) instead of trained by this call
    path: Path  # folder/classifier.pt
    result: TrainResult | None  # the training summary (from train.json when cached; None if the cache has none)


def _canonical(key: Any) -> Any:
    return json.loads(json.dumps(key))  # tuples -> lists, as the key reads back from spec.json


def cached_classifier_state(folder: str | os.PathLike, key: Any) -> dict[str, Tensor] | None:
    """The cached classifier's state dict (on the CPU) if ``folder`` holds one made with an equal ``key``, else None.
    Lets a caller skip building the initial classifier (e.g. downloading pretrained weights) on a cache hit."""
    folder = Path(folder)
    weights, spec = folder / WEIGHTS, folder / SPEC
    if weights.is_file() and spec.is_file() and json.loads(spec.read_text()) == _canonical(key):
        return torch.load(weights, map_location="cpu", weights_only=True)
    return None


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    state = module.state_dict()
    cpu = type(state)((k, v.cpu()) for k, v in state.items())
    cpu._metadata = getattr(state, "_metadata", None)  # module versions, read by load_state_dict
    return cpu


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def train_classifier(classifier: nn.Module, cfg: TrainConfig, image_set: Dataset, num_classes: int, *,
                     folder: str | os.PathLike, key: Any, val_set: Dataset | None = None, perturbation: str = "none",
                     noise_seed: int = 0, resume: bool = True, keep_checkpoint: bool = False,
                     **train_kw: Any) -> ClassifierStage:
    """Train ``classifier`` (in place; on its device) on ``image_set``'s image-level labels, or load it from the cache.

    ``key`` (JSON-able) names everything the result depends on: a cache in ``folder`` with an equal key is loaded
    into ``classifier`` instead of training. ``cfg`` is the shared loop's config (``select="f1"`` picks the step
    with the best F1 on ``val_set``); ``perturbation`` / ``noise_seed`` train it on noisy inputs (model-pert, see
    ``ClassifierModel``). ``resume`` continues an interrupted stage from ``folder/ckpt.pt``, which is deleted once the
    stage is cached unless ``keep_checkpoint``. ``train_kw`` go to ``train`` (device, on_step, on_log, ...). Under
    torch.distributed every rank trains (``distributed=True``); rank 0 alone writes the cache.
    """
    folder = Path(folder)
    state = cached_classifier_state(folder, key)
    if state is not None:
        classifier.load_state_dict(state)
        summary = folder / SUMMARY
        result = TrainResult(**json.loads(summary.read_text())) if summary.is_file() else None
        return ClassifierStage(classifier, True, folder / WEIGHTS, result)
    if _is_main():
        folder.mkdir(parents=True, exist_ok=True)
    _barrier()
    model = ClassifierModel(classifier, perturbation, noise_seed)
    result = train(model, cfg, num_classes=num_classes, image_set=image_set, val_set=val_set, out_dir=folder,
                   resume=resume, **train_kw)
    if not result.interrupted and _is_main():
        torch.save(_cpu_state(classifier), folder / WEIGHTS)
        (folder / SUMMARY).write_text(json.dumps({**asdict(result), "snapshots": []}, indent=1))
        (folder / SPEC).write_text(json.dumps(_canonical(key), indent=1))  # last: the cache is valid from here on
        if not keep_checkpoint:
            (folder / "ckpt.pt").unlink(missing_ok=True)
    _barrier()
    return ClassifierStage(classifier, False, folder / WEIGHTS, result)
