"""The benchmark's models by name, all with one forward the training loop can call.

    model = build("unrolled", classifier, num_classes=11)
    out = model(x, samples=rows)   # SegOutput(logits (B, K) | None, seg (len(rows), K, H, W) | None)

``samples`` (an index tensor; None = every row) picks the rows that get segmentation maps: the encoder always runs
once on the whole batch (BatchNorm statistics move once per step), the decoder only on those rows. Every model keeps
the classifier it was built from as ``model.classifier`` (the same module, never a copy), so a classifier checkpoint
fits them all and their encoders start identical.

Models (maps; logits; loss):

- ``classifier``: no maps; the classifier's logits; BCE on image-level labels (step 1 of the experiments);
  ``perturbation=`` trains it on noisy inputs ("model-pert").
- ``unrolled``: input x gradient heatmaps of every class (``unroll.compile``); the classifier's logits; CE + BCE.
- ``unrolled-eps``: LRP-epsilon heatmaps (``unroll.rulesets.epsilon(eps)``); the classifier's logits; CE + BCE.
- ``ws-ae``: the tied decoder with ReLUs on its own signal in place of the gates (zoo.WSAE); logits; CE + BCE.
- ``mt-unet``: a free U-Net decoder on the classifier's stages (zoo.MultiTaskUNet); the classifier's logits; CE + BCE.
- ``unet``: the same U-Net decoder (zoo.UNet); no logits; CE only.
- ``fcn``: a skip-free decoder (zoo.FCN); no logits; CE only.

Heatmap scale: the heatmaps of the tied models are trained directly with cross-entropy, as in the paper
(``heatmap_scale=1``). ``heatmap_scale`` may instead be a fixed factor, or ``"learn"`` for one learnable factor
(a temperature, stored as its log, initialised at ``init_scale``); see bench.digits' README section for what we
measured.

BatchNorm in the tied decoders (``bn_grad``, default True: ``unroll.rulesets.TRAIN_BN``): in train mode unroll's
decoder scales the cotangent by gamma / sqrt(batch variance), the variance held constant (the heatmap is the gradient with frozen batch statistics).
Held constant in the *training* gradient too, the weights learn as if they could grow the heatmaps freely while
BatchNorm undoes it, and the running statistics fall behind. Measured on digit scenes (centered input, plain
heatmaps, all scenes pixel-labelled, 100 steps): eval-mode test F1 fell from 0.91 to 0.003 (0.75 with the same
weights in train mode), mIoU 0.150. With ``bn_grad=True`` the same scale is computed with the variance left in the
autograd graph -- identical heatmaps, a gradient that knows the variance moves with the weights: F1 0.82, mIoU 0.178.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import unroll
import zoo
from unroll.segmentation.classifier import PERTURBATIONS, ClassifierModel  # noqa: F401  (build("classifier"))
from zoo import SegOutput

__all__ = ["MODEL_NAMES", "SEG_MODELS", "TIED", "build", "ClassifierModel", "UnrolledModel", "UNetModel", "WSAEModel"]

SEG_MODELS = ("unrolled", "unrolled-eps", "unet", "mt-unet", "ws-ae", "fcn")
MODEL_NAMES = ("classifier", *SEG_MODELS)
TIED = ("unrolled", "unrolled-eps", "ws-ae")  # decoders compiled by unroll: heatmap per logit, chunks, checkpoint


def _empty(samples: Tensor | None) -> bool:
    return samples is not None and len(samples) == 0


class HeatmapScale(nn.Module):
    """Multiplies heatmaps by a fixed factor, or by exp(log_scale), a learnable scalar ("learn")."""

    def __init__(self, scale: float | str = 1.0, init_scale: float = 1.0):
        super().__init__()
        self.learn = scale == "learn"
        if self.learn:
            self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        else:
            self.value = float(scale)

    def forward(self, h: Tensor) -> Tensor:
        if self.learn:
            return h * self.log_scale.exp()
        return h if self.value == 1.0 else h * self.value

    def extra_repr(self) -> str:
        return "learnable" if self.learn else f"{self.value:g}"


def tied_rules(rule: str = "lrp0", epsilon: float = 1e-6, bn_grad: bool = True) -> unroll.rulesets.RuleSet:
    """The rule set of a tied model: "lrp0" (input x gradient), "epsilon" (LRP-epsilon) or "ws-ae" (ReLU on the
    signal for every gate), with BatchNorm's batch variance in the autograd graph if `bn_grad` (see above)."""
    sets = {"lrp0": unroll.rulesets.LRP0, "epsilon": unroll.rulesets.epsilon(epsilon), "ws-ae": unroll.rulesets.WS_AE}
    if rule not in sets:
        raise ValueError(f"rule={rule!r}: expected one of {', '.join(sets)}")
    return sets[rule] | unroll.rulesets.TRAIN_BN if bn_grad else sets[rule]


class _Tied(nn.Module):
    """Shared by the unrolled models and WS-AE: one encoder pass, heatmaps of the `samples` rows."""

    has_logits, has_seg = True, True
    net: unroll.Unrolled

    @property
    def classifier(self) -> nn.Module:
        return self.net.model

    def forward(self, x: Tensor, samples: Tensor | None = None) -> SegOutput:
        logits, saved = self.net.encode(x)
        if _empty(samples):
            return SegOutput(logits, x.new_zeros(0, logits.shape[1], *x.shape[2:]))
        return SegOutput(logits, self.scale(self.net.decode(logits, saved, samples=samples)))


class UnrolledModel(_Tied):
    """``unroll.compile(classifier)``: logits and every class's heatmap (input x gradient, or LRP-epsilon)."""

    def __init__(self, classifier: nn.Module, rule: str = "lrp0", epsilon: float = 1e-6,
                 heatmap_scale: float | str = 1.0, init_scale: float = 1.0, bn_grad: bool = True,
                 classes_per_chunk: int | str | None = "auto", checkpoint: bool = False):
        super().__init__()
        self.net = unroll.compile(classifier, rules=tied_rules(rule, epsilon, bn_grad),
                                  classes_per_chunk=classes_per_chunk, checkpoint=checkpoint)
        self.scale = HeatmapScale(heatmap_scale, init_scale)


class WSAEModel(_Tied):
    """``zoo.WSAE``: the unrolled decoder with ReLUs on its own signal instead of the encoder's gates."""

    def __init__(self, classifier: nn.Module, heatmap_scale: float | str = 1.0, init_scale: float = 1.0,
                 bn_grad: bool = True, classes_per_chunk: int | str | None = "auto", checkpoint: bool = False):
        super().__init__()
        # zoo.WSAE's decoder (gates -> ReLU on the signal), compiled here so the BatchNorm rule can be chosen too.
        self.net = unroll.compile(classifier, rules=tied_rules("ws-ae", bn_grad=bn_grad),
                                  classes_per_chunk=classes_per_chunk, checkpoint=checkpoint)
        self.scale = HeatmapScale(heatmap_scale, init_scale)


class UNetModel(nn.Module):
    """zoo.UNet / MultiTaskUNet / FCN (their forward: the classifier's stages on the whole batch, the classifier head
    on the deepest features (multitask), the decoder on the `samples` rows), kept as ``seg_model``."""

    has_seg = True

    def __init__(self, classifier: nn.Module, num_classes: int, kind: str = "unet"):
        super().__init__()
        if kind not in ("unet", "mt-unet", "fcn"):
            raise ValueError(f"kind must be 'unet', 'mt-unet' or 'fcn', got {kind!r}")
        self.kind = kind
        self.has_logits = kind == "mt-unet"
        Model = {"unet": zoo.UNet, "mt-unet": zoo.MultiTaskUNet, "fcn": zoo.FCN}[kind]
        self.seg_model = Model(classifier, num_classes)

    @property
    def classifier(self) -> nn.Module:
        return self.seg_model.classifier

    def forward(self, x: Tensor, samples: Tensor | None = None) -> SegOutput:
        return self.seg_model(x, samples=samples)


def build(name: str, classifier: nn.Module, num_classes: int, *, epsilon: float = 1e-6,
          heatmap_scale: float | str = 1.0, init_scale: float = 1.0, bn_grad: bool = True,
          perturbation: str = "none", seed: int = 0, classes_per_chunk: int | str | None = "auto",
          checkpoint: bool = False) -> nn.Module:
    """The model called `name` (see MODEL_NAMES) on `classifier` (used as is: pass a copy to keep the original).

    The classifier's logits must have `num_classes` outputs (background included) for the tied models, whose maps
    are one per logit. Free decoders (unet, mt-unet, fcn) are initialised from torch's global RNG.
    `classes_per_chunk` and `checkpoint` bound the tied decoder's memory (see ``unroll.compile``; same results).
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODEL_NAMES)}")
    if name not in TIED and (classes_per_chunk != "auto" or checkpoint):
        raise ValueError(f"classes_per_chunk / checkpoint bound the tied decoder's memory; {name!r} has none "
                         f"(they apply to {', '.join(TIED)})")
    if name == "classifier":
        return ClassifierModel(classifier, perturbation, seed)
    if perturbation != "none":
        raise ValueError(f"perturbation={perturbation!r} is for the classifier stage (model-pert), not {name!r}")
    memory = {"classes_per_chunk": classes_per_chunk, "checkpoint": checkpoint}
    if name in TIED:
        k = _num_logits(classifier)
        if k is not None and k != num_classes:
            raise ValueError(f"{name} gives one heatmap per logit: the classifier has {k} outputs, "
                             f"the segmentation task {num_classes} classes")
    if name == "unrolled":
        return UnrolledModel(classifier, "lrp0", heatmap_scale=heatmap_scale, init_scale=init_scale, bn_grad=bn_grad,
                             **memory)
    if name == "unrolled-eps":
        return UnrolledModel(classifier, "epsilon", epsilon, heatmap_scale, init_scale, bn_grad, **memory)
    if name == "ws-ae":
        return WSAEModel(classifier, heatmap_scale=heatmap_scale, init_scale=init_scale, bn_grad=bn_grad, **memory)
    return UNetModel(classifier, num_classes, name)


def _num_logits(classifier: nn.Module) -> int | None:
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
