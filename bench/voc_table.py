"""python -m bench.voc_table -- the VOC grid (labels x models x backbones x seeds) and the paper's tables from it.

Each cell is one ``python -m bench.voc`` run (or ``torchrun --nproc_per_node=N -m bench.voc`` with ``--nproc N``)
into OUT/<backbone>/<model>/N<labels>/seed<seed>; runs whose metrics.json exists are skipped, an interrupted one
continues (--resume). The classification stage is shared per (backbone, seed): OUT/classifiers/<backbone>/seed<s>.
Then it reads every metrics.json and writes OUT/tables.md:

* Table 1: val mIoU (%) per model (rows) and number of pixel-labelled images (columns), one table per backbone;
* Table 3 (ablation): the tied models (unrolled, unrolled-eps, ws-ae) on every backbone, one row per pair;

each cell mean ± std over the seeds found (sample std; n shown when fewer seeds than asked finished), plus
OUT/tables.json with the raw values. Meant for a GPU machine; ``--dry-run`` prints the commands and runs nothing,
``--collect`` only rebuilds the tables.

    python -m bench.voc_table --root ~/data --dry-run
    python -m bench.voc_table --root ~/data --nproc 4 -- --amp
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

__all__ = ["main", "build_parser", "plan", "collect", "markdown"]

TABLE1_MODELS = ("unrolled", "unet", "mt-unet", "ws-ae", "fcn")
ABLATION_MODELS = ("unrolled", "unrolled-eps", "ws-ae")


def _list(kind):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return [kind(t) for t in items]
    return parse


def _model_name(text: str) -> str:
    from bench.voc import MODELS

    if text not in MODELS:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose from {', '.join(MODELS)}")
    return text


def _count(text: str) -> int:
    from bench.cli import integer

    return integer(1)(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.voc_table",
        description="Run the VOC grid with bench.voc and write Table 1 / Table 3 (mean ± std over seeds). "
                    "Arguments after -- go to every bench.voc run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--root", default="data", help="folder holding VOCdevkit/VOC2012")
    p.add_argument("--labels", type=_list(_count), default=[20, 100, 500, 1464])
    p.add_argument("--models", type=_list(_model_name), default=list(dict.fromkeys(TABLE1_MODELS + ABLATION_MODELS)))
    p.add_argument("--backbones", type=_list(str), default=["resnet50", "vgg16_bn"])
    p.add_argument("--seeds", type=_count, default=3, help="seeds 0..n-1")
    p.add_argument("--out", default="runs/voc_table")
    p.add_argument("--nproc", type=_count, default=1, help="GPUs per run (torchrun --standalone)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--collect", action="store_true", help="only read the metrics.json files and write the tables")
    p.add_argument("--keep-going", action="store_true", help="go on to the next run when one fails")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then flags for every bench.voc run (e.g. -- --amp)")
    return p


def run_dir(out: Path, backbone: str, model: str, labels: int, seed: int) -> Path:
    return out / backbone / model / f"N{labels}" / f"seed{seed}"


def _for_model(extra: list[str], model: str) -> list[str]:
    """The extra flags one run gets: the tied decoder's memory flags are dropped for free-decoder models (bench.voc
    refuses them there), so one `-- --decoder-checkpoint` serves the whole grid."""
    from bench.voc import TIED

    if model in TIED:
        return extra
    kept, skip = [], False
    for e in extra:
        if skip:
            skip = False
        elif e == "--decoder-checkpoint":
            pass
        elif e == "--classes-per-chunk":
            skip = True  # and its value
        elif not e.startswith("--classes-per-chunk="):
            kept.append(e)
    return kept


def plan(args: argparse.Namespace) -> list[dict]:
    """Every run: its folder and its command line. The order keeps a backbone's classifier reused seed by seed."""
    out = Path(args.out)
    extra = [e for e in args.extra if e != "--"]
    launcher = [sys.executable, "-m", "bench.voc"] if args.nproc == 1 else [
        "torchrun", "--standalone", f"--nproc_per_node={args.nproc}", "-m", "bench.voc"]
    runs = []
    for backbone in args.backbones:
        for seed in range(args.seeds):
            for labels in args.labels:
                for model in args.models:
                    d = run_dir(out, backbone, model, labels, seed)
                    cmd = [*launcher, "--root", str(args.root), "--model", model, "--backbone", backbone,
                           "--labels", str(labels), "--seed", str(seed), "--out", str(d),
                           "--classifier-dir", str(out / "classifiers" / backbone / f"seed{seed}"), "--resume",
                           "--no-progress", *_for_model(extra, model)]
                    runs.append({"backbone": backbone, "model": model, "labels": labels, "seed": seed, "dir": d,
                                 "cmd": cmd})
    return runs


def collect(args: argparse.Namespace) -> dict:
    """{backbone: {model: {labels: [metrics dicts over seeds]}}} from the metrics.json files present."""
    found: dict = {}
    for r in plan(args):
        path = r["dir"] / "metrics.json"
        if path.is_file():
            m = json.loads(path.read_text())
            found.setdefault(r["backbone"], {}).setdefault(r["model"], {}).setdefault(r["labels"], []).append(m)
    return found


def _cell(runs: list[dict] | None, seeds: int, key: str = "miou") -> str:
    values = np.array([100 * m[key] for m in runs or [] if m.get(key) is not None])
    if len(values) == 0:
        return "-"
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    cell = f"{values.mean():.1f} ± {std:.1f}"
    return cell if len(values) == seeds else f"{cell} (n={len(values)})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def markdown(args: argparse.Namespace, found: dict) -> str:
    header = ["model"] + [f"N={n}" for n in args.labels]
    parts = ["# PASCAL VOC 2012 val mIoU (%)",
             f"Mean ± std over seeds 0..{args.seeds - 1} (sample std; n = seeds finished when fewer). Each run: "
             "`python -m bench.voc` (see the run's metrics.json for its config and what was reported: the last "
             "step, or the best step on held-out segmentation-train images with --select-on; never val)."]
    for backbone in args.backbones:
        models = [m for m in args.models if m in TABLE1_MODELS] or list(args.models)
        rows = [[m] + [_cell(found.get(backbone, {}).get(m, {}).get(n), args.seeds) for n in args.labels]
                for m in models]
        parts += [f"## Table 1 — {backbone}", _table(header, rows)]
    ablation = [m for m in args.models if m in ABLATION_MODELS]
    if ablation:
        rows = [[f"{m} / {b}"] + [_cell(found.get(b, {}).get(m, {}).get(n), args.seeds) for n in args.labels]
                for b in args.backbones for m in ablation]
        parts += ["## Table 3 — ablation: heatmap rule and decoder gates (model / backbone)",
                  _table(["model / backbone"] + header[1:], rows)]
        rows = [[f"{m} / {b}"] + [_cell(found.get(b, {}).get(m, {}).get(n), args.seeds, "f1") for n in args.labels]
                for b in args.backbones for m in ablation]
        parts += ["### Image-level macro F1 (%) after segmentation training", _table(["model / backbone"] + header[1:],
                                                                                     rows)]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    runs = plan(args)
    if args.dry_run:
        for r in runs:
            print(shlex.join(r["cmd"]))
        print(f"# {len(runs)} runs", file=sys.stderr)
        return 0
    failed = []
    if not args.collect:
        for i, r in enumerate(runs, 1):
            if (r["dir"] / "metrics.json").is_file():
                continue
            print(f"[{i}/{len(runs)}] {r['backbone']} {r['model']} N={r['labels']} seed {r['seed']}", flush=True)
            rc = subprocess.call(r["cmd"])
            if rc == 130:
                print("interrupted: rerun the same command to continue", file=sys.stderr)
                return 130
            if rc != 0:
                failed.append((r, rc))
                if not args.keep_going:
                    print(f"failed ({rc}): {shlex.join(r['cmd'])}", file=sys.stderr)
                    break
    found = collect(args)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(args, found)
    (out / "tables.md").write_text(text)
    raw = {b: {m: {str(n): [{k: v[k] for k in ("miou", "f1", "steps", "best_step", "images_per_s")} for v in runs_]
                           for n, runs_ in ms.items()} for m, ms in bs.items()} for b, bs in found.items()}
    (out / "tables.json").write_text(json.dumps(raw, indent=1))
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
