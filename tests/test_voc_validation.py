"""Bad data on a fake VOC tree gets one clear report before any training, and nothing is lost: each case of issue 12
part 2 (class id 37 in a val mask, a val mask of the wrong size, a truncated JPEG, a truncated mask PNG, a labelled
mask of the wrong size, a malformed XML), a stale image-label cache after an XML edit, a backbone the compiler
refuses, a rerun over an unfinished run, and an evaluation that breaks part-way."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from bench import voc as cli
from bench.data import voc
from bench.data.fake_voc import make_fake_voc

pytestmark = pytest.mark.usefixtures("one_thread")


def flags(root, out, *extra):
    return ["--root", str(root), "--out", str(out), "--classifier-dir", str(out / "clf"), "--model", "unrolled",
            "--labels", "2", "--backbone", "small_vgg", "--weights", "none", "--image-size", "32", "--batch-size", "4",
            "--steps", "2", "--pretrain-steps", "2", "--eval-every", "1", "--device", "cpu", "--no-progress",
            "--no-figures", *extra]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_fake_voc(tmp_path_factory.mktemp("clean"), n_train=6, n_val=4, n_extra=2, seed=0)


@pytest.fixture()
def tree(clean, tmp_path):
    root = tmp_path / "voc"
    shutil.copytree(clean, root)
    return root


def _dir(root):
    return root / "VOCdevkit" / "VOC2012"


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _labelled(root):
    d = _dir(root)
    labels = voc.image_labels(d, voc.split_ids(d, "train"), cache=False)
    return voc.sample_labelled(voc.split_ids(d, "train"), labels, 2, seed=0)


def _put_value(path, value):
    with Image.open(path) as png:
        m = np.array(png)
        palette = png.getpalette()
    m[0, 0] = value
    out = Image.fromarray(m, "L")
    out.putpalette(palette)
    out.save(path)


def _breakages(root):
    """Each case of the issue, one per file; returns {path (relative to VOC2012): text the report must show}."""
    d = _dir(root)
    val = voc.split_ids(d, "val")
    labelled = _labelled(root)
    pool_only = [i for i in voc.image_level_ids(d) if i not in voc.split_ids(d, "train")]
    _put_value(d / "SegmentationClass" / f"{val[0]}.png", 37)  # class id 37 in a val mask
    Image.new("P", (20, 10)).save(d / "SegmentationClass" / f"{val[1]}.png")  # val mask of the wrong size
    _truncate(d / "JPEGImages" / f"{pool_only[0]}.jpg")  # truncated JPEG (an image-level image)
    _truncate(d / "SegmentationClass" / f"{val[2]}.png")  # truncated mask PNG
    Image.new("P", (16, 12)).save(d / "SegmentationClass" / f"{labelled[0]}.png")  # labelled mask, wrong size
    (d / "Annotations" / f"{pool_only[1]}.xml").write_text("<annotation><object><name>cat</name>")  # malformed
    return {f"SegmentationClass/{val[0]}.png": "37", f"SegmentationClass/{val[1]}.png": "20x10",
            f"JPEGImages/{pool_only[0]}.jpg": "truncated", f"SegmentationClass/{val[2]}.png": "decode",
            f"SegmentationClass/{labelled[0]}.png": "16x12", f"Annotations/{pool_only[1]}.xml": "malformed XML"}


def test_every_bad_file_is_named_before_training(tree, tmp_path, capsys):
    broken = _breakages(tree)
    out = tmp_path / "o"
    assert cli.main(flags(tree, out)) == 2
    text = capsys.readouterr().out.replace("\n", " ")
    assert f"{len(broken)} bad file(s)" in text
    for path, what in broken.items():
        assert path in text, path
        assert what in text.split(path, 1)[1][:160], (path, what)
    # refused before anything ran: no classification stage, no checkpoint; --resume is refused the same way
    assert not (out / "clf").exists() and not (out / "ckpt.pt").exists()
    assert cli.main(flags(tree, out, "--resume")) == 2


@pytest.mark.parametrize("case", ["val id 37", "val size", "jpeg", "mask png", "labelled size", "xml"])
def test_each_case_alone_exits_2(case, tree, tmp_path, capsys):
    d = _dir(tree)
    val = voc.split_ids(d, "val")
    extra = [i for i in voc.image_level_ids(d) if i not in voc.split_ids(d, "train")]
    path = {"val id 37": f"SegmentationClass/{val[0]}.png", "val size": f"SegmentationClass/{val[0]}.png",
            "jpeg": f"JPEGImages/{extra[0]}.jpg", "mask png": f"SegmentationClass/{val[0]}.png",
            "labelled size": f"SegmentationClass/{_labelled(tree)[0]}.png",
            "xml": f"Annotations/{extra[0]}.xml"}[case]
    if case == "val id 37":
        _put_value(d / path, 37)
    elif case in ("val size", "labelled size"):
        Image.new("P", (20, 10)).save(d / path)
    elif case in ("jpeg", "mask png"):
        _truncate(d / path)
    else:
        (d / path).write_text("<annotation><object>")
    assert cli.main(flags(tree, tmp_path / "o")) == 2
    text = capsys.readouterr().out.replace("\n", " ")
    assert "1 bad file(s)" in text and path in text


def test_skip_bad_trains_without_them_and_lists_them(tree, tmp_path):
    broken = _breakages(tree)
    out = tmp_path / "o"
    assert cli.main(flags(tree, out, "--skip-bad")) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {s["path"].split("VOC2012/")[1] for s in m["skipped_files"]} == set(broken)
    bad = {s["id"] for s in m["skipped_files"]}
    assert not bad & set(m["labelled_ids"]) and len(m["labelled_ids"]) == 2  # a bad labelled image is replaced
    assert m["evaluated_on"].startswith("VOC 2012 segmentation val, 1 full images, 3 bad ones left out")


def test_image_label_cache_follows_xml_edits(tree):
    d = _dir(tree)
    ids = voc.split_ids(d, "train")
    first = voc.image_labels(d, ids)
    i = ids[0]
    xml = (d / "Annotations" / f"{i}.xml").read_text()
    old = voc.CLASSES[int(np.flatnonzero(first[i][1:])[0]) + 1]
    new = next(c for c in voc.CLASSES[1:] if len(c) == len(old) and c != old and first[i][voc.CLASSES.index(c)] == 0)
    stat = (d / "Annotations" / f"{i}.xml").stat()
    (d / "Annotations" / f"{i}.xml").write_text(xml.replace(f"<name>{old}</name>", f"<name>{new}</name>"))
    os.utime(d / "Annotations" / f"{i}.xml", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size, same mtime
    again = voc.image_labels(d, ids)
    assert again[i][voc.CLASSES.index(new)] == 1 and again[i][voc.CLASSES.index(old)] == 0
    assert all((again[j] == first[j]).all() for j in ids[1:])


def test_refused_backbone_costs_no_classification_stage(clean, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(flags(clean, out, "--backbone", "efficientnet_b0", "--pretrain-steps", "50")) == 2
    assert "SiLU" in capsys.readouterr().out and not (out / "clf").exists()


def test_rerun_without_resume_keeps_the_unfinished_checkpoint(clean, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(flags(clean, out, "--steps", "3", "--stop-after", "1")) == 0
    before = (out / "ckpt.pt").read_bytes()
    capsys.readouterr()
    assert cli.main(flags(clean, out, "--steps", "3")) == 2
    text = capsys.readouterr().out.replace("\n", " ")
    assert "unfinished run" in text and "--resume" in text and "--overwrite" in text
    assert (out / "ckpt.pt").read_bytes() == before
    assert cli.main(flags(clean, out, "--steps", "3", "--overwrite")) == 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["state"]["step"] == 3


def test_failed_evaluation_writes_partial_metrics(clean, tmp_path, monkeypatch):
    """A val file that breaks after validation (deleted mid-run here) still leaves metrics.json, marked partial."""
    real = voc.VOCPixelSet.__getitem__
    seen = {"n": 0}

    def getitem(self, index):
        if not self.train:
            seen["n"] += 1
            if seen["n"] == 3:
                raise OSError("disk went away")
        return real(self, index)

    monkeypatch.setattr(voc.VOCPixelSet, "__getitem__", getitem)
    out = tmp_path / "o"
    assert cli.main(flags(clean, out, "--eval-batch-size", "1")) == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["partial"] is True and m["images_scored"] == 2 and m["images_total"] == 4
    assert "disk went away" in m["error"] and m["miou"] is not None
