"""Measure how far the reference code's training gradient (unroll.reference) is from the exact one.

    PYTHONPATH=. python bench/results/reference_gradient.py --models resnet18 vgg11_bn --size 64 --batch 2

For each torchvision model (random init, BN statistics randomised, float64, K=21 classes, inputs (x+1)/256, a
random target mask): cosine of heatmaps (reference LRP-epsilon with its overwriting unpool, and with an accumulating
one) to input x gradient, and cosine of the parameter gradient of the pixel-wise CE over the K maps to the exact
gradient (autograd double backprop in eval mode; in train mode unroll's exact heatmaps with the batch variance kept
in the graph, as bench.voc trains). "decoder path": the reference with every encoder value detached.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.models as tvm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import unroll  # noqa: E402
from unroll import reference as R  # noqa: E402
from zoo.segmentation import UnrolledModel  # noqa: E402

K = 21


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g, dtype=torch.double) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g, dtype=torch.double) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g, dtype=torch.double) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g, dtype=torch.double) * 0.2)
    return model


def cos(a, b):
    return float(F.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0))


def flat_grad(loss, params):
    gs = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(gs, params)])


def double_backprop_maps(model, x):
    x = x.clone().requires_grad_()
    logits = model(x)
    maps = []
    for k in range(logits.shape[1]):
        (g,) = torch.autograd.grad(logits[:, k].sum(), x, create_graph=True)
        maps.append((g * x).sum(1))
    return torch.stack(maps, 1)


def measure(name, size, batch, seed=0):
    torch.manual_seed(seed)
    model = randomize(getattr(tvm, name)(num_classes=K))
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 256, (batch, 3, size, size), generator=g).double() + 1) / 256
    target = torch.randint(0, K, (batch, size, size), generator=g)
    params = list(model.parameters())
    shared = R.REFERENCE.replace(tie="shared")
    row = {"model": name, "size": size, "batch": batch}

    model.eval()
    ixg = unroll.compile(model)(x).heatmaps
    row["maps_reference_vs_ixg"] = cos(R.compile(model, shared)(x).heatmaps, ixg)
    row["maps_accumulate_vs_ixg"] = cos(R.compile(model, shared.replace(unpool="accumulate"))(x).heatmaps, ixg)
    exact = flat_grad(F.cross_entropy(double_backprop_maps(model, x), target), params)
    row["eval_exact_unroll_vs_double_backprop"] = cos(
        flat_grad(F.cross_entropy(unroll.compile(model)(x).heatmaps, target), params), exact)
    ref = flat_grad(F.cross_entropy(R.compile(model, shared)(x).heatmaps, target), params)
    dec = flat_grad(F.cross_entropy(R.compile(model, shared.replace(encoder_path=False))(x).heatmaps, target),
                    params)
    row["eval_reference_vs_exact"] = cos(ref, exact)
    row["eval_decoder_path_vs_exact"] = cos(dec, exact)
    row["eval_encoder_part_norm_over_decoder_part"] = float((ref - dec).norm() / dec.norm())

    model.train()
    ours = UnrolledModel(model)  # bench.voc's exact training heatmaps (batch variance in the graph)
    exact_t = flat_grad(F.cross_entropy(ours(x).seg, target), params)
    ref_t = flat_grad(F.cross_entropy(R.compile(model, shared)(x).heatmaps, target), params)
    dec_t = flat_grad(F.cross_entropy(R.compile(model, shared.replace(encoder_path=False))(x).heatmaps, target),
                      params)
    row["train_reference_vs_ours"] = cos(ref_t, exact_t)
    row["train_decoder_path_vs_ours"] = cos(dec_t, exact_t)
    row["train_encoder_part_norm_over_decoder_part"] = float((ref_t - dec_t).norm() / dec_t.norm())
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "vgg11_bn"])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models:
        row = measure(name, args.size, args.batch)
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
