"""The folder data-set format (unroll.segmentation.folder) and python -m bench.folder train / evaluate / predict, on
generated folders (bench.data.fake_folder); bad files are all reported, by path, before any training; the real
ISBI membrane folder (../shared/data/membrane, masks 0/255) through the value mapping when it is there."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench import folder as cli
from bench.data.fake_folder import CLASSES, make_fake_folder
from unroll.segmentation import folder
from unroll.segmentation.folder import FolderSpec, MaskReader
from unroll.segmentation.validate import DataError

from conftest import shared_data

pytestmark = pytest.mark.usefixtures("one_thread")

MEMBRANE = shared_data() / "membrane"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def train_flags(data, out, model="unrolled", *extra):
    return ["train", str(data), "--out", str(out), "--model", model, "--labels", "3", "--backbone", "small_vgg",
            "--weights", "none", "--image-size", "32", "--batch-size", "4", "--steps", "2", "--eval-every", "1",
            "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_fake_folder(tmp_path_factory.mktemp("folder"), n_masked=10, n_unmasked=3)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One finished unrolled run with a val split (selection), shared by the predict / evaluate tests."""
    out = tmp_path_factory.mktemp("run")
    assert cli.main(train_flags(data_dir, out, "unrolled", "--val-fraction", "0.2", "--steps", "3")) == 0
    return out


# ---------------------------------------------------------------------------------------------------- spec, masks


@pytest.mark.parametrize("kind", ["index", "palette", "values", "colors"])
def test_mask_kinds_decode_to_the_same_classes(kind, tmp_path):
    root = make_fake_folder(tmp_path / kind, n_masked=3, n_unmasked=0, mask_kind=kind)
    ref = make_fake_folder(tmp_path / "ref", n_masked=3, n_unmasked=0, mask_kind="index")
    spec = FolderSpec.load(root)
    assert spec.classes == list(CLASSES)
    for stem in ("img000", "img001", "img002"):
        got = MaskReader(spec)(root / "masks" / f"{stem}.png")
        want = np.asarray(Image.open(ref / "masks" / f"{stem}.png"))
        assert (got == want).all(), kind
    if kind == "palette":  # a palette PNG's indices, not its colours
        assert Image.open(root / "masks" / "img000.png").mode == "P"


def test_unmapped_values_and_colour_masks_are_named(tmp_path):
    root = make_fake_folder(tmp_path / "v", n_masked=2, n_unmasked=0, mask_kind="values")
    spec = FolderSpec.load(root)
    spec.mask_values = {0: 0, 255: 2}  # 128 left out
    with pytest.raises(ValueError, match="value.*128.*no class"):
        MaskReader(spec)(root / "masks" / "img000.png")
    rgb = make_fake_folder(tmp_path / "c", n_masked=2, n_unmasked=0, mask_kind="colors")
    with pytest.raises(ValueError, match="colour->class table"):
        MaskReader(FolderSpec(classes=list(CLASSES)))(rgb / "masks" / "img000.png")
    grey_rgb = tmp_path / "grey.png"  # a 0/255 mask saved as RGB is read as the grey values it shows
    Image.fromarray(np.stack([np.array([[0, 255]], np.uint8)] * 3, -1), "RGB").save(grey_rgb)
    assert MaskReader(FolderSpec(classes=["a", "b"], mask_values={0: 0, 255: 1}))(grey_rgb).tolist() == [[0, 1]]


def test_spec_from_json_txt_and_flags(tmp_path):
    root = make_fake_folder(tmp_path / "t", n_masked=2, n_unmasked=0, spec="txt")
    assert FolderSpec.load(root).classes == list(CLASSES) and FolderSpec.load(root).ignore_index == 255
    (root / "dataset.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    with pytest.raises(ValueError, match="different classes"):
        FolderSpec.load(root)
    (root / "dataset.json").write_text(json.dumps({"classes": list(CLASSES), "mask_value": {}}))
    with pytest.raises(ValueError, match="unknown field"):
        FolderSpec.load(root)
    (root / "dataset.json").write_text(json.dumps({"classes": list(CLASSES), "mask_values": {"0": "cat"}}))
    with pytest.raises(ValueError, match="'cat' is not a class"):
        FolderSpec.load(root)
    spec = FolderSpec.from_json({"classes": ["m", "c"], "mask_values": {"0": "m", "255": "c", "7": "ignore"}})
    assert spec.mask_values == {0: 0, 255: 1, 7: 255}
    assert FolderSpec.from_json(spec.to_json()) == spec  # what checkpoints store reads back the same


# ---------------------------------------------------------------------------------------------------- scan, split


def test_structural_problems_are_all_listed(tmp_path):
    root = make_fake_folder(tmp_path / "s", n_masked=6, n_unmasked=2)
    Image.new("RGB", (8, 8)).save(root / "images" / "img000.jpg")  # a second file with stem img000
    Image.new("L", (8, 8)).save(root / "masks" / "orphan.png")
    with (root / "labels.csv").open("a") as f:
        f.write("img007,square unicorn\nnobody,disk\n")
    (root / "splits").mkdir()
    (root / "splits" / "test.txt").write_text("img001\nimg006\nghost\n")  # img006: no mask
    (root / "splits" / "val.txt").write_text("img001\n")  # overlaps test
    with pytest.raises(DataError) as err:
        folder.scan(root, FolderSpec.load(root))
    text = str(err.value)
    for needle in ("img000.jpg", "orphan.png", "labels.csv:4", "unicorn", "'nobody'", "'ghost'",
                   "img006' has no mask", "must not overlap"):
        assert needle in text, needle
    assert len(err.value.problems) == 7


def test_seeded_split_keeps_evaluation_images_out_of_training(data_dir):
    data = folder.scan(data_dir, FolderSpec.load(data_dir))
    a = folder.split(data, seed=0, test_fraction=0.2, val_fraction=0.2)
    assert a == folder.split(data, seed=0, test_fraction=0.2, val_fraction=0.2)
    assert a != folder.split(data, seed=1, test_fraction=0.2, val_fraction=0.2)
    assert len(a["test"]) == 2 and len(a["val"]) == 2 and len(a["train"]) == 13 - 4
    assert not set(a["train"]) & (set(a["test"]) | set(a["val"])) and not set(a["test"]) & set(a["val"])
    assert set(a["test"]) | set(a["val"]) <= set(data.masks)  # evaluation needs masks
    assert {"img010", "img011", "img012"} <= set(a["train"])  # label-only images always train


def test_split_lists_are_used(tmp_path):
    root = make_fake_folder(tmp_path / "s", n_masked=6, n_unmasked=1)
    (root / "splits").mkdir()
    (root / "splits" / "test.txt").write_text("img004\nimg005\n")
    (root / "splits" / "train.txt").write_text("img000\nimg001\nimg006\n")
    data = folder.scan(root, FolderSpec.load(root))
    assert folder.split(data, seed=5) == {"train": ["img000", "img001", "img006"], "val": [],
                                          "test": ["img004", "img005"]}


def test_labels_from_masks_and_labels_csv(data_dir):
    data = folder.scan(data_dir, FolderSpec.load(data_dir))
    checked = folder.check(data, data.items(data.ids), show_progress=False)
    assert checked.problems == []
    for stem in data.masks:
        present = set(np.unique(MaskReader(data.spec)(data.masks[stem])).tolist()) - {255}
        assert set(np.flatnonzero(data.image_labels(stem)).tolist()) == present | {0}
    assert data.image_labels("img010") is not None and data.image_labels("img010")[0] == 1
    item = folder.FolderImageLevelSet(data, ["img010"], train=True, image_size=32)[0]
    assert item["image"].shape == (3, 32, 32) and (item["mask"] == 255).all() and not item["has_mask"]


# -------------------------------------------------------------------------------------------------------- train


@pytest.mark.parametrize("model", ["unrolled", "unrolled-eps", "unet", "mt-unet", "ws-ae", "fcn"])
def test_every_model_trains_on_a_folder(model, data_dir, tmp_path):
    out = tmp_path / model
    extra = [] if model == "unrolled" else ["--no-figures"]
    assert cli.main(train_flags(data_dir, out, model, *extra)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["format"] == "unroll-bench-folder/1" and m["partial"] is False
    assert 0.0 <= m["miou"] <= 1.0 and list(m["per_class_iou"]) == list(CLASSES)
    assert m["f1"] is not None and m["steps"] == 2 and m["labels"] == 3 and len(m["labelled_ids"]) == 3
    assert not set(m["labelled_ids"]) & set(m["test_ids"]) and m["split"]["test"] == 2
    assert m["image_level_images"] == 13 - 2  # masked train images and the labels.csv ones
    meta = torch.load(out / "ckpt.pt", weights_only=True)["meta"]
    assert meta["model"] == model and meta["classes"] == list(CLASSES) and meta["backbone"] == "small_vgg"
    if model == "unrolled":
        assert (out / "predictions.png").is_file() and (out / "evolution.png").is_file()


def test_resume_matches_uninterrupted_and_rerun_refuses(data_dir, tmp_path, capsys):
    ref, split = tmp_path / "ref", tmp_path / "split"
    extra = ["--steps", "3", "--val-fraction", "0.2", "--no-figures"]
    assert cli.main(train_flags(data_dir, ref, "fcn", *extra)) == 0
    assert cli.main(train_flags(data_dir, split, "fcn", *extra, "--stop-after", "1")) == 0
    assert not (split / "metrics.json").exists()
    capsys.readouterr()
    # the same command again without --resume: refused, the checkpoint kept
    before = (split / "ckpt.pt").read_bytes()
    assert cli.main(train_flags(data_dir, split, "fcn", *extra)) == 2
    assert "unfinished run" in capsys.readouterr().out and (split / "ckpt.pt").read_bytes() == before
    assert cli.main(train_flags(data_dir, split, "fcn", *extra, "--resume")) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, split))
    for key in ("miou", "per_class_iou", "f1", "best_step", "held_out_miou", "labelled_ids", "test_ids"):
        assert a[key] == b[key], key
    assert a["reported"].startswith("best held-out mIoU")
    assert cli.main(train_flags(data_dir, split, "fcn", *extra, "--overwrite")) == 0  # explicit: starts afresh
    assert json.loads((split / "metrics.json").read_text())["miou"] == a["miou"]


def test_bad_files_are_all_reported_before_training(tmp_path, capsys):
    """Truncated image, truncated mask, mask of the wrong size (train and test), class id 37, an unmapped colour:
    one run names every one of them and exits 2 before anything trains; --skip-bad trains without them and lists
    them in metrics.json."""
    root = make_fake_folder(tmp_path / "bad", n_masked=12, n_unmasked=2, image_format="jpg")
    data = folder.scan(root, FolderSpec.load(root))
    test_ids = folder.split(data, seed=0, test_fraction=0.34)["test"]  # 4 test images, 2 broken below
    train_masked = sorted(set(data.masks) - set(test_ids))
    truncate(root / "images" / f"{train_masked[0]}.jpg")
    truncate(root / "masks" / f"{train_masked[1]}.png")
    Image.new("L", (10, 10)).save(root / "masks" / f"{train_masked[2]}.png")  # wrong size, train
    Image.new("L", (11, 9)).save(root / "masks" / f"{test_ids[0]}.png")  # wrong size, test
    m = np.asarray(Image.open(root / "masks" / f"{test_ids[1]}.png")).copy()
    m[0, 0] = 37
    Image.fromarray(m).save(root / "masks" / f"{test_ids[1]}.png")
    truncate(root / "images" / "img013.jpg")  # an image-level-only image
    out = tmp_path / "out"
    assert cli.main(train_flags(root, out, "unrolled", "--test-fraction", "0.34")) == 2
    text = capsys.readouterr().out.replace("\n", " ")
    assert "6 bad file(s)" in text and "--skip-bad" in text
    for path, what in ((f"images/{train_masked[0]}.jpg", "truncated"), (f"masks/{train_masked[1]}.png", "decode"),
                       (f"masks/{train_masked[2]}.png", "10x10"), (f"masks/{test_ids[0]}.png", "11x9"),
                       (f"masks/{test_ids[1]}.png", "37"), ("images/img013.jpg", "truncated")):
        assert path in text, path
        assert what in text.split(path, 1)[1][:200], (path, what)
    assert f"masks/{test_ids[1]}.png: label value(s) 37" in text and "[test]" in text  # the role is shown
    assert not (out / "ckpt.pt").exists() and not (out / "classifier").exists()

    assert cli.main(train_flags(root, out, "unrolled", "--test-fraction", "0.34", "--skip-bad", "--no-figures")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["skipped_files"]) == 6 and m["split"]["test"] == len(test_ids) - 2
    skipped = {s["id"] for s in m["skipped_files"]}
    assert not skipped & set(m["labelled_ids"]) and not skipped & set(m["test_ids"])


def test_evaluation_failure_still_writes_partial_metrics(data_dir, tmp_path, monkeypatch):
    """An evaluation that breaks part-way (here: Ctrl-C on the second test image) writes metrics.json with the
    images it scored, marked partial, and exits 130."""
    real = folder.FolderPixelSet.__getitem__
    calls = {"n": 0}

    def getitem(self, index):
        if not self.train:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real(self, index)

    monkeypatch.setattr(folder.FolderPixelSet, "__getitem__", getitem)
    out = tmp_path / "o"
    assert cli.main(train_flags(data_dir, out, "fcn", "--no-figures", "--eval-batch-size", "1")) == 130
    m = json.loads((out / "metrics.json").read_text())
    assert m["partial"] is True and m["images_scored"] == 1 and m["images_total"] == 2
    assert m["miou"] is not None and "KeyboardInterrupt" in m["error"]


def test_refused_backbone_costs_no_classification_stage(data_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(train_flags(data_dir, out, "unrolled", "--backbone", "efficientnet_b0",
                                "--pretrain-steps", "50")) == 2
    assert "SiLU" in capsys.readouterr().out and not (out / "classifier").exists()


# ------------------------------------------------------------------------------------------- predict / evaluate


def test_predict_needs_only_the_checkpoint(trained, data_dir, tmp_path):
    out = tmp_path / "pred"
    images = [data_dir / "images" / "img000.png", data_dir / "images" / "img011.png"]
    assert cli.main(["predict", "--checkpoint", str(trained / "ckpt.pt"), *map(str, images), "--out", str(out),
                     "--heatmaps", "--no-progress"]) == 0
    for image in images:
        png = Image.open(out / f"{image.stem}.png")
        assert png.mode == "P" and png.size == Image.open(image).size
        assert set(np.unique(np.asarray(png)).tolist()) <= {0, 1, 2}
        maps = np.load(out / f"{image.stem}_maps.npy")
        assert maps.shape == (3, png.size[1], png.size[0])
        assert (maps.argmax(0) == np.asarray(png)).all()  # the mask is the argmax of the maps
    assert (out / "overlay.png").is_file()
    # the written masks are index masks of the folder format: they read back as what was predicted
    assert (MaskReader(FolderSpec(classes=list(CLASSES)))(out / "img000.png") == np.asarray(
        Image.open(out / "img000.png"))).all()
    # a folder works as input; a broken image is named (exit 2) or skipped
    truncate_dir = tmp_path / "in"
    truncate_dir.mkdir()
    for image in images:
        (truncate_dir / image.name).write_bytes(image.read_bytes())
    truncate(truncate_dir / "img011.png")
    assert cli.main(["predict", "--checkpoint", str(trained / "ckpt.pt"), str(truncate_dir), "--out",
                     str(tmp_path / "p2"), "--no-progress"]) == 2
    assert cli.main(["predict", "--checkpoint", str(trained / "ckpt.pt"), str(truncate_dir), "--out",
                     str(tmp_path / "p2"), "--no-progress", "--skip-bad"]) == 0
    assert json.loads((tmp_path / "p2" / "predictions.json").read_text())["skipped_files"][0]["id"] == "img011"


def test_evaluate_reproduces_the_run_metrics(trained, data_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert cli.main(["evaluate", "--checkpoint", str(trained / "ckpt.pt"), str(data_dir), "--split", "test",
                     "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    got, run = json.loads(out.read_text()), json.loads((trained / "metrics.json").read_text())
    assert got["ids"] == run["test_ids"] and got["step"] == run["best_step"]
    assert got["miou"] == pytest.approx(run["miou"], abs=1e-6)
    assert got["per_class_iou"] == pytest.approx(run["per_class_iou"], abs=1e-6)
    # images added to the folder later do not move the run's test split (it is stored in the checkpoint)
    moved = tmp_path / "more"
    shutil.copytree(data_dir, moved)
    for k in range(3):
        for sub in ("images", "masks"):
            shutil.copy(data_dir / sub / "img000.png", moved / sub / f"new{k}.png")
    assert cli.main(["evaluate", "--checkpoint", str(trained / "ckpt.pt"), str(moved), "--out",
                     str(tmp_path / "e2.json"), "--device", "cpu", "--no-progress"]) == 0
    assert json.loads((tmp_path / "e2.json").read_text())["ids"] == run["test_ids"]


def test_checkpoint_without_meta_is_refused(tmp_path, capsys):
    torch.save({"model": {}}, tmp_path / "x.pt")
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "x.pt"), str(tmp_path), "--out",
                     str(tmp_path / "o")]) == 2
    assert "carries no run description" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- real membrane


@pytest.mark.skipif(not MEMBRANE.is_dir(), reason=f"{MEMBRANE} absent (shared data not beside the checkout)")
def test_membrane_folder_reads_through_a_value_mapping():
    """ISBI-2012 membrane masks are 0/255 with 255 a class (cell interior), read as they are."""
    spec = FolderSpec(classes=["membrane", "cell"], mask_values={0: 0, 255: 1})
    data = folder.scan(MEMBRANE, spec)
    assert len(data.images) == 30 and len(data.masks) == 30
    checked = folder.check(data, data.items(data.ids), show_progress=False)
    assert checked.problems == [] and set(checked.sizes.values()) == {(512, 512)}
    assert all(p.tolist() == [True, True] for p in checked.present.values())
    mask = MaskReader(spec)(data.masks["0"])
    raw = np.asarray(Image.open(data.masks["0"]))
    assert (mask == (raw == 255)).all()
    # without the mapping 255 is the ignore value and every cell pixel would be dropped: the run says so
    plain = folder.scan(MEMBRANE, FolderSpec(classes=["membrane", "cell"]))
    folder.check(plain, plain.items(["0", "1"]), show_progress=False)
    (warning,) = cli.absent_class_warnings(plain, plain.spec)
    assert "cell appear in no mask" in warning and "--mask-values 0=membrane,255=cell" in warning
    assert cli.absent_class_warnings(data, spec) == []


@pytest.mark.slow
def test_torchrun_two_processes_on_a_folder(data_dir, tmp_path):
    """DDP through the shared runner: rank 0 validates, every rank gets the result, the run finishes."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "bench.folder",
           *train_flags(data_dir, out, "unrolled", "--no-figures", "--val-fraction", "0.2")]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["environment"]["world_size"] == 2 and m["steps"] == 2 and m["partial"] is False


def test_image_level_f1_of_a_two_class_task():
    """Two classes (background + one): torchmetrics' multilabel F1 needs two labels, so the one object column is
    scored by the binary F1, with the same conventions (background dropped, logit > 0, counts over all images)."""
    from unroll.segmentation.metrics import BinaryObjectF1, MultilabelF1, image_level_f1

    f1 = image_level_f1(2)
    assert isinstance(f1, BinaryObjectF1) and isinstance(image_level_f1(3), MultilabelF1)
    logits = torch.tensor([[5.0, 1.0], [5.0, -1.0], [5.0, 2.0], [-5.0, -3.0]])
    target = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]])
    f1.update(logits[:2], target[:2])
    f1.update(logits[2:], target[2:])
    tp, fp, fn = 1, 1, 1  # rows 0 / 2 / 1 of the object column
    assert float(f1.compute()) == pytest.approx(2 * tp / (2 * tp + fp + fn))


@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_every_flag_has_help(command, capsys):
    import argparse

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    missing = [a.option_strings[0] for a in parser._actions
               if a.option_strings and a.help != argparse.SUPPRESS and not a.help]
    assert missing == []
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--help"])
    assert exit_info.value.code == 0 and "(default: None)" not in capsys.readouterr().out


def test_labels_csv_multi_hot_form(tmp_path):
    root = make_fake_folder(tmp_path / "m", n_masked=2, n_unmasked=2)
    (root / "labels.csv").write_text("image,square,disk\nimg002,1,0\nimg003,1,1\n")
    data = folder.scan(root, FolderSpec.load(root))
    assert data.labels["img002"].tolist() == [1, 1, 0] and data.labels["img003"].tolist() == [1, 1, 1]
    (root / "labels.csv").write_text("image,square\nimg002,1\n")  # a class column missing
    with pytest.raises(DataError, match="missing \\['disk'\\]"):
        folder.scan(root, FolderSpec.load(root))
    (root / "labels.csv").write_text("image,square,disk\nimg002,1,2\n")
    with pytest.raises(DataError, match="labels.csv:2: column disk: '2' is not 0 or 1"):
        folder.scan(root, FolderSpec.load(root))


def test_sampler_balances_any_class_set():
    """The library sampler on a 4-class pool (background + 3, class 3 rare): 3 picks cover the 3 object classes;
    excluding a column takes it out of the balance; deterministic in (ids, labels, seed)."""
    from unroll.segmentation.sampling import sample_labelled

    labels = {f"a{i}": np.array([1, 1, 0, 0]) for i in range(20)}
    labels.update({f"b{i}": np.array([1, 0, 1, 0]) for i in range(20)})
    labels["rare"] = np.array([1, 0, 0, 1])
    picked = sample_labelled(list(labels), labels, 3, seed=0)
    assert "rare" in picked and {p[0] for p in picked} == {"a", "b", "r"}
    assert picked == sample_labelled(sorted(labels, reverse=True), labels, 3, seed=0)
    without_rare_class = sample_labelled(list(labels), labels, 2, seed=0, exclude=(0, 3))
    assert {p[0] for p in without_rare_class} == {"a", "b"}
