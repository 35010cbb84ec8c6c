"""The contribution-window experiment: CAM vs gradient saliency as the receptive field of a plain ConvNet grows.

    python -m bench.window                    # F in {1, 3, 5, 7, 9}, 28x28 MNIST digits, ~5 min on 2 CPU cores
    python -m bench.window --quick            # seconds (what the tests run)

For each kernel size F, a `zoo.PlainConvNet(F, depth=5)` (five FxF ReLU convs with same padding, no pooling, global
average pool, linear) is trained on single-digit MNIST scenes (`make_digit_scenes(scene="single")`; the sklearn digits
when MNIST is absent). Each output position of the last conv sees a 5(F - 1) + 1 square of the input, its contribution
window. For each net: CAM and vanilla saliency of the test images' digit class, background resolve `basic` at the best
threshold of the 0.01..0.50 sweep, then mIoU and NDR-recall (NDR: digit pixels where that net's CAM < 0.25).

Scenes are 28x28 (MNIST's own resolution) by default instead of the 128x128 of the MNIST segmentation set, to fit the
five trainings in a few CPU minutes; --size 128 reproduces the full-size setting.

Writes OUT/window.json, OUT/window.md and OUT/window.png (mIoU and NDR-recall against F, CAM and saliency).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.table import Table

import unroll
from unroll import attribution as attr

from unroll.segmentation.resolve import normalize, resolve_basic, threshold_sweep
from bench.wsss import _progress, add_threads_flag, classifier_scores, console, set_threads, train_classifier
from unroll.segmentation.wsss_metrics import TAU_CAM, wsss_metrics

__all__ = ["WindowConfig", "run", "main"]


@dataclass
class WindowConfig:
    kernels: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 9])
    depth: int = 5
    width: int = 16
    size: int = 28
    n_train: int = 4000
    n_test: int = 200
    epochs: int = 8
    lr: float = 1e-2
    batch_size: int = 64
    seed: int = 0
    source: str = "mnist"

    @classmethod
    def make(cls, quick: bool = False, **over) -> "WindowConfig":
        base = {}
        if quick:
            base = {"kernels": [1, 3], "width": 8, "size": 16, "n_train": 128, "n_test": 8, "epochs": 1}
        base.update({k: v for k, v in over.items() if v is not None})
        return cls(**base)


def load(cfg: WindowConfig, split: str):
    from bench.data.digits import make_digit_scenes

    n = cfg.n_train if split == "train" else cfg.n_test
    seed = cfg.seed + (0 if split == "train" else 1000)
    try:
        ds = make_digit_scenes(cfg.source, split, n_scenes=n, size=cfg.size, seed=seed, scene="single")
    except FileNotFoundError:
        if cfg.source != "mnist":
            raise
        console.log("MNIST not found: using the scikit-learn digits")
        cfg.source = "sklearn"
        ds = make_digit_scenes("sklearn", split, n_scenes=n, size=cfg.size, seed=seed, scene="single")
    items = [ds[i] for i in range(len(ds))]
    return (torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items]),
            ds.labels.clone())


def evaluate_net(model, images, masks, labels) -> dict:
    """CAM and saliency of each image's digit class -> basic resolve at the sweep's best threshold -> metrics."""
    net = unroll.compile(model)
    classes = labels.bool().clone()
    classes[:, 0] = False
    cams = torch.cat([attr.cam(model, images[i:i + 64], classes=classes[i:i + 64]) for i in range(0, len(images), 64)])
    sal = attr.saliency(net, images, classes=classes, batch_size=64)
    out = {}
    for name, maps in (("cam", cams), ("saliency", sal)):
        scores = normalize(maps)
        sweep = threshold_sweep(labels.shape[1])
        sweep.update(scores, labels, masks)
        result = sweep.compute()
        preds = resolve_basic(scores, labels, result.best_threshold, normalized=True)
        m = wsss_metrics(labels.shape[1])
        m.update(preds, masks, cam=cams)
        out[name] = {"threshold": result.best_threshold, **{k: float(v) for k, v in m.compute().items()},
                     "sweep": result.as_dict()}
    return out


def plot(path: Path, rows: list[dict], cfg: WindowConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    F_ = [r["kernel_size"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "miou", "mIoU"), (axes[1], "ndr_recall", "NDR-recall")):
        for name, style in (("cam", "o-"), ("saliency", "s-")):
            ax.plot(F_, [100 * r[name][metric] for r in rows], style, label="CAM" if name == "cam" else "saliency")
        ax.set_xlabel("kernel size F  (contribution window 5(F-1)+1)")
        ax.set_xticks(F_, [f"{f}\n({r['window']})" for f, r in zip(F_, rows)])
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(f"{title} vs kernel size")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{cfg.depth}-layer ReLU ConvNets, {cfg.size}x{cfg.size} single digits ({cfg.source})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: WindowConfig, out: Path) -> dict:
    import zoo

    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    train_x, _, train_y = load(cfg, "train")
    test_x, test_m, test_y = load(cfg, "test")
    rows = []
    with _progress() as progress:
        for k in cfg.kernels:
            torch.manual_seed(cfg.seed)
            model = zoo.PlainConvNet(k, depth=cfg.depth, width=cfg.width, num_classes=train_y.shape[1],
                                     in_channels=train_x.shape[1])
            t0 = time.time()
            history = train_classifier(model, train_x, train_y, cfg.epochs, cfg.batch_size, cfg.lr, seed=cfg.seed,
                                       progress=progress, description=f"train F={k}", loss="ce")
            t_train = time.time() - t0
            scores = classifier_scores(model, test_x, test_y)
            t0 = time.time()
            res = evaluate_net(model, test_x, test_m, test_y)
            rows.append({"kernel_size": k, "window": model.window, "classifier": scores, "loss": history,
                         "train_seconds": t_train, "eval_seconds": time.time() - t0, **res})
            console.log(f"F={k}: top-1 {scores['top1']:.3f}, mIoU CAM {100 * res['cam']['miou']:.1f} / saliency "
                        f"{100 * res['saliency']['miou']:.1f}, NDR-recall CAM {100 * res['cam']['ndr_recall']:.1f} / "
                        f"saliency {100 * res['saliency']['ndr_recall']:.1f}")
    report = {"config": asdict(cfg), "rows": rows, "wall_seconds": time.time() - t_start,
              "torch_threads": torch.get_num_threads()}
    (out / "window.json").write_text(json.dumps(report, indent=1))
    plot(out / "window.png", rows, cfg)
    header = ["F", "window", "top-1", "CAM mIoU", "Sal mIoU", "CAM NDR-Rec", "Sal NDR-Rec", "CAM thr", "Sal thr"]
    cells = [[str(r["kernel_size"]), str(r["window"]), f"{r['classifier']['top1']:.3f}",
              f"{100 * r['cam']['miou']:.1f}", f"{100 * r['saliency']['miou']:.1f}",
              f"{100 * r['cam']['ndr_recall']:.1f}", f"{100 * r['saliency']['ndr_recall']:.1f}",
              f"{r['cam']['threshold']:.2f}", f"{r['saliency']['threshold']:.2f}"] for r in rows]
    md = [f"# Contribution window: CAM vs saliency ({cfg.depth}-layer ReLU ConvNets, width {cfg.width}, "
          f"{cfg.size}x{cfg.size} single digits from {cfg.source}, {cfg.n_test} test images)", "",
          f"basic resolve at each map's best threshold (sweep 0.01..0.50); NDR = digit pixels with CAM < {TAU_CAM}; "
          "values in %.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(c) + " |" for c in cells]
    md += ["", f"Wall time {report['wall_seconds']:.0f} s."]
    (out / "window.md").write_text("\n".join(md) + "\n")
    table = Table(title="Contribution window: CAM vs saliency (%)")
    for h in header:
        table.add_column(h, justify="right")
    for c in cells:
        table.add_row(*c)
    console.print(table)
    console.log(f"wrote {out}/window.json, window.md, window.png ({report['wall_seconds']:.0f} s)")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.window", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="output folder (default runs/window)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--kernels", type=int, nargs="+", help="kernel sizes (odd), default 1 3 5 7 9")
    p.add_argument("--size", type=int, help="scene side (default 28)")
    p.add_argument("--width", type=int, help="channels per conv (default 16)")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--source", choices=["mnist", "sklearn"], help="digit source (default mnist, sklearn if absent)")
    add_threads_flag(p)
    args = p.parse_args(argv)
    set_threads(args.threads)
    cfg = WindowConfig.make(args.quick, kernels=args.kernels, size=args.size, width=args.width,
                            n_train=args.n_train, n_test=args.n_test, epochs=args.epochs, seed=args.seed,
                            source=args.source)
    out = args.out or Path("runs") / f"window{'-quick' if args.quick else ''}"
    run(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
