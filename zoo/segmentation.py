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
            self.log_scale.calibration = True  # its own lr (unroll.segmentation.train.configure_optimizer)
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


BACKGROUNDS = ("heatmap", "constant")
PRESENCES = ("none", "prior", "prior-detached")
BN_MODES = ("grad", "const", "frozen")


class _Tied(nn.Module):
    """Shared by the unrolled models and WS-AE: one encoder pass, heatmaps of the `samples` rows.

    ``background``: the background class's map is its heatmap ("heatmap", the paper), or one learnable constant
    ("constant", initialised at 0): a pixel is then an object of class k where k's scaled heatmap exceeds that
    threshold. ``frozen_bn``: BatchNorm layers stay in eval mode in training (running statistics, not updated).

    ``presence``: "none" (the paper: the maps are the scaled heatmaps) or "prior": each object class's map gets
    ``log sigmoid(logit_k)`` added, so the pixel-wise softmax is a product of experts,
    ``p(k | pixel) ~ sigmoid(logit_k) exp(T h_k(pixel))``: a class the classifier calls absent needs a much larger
    heatmap to win a pixel. Why: the classifier's own heatmaps already say which digit is where once the argmax is
    restricted to the classes it predicts present, and suppressing absent classes pixel by pixel is what the
    segmentation training learns slowest (docs/notes/convergence-study.md). "prior-detached": the same, with the prior
    a constant in the gradient (the logits then train through the classification loss only). The background map is
    never changed."""

    has_logits, has_seg = True, True
    net: unroll.Unrolled

    def _setup(self, heatmap_scale, init_scale, background: str, frozen_bn: bool, presence: str = "none") -> None:
        if background not in BACKGROUNDS:
            raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, got {background!r}")
        if presence not in PRESENCES:
            raise ValueError(f"presence must be one of {', '.join(PRESENCES)}, got {presence!r}")
        self.presence = presence
        self.scale = HeatmapScale(heatmap_scale, init_scale)
        self.background = background
        self.frozen_bn = frozen_bn
        if background == "constant":
            self.background_level = nn.Parameter(torch.zeros(()))
            self.background_level.calibration = True

    @property
    def classifier(self) -> nn.Module:
        return self.net.model

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: Tensor, samples: Tensor | None = None) -> SegOutput:
        logits, saved = self.net.encode(x)
        if _empty(samples):
            return SegOutput(logits, x.new_zeros(0, logits.shape[1], *x.shape[2:]))
        maps = self.scale(self.net.decode(logits, saved, samples=samples))
        if self.presence != "none":
            # as a tensor: a tuple would index dimensions, not rows (indices, a list or a bool mask all work)
            rows = logits if samples is None else logits[torch.as_tensor(samples, device=logits.device)]
            prior = nn.functional.logsigmoid(rows.to(maps.dtype))
            if self.presence == "prior-detached":
                prior = prior.detach()
            prior = torch.cat([torch.zeros_like(prior[:, :1]), prior[:, 1:]], dim=1)  # background column unchanged
            maps = maps + prior[:, :, None, None]
        if self.background == "constant":
            level = self.background_level.to(maps.dtype).expand(maps.shape[0], 1, *maps.shape[2:])
            maps = torch.cat([level, maps[:, 1:]], dim=1)
        return SegOutput(logits, maps)


class UnrolledModel(_Tied):
    """``unroll.compile(classifier)``: logits and every class's heatmap (input x gradient, or LRP-epsilon).

    ``gradient``: an ``unroll.reference.ReferenceGradient`` trains with the reference code's gradient instead
    (LRP-epsilon relevance on live activations, its ties and unpooling; ``rule``, ``epsilon`` and ``bn_grad`` do
    not apply then)."""

    def __init__(self, classifier: nn.Module, rule: str = "lrp0", epsilon: float = 1e-6,
                 heatmap_scale: float | str = 1.0, init_scale: float = 1.0, bn_grad: bool = True,
                 classes_per_chunk: int | str | None = "auto", checkpoint: bool = False,
                 background: str = "heatmap", frozen_bn: bool = False, gradient=None, presence: str = "none"):
        super().__init__()
        memory = {"classes_per_chunk": classes_per_chunk, "checkpoint": checkpoint}
        if gradient is not None:
            from unroll import reference

            self.net = reference.compile(classifier, gradient, **memory)
        else:
            self.net = unroll.compile(classifier, rules=tied_rules(rule, epsilon, bn_grad), **memory)
        self._setup(heatmap_scale, init_scale, background, frozen_bn, presence)


class WSAEModel(_Tied):
    """``zoo.WSAE``: the unrolled decoder with ReLUs on its own signal instead of the encoder's gates."""

    def __init__(self, classifier: nn.Module, heatmap_scale: float | str = 1.0, init_scale: float = 1.0,
                 bn_grad: bool = True, classes_per_chunk: int | str | None = "auto", checkpoint: bool = False,
                 background: str = "heatmap", frozen_bn: bool = False, presence: str = "none"):
        super().__init__()
        # zoo.WSAE's decoder (gates -> ReLU on the signal), compiled here so the BatchNorm rule can be chosen too.
        self.net = unroll.compile(classifier, rules=tied_rules("ws-ae", bn_grad=bn_grad),
                                  classes_per_chunk=classes_per_chunk, checkpoint=checkpoint)
        self._setup(heatmap_scale, init_scale, background, frozen_bn, presence)


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
          checkpoint: bool = False, background: str = "heatmap", bn: str | None = None,
          gradient=None, presence: str = "none") -> nn.Module:
    """The model called `name` (see MODEL_NAMES) on `classifier` (used as is: pass a copy to keep the original).

    The classifier's logits must have `num_classes` outputs (background included) for the tied models, whose maps
    are one per logit. Free decoders (unet, mt-unet, fcn) are initialised from torch's global RNG.
    `classes_per_chunk` and `checkpoint` bound the tied decoder's memory (see ``unroll.compile``; same results).
    Tied models only: `background` ("heatmap" or "constant", see _Tied), `presence` ("none", "prior",
    "prior-detached": the classifier's log sigmoid(logit) added to the object maps, see _Tied) and `bn`, the BatchNorm
    handling in training
    ("grad": bn_grad=True, "const": bn_grad=False, "frozen": eval-mode BatchNorm; None: as `bn_grad` says).
    `gradient` (an ``unroll.reference.ReferenceGradient``, "unrolled" only): train with the reference code's gradient.
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
    if bn is not None and bn not in BN_MODES:
        raise ValueError(f"bn must be one of {', '.join(BN_MODES)}, got {bn!r}")
    if name not in TIED and (background != "heatmap" or bn not in (None, "grad") or presence != "none"):
        raise ValueError(f"background / presence / bn choose how a tied model's heatmaps train; {name!r} has none")
    if bn is not None:
        bn_grad = bn == "grad"
    memory = {"classes_per_chunk": classes_per_chunk, "checkpoint": checkpoint, "background": background,
              "presence": presence,
              "frozen_bn": bn == "frozen"}
    if name in TIED:
        k = _num_logits(classifier)
        if k is not None and k != num_classes:
            raise ValueError(f"{name} gives one heatmap per logit: the classifier has {k} outputs, "
                             f"the segmentation task {num_classes} classes")
    if gradient is not None and name != "unrolled":
        raise ValueError(f"gradient= (the reference code's training gradient) applies to 'unrolled', not {name!r}")
    if name == "unrolled":
        return UnrolledModel(classifier, "lrp0", heatmap_scale=heatmap_scale, init_scale=init_scale, bn_grad=bn_grad,
                             gradient=gradient, **memory)
    if name == "unrolled-eps":
        return UnrolledModel(classifier, "epsilon", epsilon, heatmap_scale, init_scale, bn_grad, **memory)
    if name == "ws-ae":
        return WSAEModel(classifier, heatmap_scale=heatmap_scale, init_scale=init_scale, bn_grad=bn_grad, **memory)
    return UNetModel(classifier, num_classes, name)


def _num_logits(classifier: nn.Module) -> int | None:
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None
