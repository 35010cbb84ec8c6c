"""python -m bench.folder -- train, evaluate and predict on your own segmentation data (the folder format of
``unroll.segmentation.folder``: DATA/images/, DATA/masks/, classes.txt or dataset.json, optional labels.csv and
splits/; see the README section "Your own data").

    python -m bench.folder train DATA --labels 10 --model unrolled --backbone resnet18 --out runs/mine
    python -m bench.folder evaluate --checkpoint runs/mine/ckpt.pt DATA --split test
    python -m bench.folder predict --checkpoint runs/mine/ckpt.pt IMAGE_OR_FOLDER ... --out preds/ --heatmaps

``train`` is the same experiment as ``bench.voc`` (``bench.runner``: classification stage, N pixel-labelled images
picked class-balanced, mixed batches, metrics.json, history, figures, checkpoints, exact ``--resume``, DDP, AMP)
on the folder's train split, evaluated on its test split. Before any training one pass decodes every image and mask
the run reads and checks sizes and label values: every bad file is listed and the command exits 2 (or
``--skip-bad`` leaves them out, listed in metrics.json). ``evaluate`` and ``predict`` rebuild the model from the
checkpoint alone (model, backbone, classes, mask mapping, normalisation are stored in it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape  # messages hold paths and '[role]' tags, never markup

from bench import runner
from bench.cli import Help, integer, number
from unroll.segmentation.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["main", "build_parser", "load_experiment", "parse_values", "parse_colors"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm"}


# ----------------------------------------------------------------------------------------------------------- parser


def parse_values(text: str) -> dict[str, str]:
    """'0=membrane,255=cell' -> {"0": "membrane", "255": "cell"} (names or indices or 'ignore'; checked later)."""
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError(f"expected VALUE=CLASS pairs separated by commas "
                                             f"(e.g. 0=membrane,255=cell), got {text!r}")
        value, name = (s.strip() for s in part.split("=", 1))
        out[value] = name
    return out


def parse_colors(text: str) -> dict[str, str]:
    """'#000000=background,#ff0000=cat' -> {"#000000": "background", "#ff0000": "cat"} (colours as #rrggbb: an
    'r,g,b' colour would collide with the comma between pairs; dataset.json takes both spellings)."""
    out = {}
    for part in text.split(","):
        if "=" not in part or not part.strip().startswith("#"):
            raise argparse.ArgumentTypeError(f"expected #rrggbb=CLASS pairs separated by commas, got {text!r}")
        colour, name = (s.strip() for s in part.split("=", 1))
        out[colour] = name
    return out


def _ignore(text: str) -> int | str:
    if text.lower() == "none":
        return "none"
    return integer(0)(text)


def _add_spec_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what the masks mean (override DATA/dataset.json and classes.txt)")
    g.add_argument("--spec", default=None, help="a dataset.json to use instead of DATA/dataset.json (read-only data)")
    g.add_argument("--classes", default=None, help="class names, comma-separated (class 0 first: the background)")
    g.add_argument("--mask-values", type=parse_values, default=None,
                   help="raw mask value -> class, e.g. 0=membrane,255=cell (a value may map to 'ignore')")
    g.add_argument("--mask-colors", type=parse_colors, default=None,
                   help="RGB mask colour -> class, e.g. '#000000=background,#ff0000=cat'")
    g.add_argument("--ignore-index", type=_ignore, default=None,
                   help="raw mask value meaning 'no label' for index masks (default 255), or none")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.folder", allow_abbrev=False,
                                description="Semi-supervised segmentation on your own folder of images and masks.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", allow_abbrev=False, formatter_class=Help,
                       help="train on DATA's train split, evaluate on its test split",
                       description="Train one model on a folder data set (the bench.voc experiment on your data).")
    t.add_argument("data", help="the data folder (images/, masks/, ...)")
    _add_spec_args(t)
    g = t.add_argument_group("splits (when DATA has no splits/)")
    g.add_argument("--test-fraction", type=number(0.0, False), default=0.2,
                   help="share of the masked images held out for the final evaluation")
    g.add_argument("--val-fraction", type=number(0.0, False), default=0.0,
                   help="share of the masked images held out to select the step (best mIoU); 0 = report the last")
    g.add_argument("--split-seed", type=integer(0), default=0,
                   help="seed of the split (apart from --seed, so runs of several seeds share their test images)")
    runner.add_arguments(t, default_out="runs/folder", default_backbone="resnet18", default_steps=1000,
                         default_pretrain_steps=0, default_labels=10)

    e = sub.add_parser("evaluate", allow_abbrev=False, formatter_class=Help,
                       help="score a checkpoint on a labelled split",
                       description="Score a trained checkpoint on DATA's images with masks; writes a metrics JSON.")
    e.add_argument("data", help="the data folder")
    e.add_argument("--checkpoint", required=True, help="a run's ckpt.pt")
    e.add_argument("--split", choices=("test", "val", "train", "all"), default="test",
                   help="which images: the split the run used (DATA's splits/, or the run's seeded split), or all "
                        "images with masks")
    e.add_argument("--out", default=None, help="metrics JSON path (default: beside the checkpoint, eval_SPLIT.json)")
    e.add_argument("--batch-size", type=integer(1), default=4, help="full-image evaluation batch")
    e.add_argument("--skip-bad", action="store_true", help="leave out bad files (listed in the JSON)")
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")

    q = sub.add_parser("predict", allow_abbrev=False, formatter_class=Help, help="write predicted masks for images",
                       description="Predict masks (palette PNGs: pixel value = class index) for images or folders.")
    q.add_argument("images", nargs="+", help="image files or folders of images")
    q.add_argument("--checkpoint", required=True, help="a run's ckpt.pt")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--heatmaps", action="store_true",
                   help="also write each image's per-class maps: <stem>_maps.npy (float32 [K, H, W]) and a figure")
    q.add_argument("--no-overlay", action="store_true", help="skip overlay.png (predictions over the images)")
    q.add_argument("--skip-bad", action="store_true", help="leave out images that do not decode (listed)")
    q.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


# ------------------------------------------------------------------------------------------------------------- data


def spec_from(args, base: dict | None = None):
    """The FolderSpec: DATA's dataset.json / classes.txt (or --spec, or a checkpoint's), then the flags."""
    from unroll.segmentation.folder import FolderSpec

    if base is not None:
        spec = FolderSpec.from_json(base, "the checkpoint's spec")
    elif args.spec is not None:
        path = Path(args.spec)
        if not path.is_file():
            raise ValueError(f"--spec {path}: no such file")
        spec = FolderSpec.from_json(json.loads(path.read_text()), str(path))
    else:
        spec = FolderSpec.load(args.data)
    raw = spec.to_json()
    if getattr(args, "classes", None):
        raw["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    if getattr(args, "mask_values", None) is not None:
        raw["mask_values"], raw["mask_colors"] = args.mask_values, None
    if getattr(args, "mask_colors", None) is not None:
        raw["mask_colors"], raw["mask_values"] = args.mask_colors, None
    if getattr(args, "ignore_index", None) is not None:
        raw["ignore_index"] = None if args.ignore_index == "none" else args.ignore_index
    return FolderSpec.from_json(raw, "the flags")


def _validate(data, items, args, console, world: int = 1, rank: int = 0):
    """The validation pass (rank 0; the result reaches every rank). Returns the problems."""
    from unroll.segmentation import folder

    checked = None
    if rank == 0:
        checked = folder.check(data, items, show_progress=not args.no_progress, console=console)
    checked = runner.from_rank0(checked, world)
    data.checked = checked
    return checked.problems


def load_experiment(args, rank: int, world: int, console) -> runner.Experiment:
    """Scan the folder, split it, validate every file the run reads, pick the labelled images, build the sets."""
    from unroll.segmentation import folder
    from unroll.segmentation.sampling import sample_labelled
    from unroll.segmentation.validate import DataError

    spec = spec_from(args)
    data = folder.scan(args.data, spec)
    parts = folder.split(data, seed=args.split_seed, test_fraction=args.test_fraction,
                         val_fraction=args.val_fraction)
    items = (data.items(parts["train"], "train") + data.items(parts["val"], "val")
             + data.items(parts["test"], "test"))
    problems = _validate(data, items, args, console, world, rank)
    if problems and not args.skip_bad:
        raise DataError(problems)
    bad = {p.id for p in problems}
    parts = {name: [i for i in ids if i not in bad] for name, ids in parts.items()}
    if not parts["test"]:
        raise ValueError(f"{args.data}: no test images (images with masks held out for the evaluation): add "
                         "masks, splits/test.txt, or a --test-fraction > 0")
    warnings = absent_class_warnings(data, spec)
    for text in warnings:
        console.print(f"[yellow]warning:[/] {text}", highlight=False)
    masked_train = [i for i in parts["train"] if i in data.masks]
    if args.labels > len(masked_train):
        raise ValueError(f"--labels {args.labels} exceeds the {len(masked_train)} training images with masks")
    labels = {i: data.image_labels(i) for i in masked_train}
    labelled = sample_labelled(masked_train, labels, args.labels, seed=args.seed, exclude=(0,))
    pool = [i for i in parts["train"] if data.image_labels(i) is not None]
    unused = [i for i in parts["train"] if data.image_labels(i) is None]
    size = args.image_size
    mean, std = IMAGENET_MEAN, IMAGENET_STD  # what the backbones' first layers were built for
    held = folder.FolderPixelSet(data, parts["val"], train=False, mean=mean, std=std) if parts["val"] else None
    test = folder.FolderPixelSet(data, parts["test"], train=False, mean=mean, std=std)
    return runner.Experiment(
        name="folder", classes=list(spec.classes),
        pixel=folder.FolderPixelSet(data, labelled, train=True, image_size=size, mean=mean, std=std),
        image=folder.FolderImageLevelSet(data, pool, train=True, image_size=size, mean=mean, std=std),
        held=held, test=test, labelled=labelled, held_out=parts["val"],
        evaluated_on=f"{args.data} test split, {len(parts['test'])} full images"
                     + (f", {spec.ignore_index} ignored" if spec.ignore_index is not None else ""),
        source=str(Path(args.data).resolve()), mean=mean, std=std,
        info={"split": {k: len(v) for k, v in parts.items()}, "test_ids": parts["test"],
              "split_source": "splits/" if data.splits is not None else f"seeded (--split-seed {args.split_seed})",
              "unused_images": unused, "skipped_files": [p.to_dict() for p in problems], "warnings": warnings},
        data_meta={"data": {"kind": "folder", "spec": spec.to_json(), "split_seed": args.split_seed,
                            "test_fraction": args.test_fraction, "val_fraction": args.val_fraction,
                            "split": parts}})


def absent_class_warnings(data, spec) -> list[str]:
    """Classes that no checked mask contains (they cannot be learnt from pixels nor scored), with the likely cause
    when the ignore value is common: a value that is a class in these masks (e.g. 255 in 0/255 masks) read as
    'no label'."""
    present = [p for p in data.checked.present.values()]
    if not present:
        return []
    seen = np.any(np.stack(present), axis=0)
    absent = [spec.classes[k] for k in range(1, spec.num_classes) if not seen[k]]
    if not absent:
        return []
    text = f"class(es) {', '.join(absent)} appear in no mask"
    if spec.mask_values is None and spec.mask_colors is None and spec.ignore_index is not None:
        text += (f"; mask value {spec.ignore_index} is read as 'no label' (the ignore index): if it is a class in "
                 f"these masks, map the values, e.g. --mask-values 0={spec.classes[0]},{spec.ignore_index}="
                 f"{spec.classes[-1]}")
    return [text]


# --------------------------------------------------------------------------------------------------------- evaluate


def evaluate_command(args, console) -> int:
    from unroll.segmentation import folder
    from unroll.segmentation.validate import DataError

    _, _, device = runner.dist_setup(args.device)
    model, meta = runner.load_trained(args.checkpoint, device)
    d = meta.get("data", {})
    if d.get("kind") != "folder":
        raise ValueError(f"{args.checkpoint}: a {d.get('kind')!r} run; bench.folder evaluate scores folder runs")
    spec = folder.FolderSpec.from_json(d["spec"], f"{args.checkpoint} (spec)")
    data = folder.scan(args.data, spec)
    if args.split == "all":
        ids = sorted(data.masks)
    else:  # the run's own split, as stored in the checkpoint: adding images to DATA later does not move it
        stored = d.get("split") or folder.split(data, d["split_seed"], d["test_fraction"], d["val_fraction"])
        ids = [i for i in stored[args.split] if i in data.masks]
        gone = [i for i in stored[args.split] if i not in data.masks]
        if gone:
            raise ValueError(f"{args.data}: {len(gone)} image(s) of the run's {args.split} split have no mask here "
                             f"(e.g. {gone[:3]}): is this the folder the run used? (--split all scores every "
                             "masked image)")
    if not ids:
        raise ValueError(f"{args.data}: no images with masks in the {args.split} split")
    problems = _validate(data, data.items(ids, args.split), args, console)
    if problems and not args.skip_bad:
        raise DataError(problems)
    ids = [i for i in ids if i not in {p.id for p in problems}]
    dataset = folder.FolderPixelSet(data, ids, train=False, mean=meta["mean"], std=meta["std"])
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    k = len(meta["classes"])

    def summary(metrics):
        return {"format": "unroll-bench-folder-eval/1", "miou": metrics["miou"],
                "per_class_iou": dict(zip(meta["classes"], metrics["per_class"] or [None] * k)),
                "f1": metrics["f1"], "evaluated_on": f"{args.data} {args.split} split, {len(ids)} full images",
                "ids": ids, "checkpoint": str(args.checkpoint), "model": meta["model"], "backbone": meta["backbone"],
                "step": meta["step"], "run_finished": meta["finished"],
                "skipped_files": [p.to_dict() for p in problems]}

    metrics, error = runner.evaluate_and_write(model, dataset, k, out, summary, batch_size=args.batch_size,
                                               device=device)
    if error is not None:
        console.print(f"[red]evaluation stopped[/]: {type(error).__name__}: {escape(str(error))}; wrote the partial "
                      f"scores to {out}", highlight=False)
        return 130 if isinstance(error, KeyboardInterrupt) else 1
    console.print(f"mIoU {100 * metrics['miou']:.2f} on {len(ids)} images ({args.split}); wrote {out}",
                  highlight=False)
    return 0


# ---------------------------------------------------------------------------------------------------------- predict


def image_paths(inputs) -> list[Path]:
    """Files as given, folders expanded to their image files (sorted)."""
    out = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(path)
    return out


def save_index_png(path: Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """A palette PNG whose pixel values are the class indices (what the folder format reads back)."""
    from PIL import Image

    png = Image.fromarray(labels.astype(np.uint8), "L")
    png.putpalette(palette.astype(np.uint8).tobytes())
    png.save(path)


def predict_command(args, console) -> int:
    from bench import figures
    from unroll.segmentation.folder import read_image
    from unroll.segmentation.train import predict
    from unroll.segmentation.validate import DataError, Item, validate

    _, _, device = runner.dist_setup(args.device)
    model, meta = runner.load_trained(args.checkpoint, device)
    paths = image_paths(args.images)
    if not paths:
        raise ValueError("no images found in " + " ".join(args.images))
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError("two inputs share a file stem (outputs are named by stem): predict them separately")
    items = [Item(p.stem, p, None, "predict") for p in paths]
    problems = validate(items, None, len(meta["classes"]), read_image=read_image,
                        show_progress=not args.no_progress, console=console).problems
    if problems and not args.skip_bad:
        raise DataError(problems)
    bad = {p.id for p in problems}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    classes = meta["classes"]
    palette = figures.class_palette(len(classes))
    mean = torch.tensor(meta["mean"]).view(3, 1, 1)
    std = torch.tensor(meta["std"]).view(3, 1, 1)
    shown = []
    written = []
    for path in paths:
        if path.stem in bad:
            continue
        rgb = torch.from_numpy(np.array(read_image(path))).permute(2, 0, 1).float() / 255
        x = ((rgb - mean) / std)[None].to(device)
        res = predict(model, x)
        labels = res["pred"][0].cpu().numpy()
        save_index_png(out / f"{path.stem}.png", labels, palette)
        written.append(str(out / f"{path.stem}.png"))
        maps = res["seg"][0].float().cpu()
        if args.heatmaps:
            np.save(out / f"{path.stem}_maps.npy", maps.numpy().astype(np.float32))
            figures.heatmaps_figure(out / f"{path.stem}_maps.png", rgb[None], maps[None], classes,
                                    title=f"{path.name}: per-class maps ({meta['model']})")
        if len(shown) < 6:
            shown.append((path.name, rgb, labels))
    if shown and not args.no_overlay:
        overlay_figure(out / "overlay.png", shown, classes, palette, f"{meta['model']} ({meta['backbone']})")
    (out / "predictions.json").write_text(json.dumps({
        "checkpoint": str(args.checkpoint), "model": meta["model"], "backbone": meta["backbone"], "classes": classes,
        "step": meta["step"], "masks": written, "skipped_files": [p.to_dict() for p in problems],
        "format": "palette PNG, pixel value = class index"}, indent=1))
    console.print(f"wrote {len(written)} masks to {out}" + (f" ({len(bad)} bad images left out)" if bad else ""),
                  highlight=False)
    return 0


def overlay_figure(path, shown, classes, palette, title: str):
    """Up to 6 images with their predicted classes over them (alpha 0.45), and a legend."""
    from bench import figures

    plt = figures.plt
    fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 2.9), squeeze=False)
    present = set()
    for ax, (name, rgb, labels) in zip(axes[0], shown):
        ax.imshow(figures._image(rgb))
        ax.imshow(figures.colorize(labels, palette), alpha=0.45)
        ax.set_title(name, fontsize=7)
        figures._off(ax)
        present |= set(np.unique(labels).tolist())
    figures._legend(fig, sorted(present), palette, classes)
    fig.suptitle(f"predictions: {title}", fontsize=9)
    return figures._save(fig, path)


# ------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from unroll.segmentation.validate import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        return runner.main(args, parser, load_experiment, runner.check)
    console = Console(stderr=False)
    command = evaluate_command if args.command == "evaluate" else predict_command
    try:
        return command(args, console)
    except DataError as err:
        return runner.report_problems(err, console, skip_hint=not args.skip_bad)
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
