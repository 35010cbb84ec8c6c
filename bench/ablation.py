"""python -m bench.ablation -- why unrolled training converges or not: a controlled study on digit scenes.

Every row is one recipe of the unrolled model's segmentation training, a set of bench.digits flags on top of a common
base; every row trains from the same classifier checkpoints (one per source, input and seed), on the same labelled
scenes and the same batches (bench.digits derives both from the seed), with the same selection (best validation
mIoU, never the test set). A few reference rows train the U-Nets on the same batches. Per row it reports test mIoU
at each N, image-level F1 after training (and the classifier's before), the training loss at fixed steps, the
validation mIoU each row selects on, and how many steps it takes to reach a validation mIoU.

    python -m bench.ablation                       # the study: sklearn digits, every row, N = 10, 50, 250, 2 seeds
    python -m bench.ablation --source mnist        # the same rows on MNIST scenes (../shared/data/mnist)
    python -m bench.ablation --rows base,offset    # some rows only (names: --list)
    python -m bench.ablation --quick               # the CI smoke test: every row, tiny budgets, < 90 s

Writes OUT/results.json (every run, with its loss curve and validation history), OUT/results.md (the table) and
OUT/curves.png. Runs are cached by their full settings, so --resume (or a rerun with more rows / seeds) only trains
what is missing; an interrupted run continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench import digits
from bench.cli import integer

__all__ = ["ROWS", "Row", "main", "build_parser"]


@dataclass(frozen=True)
class Row:
    name: str
    group: str
    flags: tuple[str, ...]  # bench.digits flags on top of BASE
    what: str
    model: str = "unrolled"


# The base recipe: bench.digits' defaults before this study (learned temperature initialised at 10, raw input, lr
# 3e-3 cosine to 3e-4, 200 steps, one summed gradient, BatchNorm variance in the gradient graph).
BASE = ("--heatmap-scale", "learn", "--init-scale", "10", "--input", "raw", "--tied-lr", "3e-3", "--steps", "200",
        "--eval-every", "25", "--cls-weight", "1", "--bn", "grad", "--balance", "sum", "--background", "heatmap",
        "--presence", "none")

ROWS: tuple[Row, ...] = (
    Row("base", "base", (), "bench.digits' defaults before the study"),
    Row("unet", "reference", (), "U-Net on the same batches (lr 1e-3)", model="unet"),
    Row("mt-unet", "reference", (), "multi-task U-Net on the same batches (lr 1e-3)", model="mt-unet"),
    Row("cls9.52", "loss weights", ("--cls-weight", "9.52"), "BCE weight 9.52"),
    Row("centered", "input", ("--input", "centered"), "input (x - 0.5) / 0.5"),
    Row("offset", "input", ("--input", "offset"), "input (255x + 1) / 256, never 0"),
    Row("scale1", "heatmap scale", ("--heatmap-scale", "1"), "plain heatmaps (the paper)"),
    Row("scale100", "heatmap scale", ("--heatmap-scale", "100"), "heatmaps x 100, fixed"),
    Row("learn100", "heatmap scale", ("--init-scale", "100"), "learned temperature, init 100"),
    Row("calib30", "heatmap scale", ("--calibration-lr", "30"), "learned temperature with 30x lr"),
    Row("bg-const", "background", ("--background", "constant"), "background map = one learned constant"),
    Row("bg-const+calib30", "background", ("--background", "constant", "--calibration-lr", "30"),
        "constant background, 30x lr on it and the temperature"),
    Row("bg-const+t100+calib30", "combined", ("--background", "constant", "--init-scale", "100",
                                              "--calibration-lr", "30"),
        "constant background, temperature init 100, 30x lr on both"),
    Row("bgc30+normalize", "combined", ("--background", "constant", "--calibration-lr", "30", "--balance", "normalize"),
        "constant background, 30x calibration lr, per-loss gradient normalisation"),
    Row("bgc30+separate", "combined", ("--background", "constant", "--calibration-lr", "30", "--balance", "separate"),
        "constant background, 30x calibration lr, one AdamW state per loss"),
    Row("bgc30+cls9.52", "combined", ("--background", "constant", "--calibration-lr", "30", "--cls-weight", "9.52"),
        "constant background, 30x calibration lr, BCE weight 9.52"),
    Row("bg-bce", "background", ("--background-weight", "1"), "background heatmap, BCE weight 1 on it"),
    Row("lr1e-3", "lr", ("--tied-lr", "1e-3"), "lr 1e-3"),
    Row("lr1e-2", "lr", ("--tied-lr", "1e-2"), "lr 1e-2"),
    Row("const-lr", "lr", ("--schedule", "constant"), "constant lr 3e-3"),
    Row("normalize", "balance", ("--balance", "normalize"), "per-loss gradients normalised to unit norm"),
    Row("separate", "balance", ("--balance", "separate"), "one AdamW state per loss"),
    Row("bn-const", "batchnorm", ("--bn", "const"), "BatchNorm variance held constant in the gradient"),
    Row("bn-frozen", "batchnorm", ("--bn", "frozen"), "eval-mode BatchNorm in training"),
    Row("steps600", "budget", ("--steps", "600", "--eval-every", "50"), "600 steps"),
    Row("bgc30+steps600", "budget", ("--background", "constant", "--calibration-lr", "30", "--steps", "600",
                                     "--eval-every", "50"), "constant background, 30x calibration lr, 600 steps"),
    Row("unet+steps600", "budget", ("--steps", "600", "--eval-every", "50"), "U-Net, 600 steps", model="unet"),
    Row("mt-unet+steps600", "budget", ("--steps", "600", "--eval-every", "50"), "multi-task U-Net, 600 steps",
        model="mt-unet"),
    Row("steps2000", "budget", ("--steps", "2000", "--eval-every", "100"), "2,000 steps"),
    Row("bgc30+steps2000", "budget", ("--background", "constant", "--calibration-lr", "30", "--steps", "2000",
                                      "--eval-every", "100"), "constant background, 30x calibration lr, 2,000 steps"),
    Row("unet+steps2000", "budget", ("--steps", "2000", "--eval-every", "100"), "U-Net, 2,000 steps", model="unet"),
    Row("mt-unet+steps2000", "budget", ("--steps", "2000", "--eval-every", "100"), "multi-task U-Net, 2,000 steps",
        model="mt-unet"),
    # The classifier's presence as a prior on the maps (zoo.segmentation: log sigmoid(logit_k) added to class k's map)
    Row("prior", "presence", ("--presence", "prior"), "log sigmoid(logit) added to each object map"),
    Row("prior-detached", "presence", ("--presence", "prior-detached"), "the same prior, no gradient through it"),
    Row("bgc30+prior", "presence", ("--background", "constant", "--calibration-lr", "30", "--presence", "prior"),
        "constant background, 30x calibration lr, presence prior"),
    Row("bgc30+prior-detached", "presence", ("--background", "constant", "--calibration-lr", "30", "--presence",
                                             "prior-detached"),
        "constant background, 30x calibration lr, detached presence prior"),
    Row("ws-ae", "presence", (), "WS-AE (tied decoder, ReLU on its own signal in place of the gates)", model="ws-ae"),
    Row("ws-ae+prior-detached", "presence", ("--presence", "prior-detached"), "WS-AE with the detached presence prior",
        model="ws-ae"),
    Row("prior-detached+steps2000", "budget", ("--presence", "prior-detached", "--steps", "2000", "--eval-every",
                                               "100"), "detached presence prior, 2,000 steps"),
    Row("ws-ae+prior-detached+steps2000", "budget", ("--presence", "prior-detached", "--steps", "2000",
                                                     "--eval-every", "100"),
        "WS-AE with the detached presence prior, 2,000 steps", model="ws-ae"),
    # The reference code's training gradient (unroll.reference: LRP-epsilon relevance on live activations, aliased
    # tied weights stepped twice, overwriting unpooling), alone and within the reference code's recipe, each paired
    # with the exact gradient under the same recipe: the pair isolates what the inexact gradient does.
    Row("ref-grad", "gradient", ("--gradient", "reference"), "the reference code's gradient, our recipe"),
    Row("ref-grad+lr3e-4", "gradient", ("--gradient", "reference", "--tied-lr", "3e-4"),
        "the reference code's gradient at lr 3e-4"),
    Row("lr3e-4", "gradient", ("--tied-lr", "3e-4"), "exact gradient at lr 3e-4 (ref-grad+lr3e-4's pair)"),
    Row("ref-grad+lr1e-4", "gradient", ("--gradient", "reference", "--tied-lr", "1e-4"),
        "the reference code's gradient at lr 1e-4"),
    Row("lr1e-4", "gradient", ("--tied-lr", "1e-4"), "exact gradient at lr 1e-4 (ref-grad+lr1e-4's pair)"),
    Row("ref-recipe", "gradient", ("--cls-loss", "reference", "--input", "offset", "--heatmap-scale", "1"),
        "the reference's recipe (soft-margin loss x batch, offset input, plain heatmaps), exact gradient"),
    Row("ref-recipe+ref-grad", "gradient", ("--cls-loss", "reference", "--input", "offset", "--heatmap-scale", "1",
                                            "--gradient", "reference"),
        "the reference's recipe with its gradient"),
)
ROW_NAMES = tuple(r.name for r in ROWS)

QUICK = ("--train-scenes", "60", "--val-scenes", "16", "--test-scenes", "16", "--clf-steps", "10",
         "--eval-every", "2")
QUICK_STEPS = 4  # every row's budget in --quick, three times that for a long-budget row
PLOT_MAX = 12  # more curves than this in one panel are unreadable
LOSS_AT = (10, 50, 100, 200, 1000, 2000)  # training loss reported at these steps (mean over the 10 steps up to it)
REACH = (0.30, 0.40)  # steps to reach these validation mIoUs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.ablation",
                                description="Controlled study of the unrolled model's segmentation training on digit "
                                            "scenes. Writes OUT/results.json, OUT/results.md, OUT/curves.png.")
    p.add_argument("--source", choices=("sklearn", "mnist"), default="sklearn", help="digits source")
    p.add_argument("--root", default=None, help="MNIST folder (default ../shared/data/mnist)")
    p.add_argument("--rows", default="all", help=f"comma-separated row names or 'all': {', '.join(ROW_NAMES)}")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=FLAGS",
                   help="an extra row: a name and bench.digits flags, e.g. 'mine=--input offset --bn frozen'")
    p.add_argument("--labels", default="10,50,250", help="pixel-labelled scene counts (bench.digits --labels)")
    p.add_argument("--seeds", type=integer(1), default=2, help="seeds 0..n-1")
    p.add_argument("--train-scenes", type=integer(1), default=None, help="training scenes (default: bench.digits')")
    p.add_argument("--out", default=None, help="output folder (default runs/ablation-SOURCE)")
    p.add_argument("--jobs", type=integer(1), default=None, help="worker processes (default: CPU cores)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs and continue interrupted ones")
    p.add_argument("--quick", action="store_true", help="CI smoke test: every row, tiny data and budgets")
    p.add_argument("--cached-only", action="store_true",
                   help="train nothing: tabulate the runs already finished in OUT (rows / seeds / N without a "
                        "finished run show '-' or fewer seeds)")
    p.add_argument("--plot", default="auto",
                   help="rows drawn in curves.png (comma-separated names); 'auto': every row when there are at most "
                        f"{PLOT_MAX}, else the {PLOT_MAX} run on the most seeds (the table always has every row)")
    p.add_argument("--list", action="store_true", help="print the rows and exit")
    return p


def _rows(args) -> list[Row]:
    rows = list(ROWS) if args.rows == "all" else []
    if args.rows != "all":
        by_name = {r.name: r for r in ROWS}
        for name in (n.strip() for n in args.rows.split(",") if n.strip()):
            if name not in by_name:
                raise ValueError(f"unknown row {name!r}; rows: {', '.join(ROW_NAMES)}")
            rows.append(by_name[name])
    for spec in args.extra:
        name, sep, flags = spec.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--extra takes NAME=FLAGS, got {spec!r}")
        rows.append(Row(name.strip(), "extra", tuple(flags.split()), flags.strip()))
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"row names repeat: {names}")
    return rows


def _quick_flags(row: Row) -> tuple[str, ...]:
    """A row's flags with its budget shrunk for --quick (a long-budget row stays three times longer)."""
    flags = list(row.flags)
    steps = QUICK_STEPS * 3 if "--steps" in flags else QUICK_STEPS
    if "--steps" in flags:
        i = flags.index("--steps")
        del flags[i:i + 2]
    if "--eval-every" in flags:
        i = flags.index("--eval-every")
        del flags[i:i + 2]
    return (*flags, "--steps", str(steps), "--eval-every", str(max(2, steps // 4)))


def row_tasks(row: Row, args, out: Path) -> list[dict]:
    """bench.digits' tasks for one row, moved into the study's folders: classifiers shared by every row with the same
    data and classifier settings, one folder per row for its segmentation runs."""
    flags = _quick_flags(row) if args.quick else row.flags
    argv = [*BASE, *(QUICK if args.quick else ()), *flags, "--source", args.source, "--seeds", str(args.seeds),
            "--labels", args.labels, "--models", row.model, "--out", str(out), "--no-figures", "--threads", "1"]
    if args.root:
        argv += ["--root", args.root]
    if args.train_scenes:
        argv += ["--train-scenes", str(args.train_scenes)]
    d_args = digits.resolve(digits.build_parser().parse_args(argv))
    data = {k: getattr(d_args, k) for k in ("source", "root", "scene", "size", "input", "backbone", "widths",
                                            "train_scenes", "val_scenes", "test_scenes")}
    n_train = len(digits.datasets(data)["train"])
    tasks = digits.plan(d_args, n_train)
    clf_dirs = {}
    for t in tasks:
        if t["kind"] == "classifier":
            key = f"{args.source}-{d_args.input}"
            new = out / "classifiers" / key / f"seed{t['seed']}"
            clf_dirs[t["dir"]] = str(new)
            # the same classifier whichever row asks (bench.digits' default schedule: eval every 100 steps)
            t.update(dir=str(new), id=f"classifier {key} seed {t['seed']}", tied_eval=True)
            t["train"]["eval_every"] = 10 if args.quick else 100
    for t in tasks:
        if t["kind"] == "seg":
            t["classifier_dir"] = clf_dirs[t["classifier_dir"]]
            t["dir"] = str(out / "runs" / row.name / f"seed{t['seed']}" / f"N{t['labels']}")
            t["id"] = f"{row.name} · seed {t['seed']} · N={t['labels']}"
            t["row"] = row.name
    return tasks


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _std(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.std(v, ddof=1)) if len(v) > 1 else (0.0 if v else None)


def _loss_at(curve: list[float] | None, step: int) -> float | None:
    if not curve or len(curve) < step:
        return None
    return float(np.mean(curve[max(0, step - 10):step]))


def _reach(history: list[dict], level: float) -> int | None:
    return next((h["step"] for h in history if (h.get("val_miou") or 0) >= level), None)


def summarize(rows: list[Row], results: list[dict], counts: list[int], args, wall: float) -> dict:
    clf = {r["task"]["dir"]: r for r in results if r["task"]["kind"] == "classifier"}
    seg = [r for r in results if r["task"]["kind"] == "seg"]
    table = []
    for row in rows:
        runs = [r for r in seg if r["task"]["row"] == row.name]
        entry: dict = {"row": row.name, "group": row.group, "what": row.what, "model": row.model,
                       "flags": list(row.flags), "by_n": {}}
        for n in counts:
            rn = [r for r in runs if r["task"]["labels"] == n]
            entry["by_n"][str(n)] = {
                "test_miou": _mean(r["test"]["miou"] for r in rn), "test_miou_std": _std(r["test"]["miou"] for r in rn),
                "val_miou": _mean(r["best_val"] for r in rn),
                "f1_after": _mean(r["test"]["f1"] for r in rn),
                "f1_before": _mean(clf[r["task"]["classifier_dir"]]["test"]["f1"] for r in rn),
                "best_step": _mean(r["best_step"] for r in rn),
                "loss_at": {str(s): _mean(_loss_at(r.get("step_loss"), s) for r in rn) for s in LOSS_AT},
                "reach": {str(level): [_reach(r["history"], level) for r in rn] for level in REACH},
                "seconds": _mean(r["seconds"] for r in rn),
                "heatmap_scale": _mean(r.get("heatmap_scale") for r in rn),
                "seeds": [r["task"]["seed"] for r in rn],
            }
        table.append(entry)
    return {"format": "unroll-bench-ablation/1", "source": args.source, "label_counts": counts,
            "seeds": args.seeds, "quick": args.quick, "base_flags": list(BASE), "rows": table,
            "runs": [{k: v for k, v in r.items() if k != "reused"} for r in results],
            "timing": {"wall_seconds": wall, "cpu_seconds": sum(r["cpu_seconds"] for r in results)}}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _reach_text(steps: list[int | None]) -> str:
    if not steps:
        return "-"
    got = [s for s in steps if s is not None]
    return f"{int(np.median(got)) if len(got) == len(steps) else '>'}" + ("" if len(got) == len(steps) else
                                                                             f" ({len(got)}/{len(steps)})")


def markdown(res: dict) -> str:
    counts = res["label_counts"]
    n0 = str(counts[0])
    head = (["row", "what"] + [f"test mIoU N={n}" for n in counts] + [f"val mIoU N={n}" for n in counts]
            + [f"F1 after N={n}" for n in counts] + ["F1 before"]
            + [f"loss@{s} (N={n0})" for s in (10, 50, 200, 2000)]
            + [f"steps to val {int(100 * lv)} (N={n0})" for lv in REACH] + ["seeds per N", "s/run"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in res["rows"]:
        b = e["by_n"]
        cells = [e["row"], e["what"]]
        cells += [_pct(b[str(n)]["test_miou"]) + (f" ± {_pct(b[str(n)]['test_miou_std'])}"
                                                  if len(b[str(n)]["seeds"]) > 1 else "") for n in counts]
        cells += [_pct(b[str(n)]["val_miou"]) for n in counts]
        cells += [_pct(b[str(n)]["f1_after"]) for n in counts] + [_pct(b[n0]["f1_before"])]
        cells += ["-" if b[n0]["loss_at"][str(s)] is None else f"{b[n0]['loss_at'][str(s)]:.3f}"
                  for s in (10, 50, 200, 2000)]
        cells += [_reach_text(b[n0]["reach"][str(lv)]) for lv in REACH]
        cells += ["/".join(str(len(b[str(n)]["seeds"])) for n in counts)]
        cells += ["-" if b[n0]["seconds"] is None else f"{b[n0]['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    t = res["timing"]
    return "\n\n".join([
        f"# bench.ablation ({res['source']} digit scenes{', --quick: numbers mean nothing' if res['quick'] else ''})",
        f"Unrolled model (SmallVGG), {res['seeds']} seed(s), mean (± std over seeds) in %. Every row is the base "
        f"recipe `{' '.join(res['base_flags'])}` plus its flags; same classifier checkpoints, labelled scenes and "
        "batches per seed. Selection: best validation mIoU (the val column); test numbers are of the selected "
        "weights. loss@s: mean training loss (CE + weighted BCE) over steps s-9..s at the first N. Steps to val x: "
        "the first evaluation step whose validation mIoU reached x (median over seeds; '>' = not reached by some). "
        "'-': not run (the study ran on 2 CPU cores shared with other jobs; see the seeds column).",
        "\n".join(lines),
        f"Wall {t['wall_seconds'] / 60:.1f} min this invocation; CPU of all runs {t['cpu_seconds'] / 60:.1f} min.",
    ]) + "\n"


def named_rows(names: list[str], spec: str) -> list[str]:
    """The rows --plot names (comma-separated), in the table's order; every name must be a row of the table."""
    wanted = [n.strip() for n in spec.split(",") if n.strip()]
    if not wanted:
        raise ValueError("--plot names no rows (give row names, or 'auto')")
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ValueError(f"--plot names rows not in this table: {', '.join(unknown)}")
    return [n for n in names if n in wanted]


def plot_rows(res: dict, spec: str = "auto") -> list[str]:
    """The rows curves.png draws: the named ones, or with "auto" every row if there are at most PLOT_MAX, else the
    PLOT_MAX run on the most seeds at any N (ties: table order)."""
    names = [e["row"] for e in res["rows"]]
    if spec != "auto":
        return named_rows(names, spec)
    if len(names) <= PLOT_MAX:
        return names
    seeds = {e["row"]: max(len(b.get("seeds") or []) for b in e["by_n"].values()) for e in res["rows"]}
    keep = set(sorted(names, key=lambda n: -seeds[n])[:PLOT_MAX])
    return [n for n in names if n in keep]


def curves_figure(res: dict, path: Path, rows: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n0 = res["label_counts"][0]
    seg = [r for r in res["runs"] if r["task"]["kind"] == "seg"]
    names = rows if rows is not None else plot_rows(res)
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5))
    for i, name in enumerate(names):
        color = cmap(i % 20)
        style = "--" if i >= 20 else "-"
        runs = [r for r in seg if r["task"]["row"] == name and r["task"]["labels"] == n0 and r.get("step_loss")]
        if runs:
            length = min(len(r["step_loss"]) for r in runs)
            curve = np.mean([r["step_loss"][:length] for r in runs], axis=0)
            k = max(1, min(10, length // 10))
            smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
            axes[0].plot(np.arange(k, length + 1), smooth, style, color=color, label=name, lw=1.2)
            hist = runs[0]["history"]
            steps = [h["step"] for h in hist]
            val = np.mean([[h.get("val_miou") or 0 for h in r["history"]][:len(steps)] for r in runs], axis=0)
            axes[1].plot(steps, 100 * val, style, color=color, label=name, lw=1.2)
        e = next(e for e in res["rows"] if e["row"] == name)
        xs = [n for n in res["label_counts"] if e["by_n"][str(n)]["test_miou"] is not None]
        axes[2].plot(xs, [100 * e["by_n"][str(n)]["test_miou"] for n in xs], style + "o", color=color, label=name,
                     lw=1.2, ms=3)
    axes[0].set(xlabel="step", ylabel=f"training loss (N={n0}, mean over seeds)", xscale="log",
                title="training loss per step")
    axes[1].set(xlabel="step", ylabel=f"validation mIoU % (N={n0})", xscale="log", title="validation mIoU")
    axes[2].set(xlabel="pixel-labelled scenes N", ylabel="test mIoU % (selected weights)", xscale="log",
                title="test mIoU vs N")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    shown = "" if len(names) == len(res["rows"]) else f"; {len(names)} of {len(res['rows'])} rows (the table has all)"
    fig.suptitle(f"bench.ablation, {res['source']} digit scenes, up to {res['seeds']} seed(s){shown}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    try:
        rows = _rows(args)
        if args.plot != "auto":  # checked before any training, against the rows asked for
            named_rows([r.name for r in rows], args.plot)
    except ValueError as err:
        parser.error(str(err))
    if args.list:
        for r in ROWS:
            console.print(f"{r.name:12s} {r.group:14s} {r.model:9s} {' '.join(r.flags) or '(base)':40s} {r.what}",
                          highlight=False)
        return 0
    if args.quick:
        args.seeds = 1 if args.seeds == 2 else args.seeds
        args.labels = "10" if args.labels == "10,50,250" else args.labels
    out = Path(args.out or f"runs/ablation-{args.source}{'-quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        tasks = [t for row in rows for t in row_tasks(row, args, out)]
    except FileNotFoundError as err:
        console.print(f"[red]error:[/] {args.source} digits not found: {err}. Pass --root DIR, or --source sklearn.",
                      highlight=False)
        return 2
    except (ValueError, SystemExit) as err:
        parser.error(f"a row's flags are not valid bench.digits flags: {err}")
    unique = {}
    for t in tasks:  # rows share classifiers: train each once
        unique.setdefault(t["dir"], t)
    tasks = list(unique.values())
    if args.cached_only:
        tasks = [t for t in tasks if digits.finished_run(t) is not None]
        args.resume = True
        if not [t for t in tasks if t["kind"] == "seg"]:
            console.print(f"[red]error:[/] --cached-only: no finished runs of these rows in {out}", highlight=False)
            return 1
    counts = sorted({t["labels"] for t in tasks if t["kind"] == "seg"})
    jobs = args.jobs or os.cpu_count() or 1
    console.print(f"[bold]bench.ablation[/]: {len(rows)} rows, {len(tasks)} runs, {jobs} job(s) -> {out}",
                  highlight=False)
    t0 = time.perf_counter()
    try:
        results = digits.execute(tasks, jobs, args.resume, console)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: rerun with --resume to continue from {out}")
        return 130
    res = summarize(rows, results, counts, args, time.perf_counter() - t0)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    curves_figure(res, out / "curves.png", plot_rows(res, args.plot))
    console.print(markdown(res).split("\n\n")[2], highlight=False)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
