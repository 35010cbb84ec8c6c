"""python -m bench.voc -- one run of the paper's PASCAL VOC 2012 protocol (Table 1 and its ablation).

1. Classifier. ``--classifier PATH`` (a 21-output classifier already fine-tuned on VOC image-level labels) is used
   as is. Otherwise a classification-only stage trains one first from ``--weights`` (imagenet | PATH | none) on the
   image-level pool for ``--pretrain-steps`` / ``--pretrain-epochs`` and caches it in ``--classifier-dir``
   (default OUT/classifier; reused when its settings match, so a grid can share one per backbone and seed).
2. Segmentation. ``--labels N`` of the 1464 segmentation ``train`` images get pixel labels (picked from ``--seed``
   by ``bench.data.voc.sample_labelled``); every VOC 2012 image outside segmentation ``val`` gives image-level
   labels (read once from the XML, cached beside the data). Batches of ``--batch-size`` (10) hold about half of
   each; maps are computed for the pixel-labelled rows only. Loss ``--seg-weight`` x pixel-wise softmax CE over the
   21 stacked maps + ``--cls-weight`` x sigmoid CE on the logits (background weight 0). AdamW, ``--lr`` 1e-5.
   Augmentation: random scale (0.5-2), crop ``--image-size`` (256), horizontal flip. One loop:
   ``unroll.segmentation.train``.
3. Evaluation on the 1449 segmentation ``val`` images, full images, 255 ignored: mIoU, per-class IoU, and the image-
   level macro F1 over the 20 object classes (logit > 0). Val is never used for selection: ``--select-on K`` holds
   out K segmentation-train images outside the N labelled ones and keeps the step with the best held-out mIoU;
   without it (the default) the last step is reported. metrics.json says which.

Before any training, one pass checks every file the run reads (images decode, masks decode, have their image's size
and hold only class ids 0-20 or 255, XMLs parse): each bad file is listed by path and the run exits 2, or
``--skip-bad`` leaves them out (listed in metrics.json). The model is built (compiled) before the classification
stage, so a backbone the compiler refuses costs nothing; an OUT holding a checkpoint is resumed (``--resume``) or
replaced (``--overwrite``), never overwritten silently.

``--protocol reference`` runs the reference code's protocol instead (bench.protocol: its loss weighting, input
scaling, augmentation, 156,800 steps, centre-crop evaluation with void as background, selection on val -- labelled
optimistic in metrics.json and the log -- and the unrolled model on its training gradient, unroll.reference; see
docs/reference_gradient.md). ``--protocol ours`` (the above) is the default.

Writes OUT/metrics.json (always, ``"partial": true`` if the evaluation did not finish), OUT/history.jsonl,
OUT/labelled.txt, OUT/ckpt.pt (every evaluation and on Ctrl-C; ``--resume`` continues exactly), OUT/predictions.png
and OUT/evolution.png (tied models). The experiment itself is ``bench.runner``, shared with ``bench.folder``.

    python -m bench.voc --root ~/data --labels 20                       # unrolled resnet50, 1 GPU
    torchrun --standalone --nproc_per_node=4 -m bench.voc --root ~/data --labels 20 --amp
    python -m bench.voc --root DIR --labels 2 --backbone resnet18 --weights none --image-size 64 \\
        --steps 2 --pretrain-steps 2 --device cpu                       # a smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench import runner
from bench.cli import Help, integer
from bench.protocol import PROTOCOLS
from bench.runner import MODELS
from unroll.segmentation.train import stable_seed
from zoo.segmentation import TIED

__all__ = ["main", "build_parser", "load_experiment", "MODELS", "TIED"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,  # bench.voc_table routes flags by their full names
        prog="python -m bench.voc",
        description="PASCAL VOC 2012 semi-supervised segmentation (the paper's Table 1 protocol), one run. "
                    "Writes OUT/metrics.json, OUT/history.jsonl and figures.",
        formatter_class=Help,
    )
    g = p.add_argument_group("data")
    g.add_argument("--protocol", choices=tuple(PROTOCOLS), default="ours",
                   help="ours (honest: held-out selection, full images) or reference (the reference code's protocol, "
                        "selection on val: optimistic; see bench/protocol.py)")
    g.add_argument("--root", default="data", help="folder holding VOCdevkit/VOC2012 (torchvision's root)")
    g.add_argument("--download", action="store_true", help="download VOC 2012 trainval (~2 GB) into --root if absent")
    g.add_argument("--select-on", type=integer(0), default=0,
                   help="hold out this many segmentation-train images (outside the labelled ones) and keep the "
                        "step with the best held-out mIoU; 0 = report the last step. Val is never used.")
    runner.add_arguments(p, default_out="runs/voc", protocols=tuple(PROTOCOLS.values()))
    return p


def check(args: argparse.Namespace) -> None:
    """What argparse cannot check alone (ValueError -> usage error). Fills the protocol's defaults."""
    protocol = PROTOCOLS[args.protocol]
    runner.fill_protocol_defaults(args, protocol)
    if protocol.select_on_val and args.select_on:
        raise ValueError(f"--select-on: --protocol {protocol.name} selects on val itself (that is what makes it "
                         "optimistic); drop --select-on or use --protocol ours")
    runner.check(args)


def _sample(args, train_ids, labels, bad: set[str]) -> tuple[list[str], list[str]]:
    """The labelled ids and the held-out ids, drawn from the segmentation-train images not known to be bad."""
    from bench.data import voc

    candidates = [i for i in train_ids if i not in bad]
    if args.labels > len(candidates):
        raise ValueError(f"--labels {args.labels} exceeds the {len(candidates)} images of Segmentation/train"
                         + (f" left after {len(train_ids) - len(candidates)} bad ones" if bad else ""))
    labelled = voc.sample_labelled(candidates, labels, args.labels, seed=args.seed)
    held_out: list[str] = []
    if args.select_on:
        rest = sorted(set(candidates) - set(labelled))
        if args.select_on > len(rest):
            raise ValueError(f"--select-on {args.select_on}: only {len(rest)} segmentation-train images lie outside "
                             f"the {args.labels} labelled ones (use a smaller number, or 0 to report the last step)")
        rng = np.random.default_rng(stable_seed(args.seed, "select-on"))
        held_out = sorted(rng.choice(rest, args.select_on, replace=False).tolist())
    return labelled, held_out


def load_experiment(args, rank: int, world: int, console) -> runner.Experiment:
    """Splits, image-level labels (cached beside the data), the labelled and held-out ids, the validation pass over
    every file the run reads, and the datasets."""
    from bench.data import voc
    from unroll.segmentation.validate import DataError, validate

    error = [None]
    if rank == 0:  # one process downloads; the others learn whether the data is there (and never hang on a barrier)
        try:
            voc.find_voc(args.root, download=args.download)
        except voc.VOCMissingError as err:
            error = [str(err)]
    error = runner.from_rank0(error, world)
    if error[0] is not None:
        raise voc.VOCMissingError(error[0])
    voc_dir = voc.find_voc(args.root)
    train_ids = voc.split_ids(voc_dir, "train")
    val_ids = voc.split_ids(voc_dir, "val")
    pool = voc.image_level_ids(voc_dir)
    if args.labels > len(train_ids):
        raise ValueError(f"--labels {args.labels} exceeds the {len(train_ids)} images of Segmentation/train")
    wanted = sorted(set(pool) | set(train_ids))
    problems: list = []
    if rank == 0:  # one process reads the XML and writes the cache; the others read the cache
        labels = voc.image_labels(voc_dir, wanted, problems=problems)
    runner.barrier(world)
    if rank != 0:
        labels = voc.image_labels(voc_dir, wanted, problems=problems)
    checked_ids: set[str] = set()
    while True:  # with --skip-bad a bad labelled image is replaced by another pick, whose files are checked in turn
        bad = {p.id for p in problems}
        labelled, held_out = _sample(args, train_ids, labels, bad)
        items = voc.file_items(voc_dir, {"val": (val_ids, True), "labelled": (labelled, True),
                                         "held-out": (held_out, True),
                                         "image-level": ([i for i in pool if i not in bad], False)})
        todo = [it for it in items if (it.id, it.mask is not None) not in checked_ids]
        found = []
        if rank == 0:
            found = validate(todo, voc.read_mask_file, voc.NUM_CLASSES, show_progress=not args.no_progress,
                             console=console, description="checking VOC files").problems
        found = runner.from_rank0(found, world)
        checked_ids |= {(it.id, it.mask is not None) for it in todo}
        problems += found
        if not found or not args.skip_bad or not {p.id for p in found} & (set(labelled) | set(held_out)):
            break
    if problems and not args.skip_bad:
        raise DataError(problems)
    bad = {p.id for p in problems}
    pool = [i for i in pool if i not in bad]
    val_kept = [i for i in val_ids if i not in bad]
    if not val_kept:
        raise DataError(problems, "no val image is left to evaluate on")
    size = args.image_size
    skipped = f", {len(val_ids) - len(val_kept)} bad ones left out" if len(val_kept) < len(val_ids) else ""
    protocol = PROTOCOLS[args.protocol]
    # the protocol's data recipe: transforms, input scaling, void handling (ours evaluates full images whatever
    # image_size is; the reference crops image_size squares)
    data = {"image_size": size, "recipe": protocol.recipe}
    mean, std = voc.recipe_normalisation(protocol.recipe)
    return runner.Experiment(
        name="voc", classes=list(voc.CLASSES),
        pixel=voc.VOCPixelSet(args.root, ids=labelled, image_set="train", train=True, **data),
        image=voc.VOCImageLevelSet(args.root, pool, labels, train=True, **data),
        held=voc.VOCPixelSet(args.root, ids=held_out, image_set="train", train=False, **data) if held_out else None,
        test=voc.VOCPixelSet(args.root, ids=val_kept, image_set="val", train=False, **data),
        labelled=labelled, held_out=held_out,
        evaluated_on="VOC 2012 segmentation val, " + protocol.evaluation.format(n=len(val_kept), skipped=skipped,
                                                                                size=size),
        source=str(Path(args.root).resolve()), mean=mean, std=std,
        info={"skipped_files": [p.to_dict() for p in problems]},
        data_meta={"data": {"kind": "voc", "recipe": protocol.recipe}}, palette=voc.voc_palette(), protocol=protocol)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    return runner.main(parser.parse_args(argv), parser, load_experiment, check)


if __name__ == "__main__":
    sys.exit(main())
