"""Digit scenes: labels agree with pixels, determinism, disjoint splits, counts, both sources, the file layouts."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.data import data_root
from bench.data.digits import (
    NUM_CLASSES,
    DigitScenes,
    class_names,
    load_source,
    make_digit_scenes,
)

MNIST_ROOT = data_root() / "mnist"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "mnist_train_first10k.npz")
needs_mnist = pytest.mark.skipif(
    not all((MNIST_ROOT / f).is_file() for f in MNIST_FILES),
    reason=f"shared MNIST data not found under {MNIST_ROOT} (set UNROLL_DATA to the shared data folder)",
)

# Per-class counts published with the data (shared/data/README.md) and of the official MNIST test set.
MNIST_TRAIN10K_COUNTS = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def check_labels_match_pixels(ds: DigitScenes, threshold: float = 0.5, gap: int = 2) -> None:
    """Every invariant that ties the image, the mask, the image label and the digit layout together."""
    n, size = len(ds), ds.size
    images = ds.images.float() / 255.0
    masks = ds.masks.long()
    placed = ds.source_ids >= 0

    # Labelled pixels are exactly the digit pixels above threshold (the background is black).
    assert torch.equal(masks > 0, images > threshold)
    assert masks.max() < NUM_CLASSES

    # Each labelled pixel lies in the box of a digit of that class; nothing at all outside the boxes.
    in_any_box = torch.zeros_like(masks, dtype=torch.bool)
    yy = torch.arange(size)[None, :, None]
    xx = torch.arange(size)[None, None, :]
    for j in range(ds.boxes.shape[1]):
        top, left, side = (ds.boxes[:, j, k][:, None, None] for k in range(3))
        in_box = placed[:, j][:, None, None] & (yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side)
        cls = ds.digit_classes[:, j][:, None, None] + 1
        assert not (in_box & (masks > 0) & (masks != cls)).any()
        assert not (in_box & in_any_box).any(), "digit boxes overlap"
        in_any_box |= in_box
    assert not masks[~in_any_box].any() and not images[~in_any_box].any()

    # Boxes inside the canvas and at least `gap` apart.
    for i in range(min(n, 200)):
        boxes = ds.boxes[i][placed[i]].tolist()
        for a, (ty, lx, s) in enumerate(boxes):
            assert 0 <= ty and ty + s <= size and 0 <= lx and lx + s <= size
            for ty2, lx2, s2 in boxes[a + 1 :]:
                assert ty + s + gap <= ty2 or ty2 + s2 + gap <= ty or lx + s + gap <= lx2 or lx2 + s2 + gap <= lx

    # Image label: background always; a digit class exactly when the mask has it, which is exactly the placed classes
    # (no placed digit vanishes below threshold).
    assert (ds.labels[:, 0] == 1).all()
    for k in range(1, NUM_CLASSES):
        assert torch.equal(ds.labels[:, k].bool(), (masks == k).flatten(1).any(1))
        assert torch.equal(ds.labels[:, k].bool(), ((ds.digit_classes == k - 1) & placed).any(1))


def check_digits_are_real(ds: DigitScenes, n: int = 20) -> None:
    """The content of each box is the source digit resized, re-rendered here independently."""
    src = load_source(ds.source, None if ds.source == "sklearn" else MNIST_ROOT)
    for i in range(min(n, len(ds))):
        for j in np.flatnonzero(ds.source_ids[i] >= 0):
            sid, (top, left, side) = int(ds.source_ids[i, j]), ds.boxes[i, j].tolist()
            assert src.labels[sid] == ds.digit_classes[i, j]
            digit = src.images[sid].float()[None, None] / 255
            digit = F.interpolate(digit, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
            expected = (digit[0, 0].clamp(0, 1) * 255).round().to(torch.uint8)
            assert torch.equal(ds.images[i, top : top + side, left : left + side], expected)


@pytest.fixture(scope="module")
def sklearn_scenes() -> dict[str, DigitScenes]:
    return {split: make_digit_scenes("sklearn", split, n_scenes=400, seed=0) for split in ("train", "val", "test")}


# ---------------------------------------------------------------------------------------------------------- sklearn


def test_class_names():
    assert class_names == ["background", "0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]
    assert NUM_CLASSES == 11 == DigitScenes.num_classes


def test_item_format(sklearn_scenes):
    ds = sklearn_scenes["train"]
    assert len(ds) == 400
    item = ds[3]
    assert set(item) == {"image", "mask", "labels"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 64, 64)
    assert item["mask"].dtype == torch.long and item["mask"].shape == (64, 64)
    assert item["labels"].dtype == torch.float32 and item["labels"].shape == (11,)
    assert 0 <= item["image"].min() and item["image"].max() <= 1 and item["image"].max() > 0.5
    assert item["labels"][0] == 1
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch["image"].shape == (8, 1, 64, 64) and batch["mask"].shape == (8, 64, 64)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_sklearn_labels_match_pixels(sklearn_scenes, split):
    check_labels_match_pixels(sklearn_scenes[split])


def test_sklearn_digits_are_real(sklearn_scenes):
    check_digits_are_real(sklearn_scenes["val"])


def test_item_agrees_with_stored_arrays(sklearn_scenes):
    ds = sklearn_scenes["test"]
    for i in (0, 17, 399):
        item = ds[i]
        assert torch.equal(item["image"][0], ds.images[i].float() / 255)
        assert torch.equal(item["mask"], ds.masks[i].long())
        # the per-item statement of "labels match pixels"
        on = item["mask"] > 0
        assert (item["image"][0][on] > 0.5).all()
        assert all(item["labels"][k] == 1 for k in item["mask"].unique().tolist())


def test_deterministic():
    a = make_digit_scenes("sklearn", "train", n_scenes=300, seed=7)
    b = make_digit_scenes("sklearn", "train", n_scenes=300, seed=7)
    c = make_digit_scenes("sklearn", "train", n_scenes=300, seed=8)
    for name in ("images", "masks", "labels", "source_ids", "boxes"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.source_ids, c.source_ids)


def test_source_split_is_a_fixed_stratified_partition():
    src = load_source("sklearn")
    parts = [src.indices(s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [1079, 359, 359]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1797))  # disjoint and complete
    for p in parts:  # stratified: every class, in proportion
        counts = np.bincount(src.labels[p], minlength=10)
        assert counts.min() > 0.9 * len(p) / 10 * 0.9


def test_splits_use_disjoint_source_digits():
    # Different scene seeds on purpose: the source split must not depend on them.
    used = {
        split: set(make_digit_scenes("sklearn", split, n_scenes=2000, seed=seed).source_ids.flatten().tolist()) - {-1}
        for split, seed in (("train", 0), ("val", 1), ("test", 2))
    }
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]
    src = load_source("sklearn")
    for split, ids in used.items():
        assert ids <= set(src.indices(split).tolist())
        assert len(ids) > 0.9 * len(src.indices(split))  # 2000 scenes cover nearly all of a split's digits


def test_counts():
    ds = make_digit_scenes("sklearn", "train", n_scenes=3000, seed=1)
    assert len(ds) == 3000
    per_scene = (ds.source_ids >= 0).sum(1)
    assert per_scene.min() >= 1 and per_scene.max() <= 3
    assert set(per_scene.tolist()) == {1, 2, 3}
    assert 1.9 < per_scene.float().mean() < 2.1  # uniform on {1, 2, 3}, few dropped for lack of room
    assert (ds.labels[:, 1:].sum(0) > 0.05 * 3000).all()  # every digit class is common
    # no scene shows the same source digit twice
    for row in ds.source_ids.tolist():
        row = [s for s in row if s >= 0]
        assert len(row) == len(set(row))
    assert len(make_digit_scenes("sklearn", "val")) == len(load_source("sklearn").indices("val"))
    two = make_digit_scenes("sklearn", "test", n_scenes=500, min_digits=2, max_digits=2, seed=3)
    assert ((two.source_ids >= 0).sum(1) == 2).all()
    check_labels_match_pixels(two)


def test_other_sizes_and_channels():
    ds = make_digit_scenes("sklearn", "val", n_scenes=200, size=96, seed=2, channels=3, scale=(0.2, 0.4))
    item = ds[0]
    assert item["image"].shape == (3, 96, 96) and torch.equal(item["image"][0], item["image"][2])
    sides = ds.boxes[..., 2][ds.source_ids >= 0]
    assert sides.min() >= 19 and sides.max() <= 38
    check_labels_match_pixels(ds)


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_digit_scenes("sklearn", "dev")
    with pytest.raises(ValueError):
        make_digit_scenes("svhn", "train")
    with pytest.raises(ValueError):
        make_digit_scenes("sklearn", "train", scene="triple")
    with pytest.raises(ValueError):
        make_digit_scenes("sklearn", "train", scale=(0.25, 0.75))


def test_single_sklearn():
    ds = make_digit_scenes("sklearn", "test", scene="single")
    src = load_source("sklearn")
    assert len(ds) == 359 and torch.equal(ds.source_ids[:, 0], torch.from_numpy(src.indices("test")))
    item = ds[5]
    assert item["image"].shape == (1, 128, 128) and item["mask"].shape == (128, 128)
    # 8 -> 128 is a 16x nearest upsampling: every source pixel becomes a 16x16 block
    sid = int(ds.source_ids[5, 0])
    assert torch.equal(item["image"][0, ::16, ::16], src.images[sid].float() / 255)
    blocks = (src.images[sid].float() / 255).repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert torch.equal(item["image"][0], blocks)
    cls = int(src.labels[sid]) + 1
    assert set(item["mask"].unique().tolist()) <= {0, cls}
    assert torch.equal(item["mask"] > 0, item["image"][0] > 0.5)
    assert item["labels"].nonzero().flatten().tolist() == [0, cls]
    sampled = make_digit_scenes("sklearn", "train", n_scenes=50, scene="single", seed=4)
    assert len(sampled) == 50 and set(sampled.source_ids[:, 0].tolist()) <= set(src.indices("train").tolist())


def test_fast():
    t0 = time.perf_counter()
    make_digit_scenes("sklearn", "train", n_scenes=2000, seed=11)
    assert time.perf_counter() - t0 < 10.0  # ~0.1 s in practice; guards against a per-pixel Python loop


def test_data_root_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("UNROLL_DATA", str(tmp_path))
    assert data_root() == tmp_path
    monkeypatch.delenv("UNROLL_DATA")
    assert data_root() == Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ------------------------------------------------------------------------------------------------------------ mnist


@needs_mnist
def test_mnist_source_from_shared_data():
    src = load_source("mnist", MNIST_ROOT)
    assert src.images.shape == (20000, 28, 28) and src.images.dtype == torch.uint8
    train, val, test = (src.indices(s) for s in ("train", "val", "test"))
    assert len(train) + len(val) == 10000 and len(test) == 10000 and 950 <= len(val) <= 1050
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(10000))
    assert np.array_equal(test, np.arange(10000, 20000))
    assert np.bincount(src.labels[:10000]).tolist() == MNIST_TRAIN10K_COUNTS
    assert np.bincount(src.labels[10000:]).tolist() == MNIST_TEST_COUNTS
    assert src.images[:10].float().mean() > 20  # real digits, not blanks


@needs_mnist
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_mnist_scenes(split):
    ds = make_digit_scenes("mnist", split, n_scenes=300, seed=0, root=MNIST_ROOT)
    assert len(ds) == 300
    check_labels_match_pixels(ds)
    check_digits_are_real(ds)
    src = load_source("mnist", MNIST_ROOT)
    assert set(ds.source_ids.flatten().tolist()) - {-1} <= set(src.indices(split).tolist())


@needs_mnist
def test_mnist_default_root_and_single():
    ds = make_digit_scenes("mnist", "test", n_scenes=100, scene="single", seed=0)  # root from data_root()
    item = ds[0]
    assert item["image"].shape == (1, 128, 128)
    assert torch.equal(item["mask"] > 0, item["image"][0] > 0.5)
    cls = int(ds.digit_classes[0, 0]) + 1
    assert item["labels"].nonzero().flatten().tolist() == [0, cls] and set(item["mask"].unique().tolist()) == {0, cls}


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 data in the idx format (big-endian magic 0x0000080N, then the N dimensions)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@needs_mnist
def test_mnist_layouts(tmp_path):
    with np.load(MNIST_ROOT / "mnist_train_first10k.npz") as z:
        images, labels = z["images"][::50], z["labels"][::50]  # 200 digits, all classes
    reference = load_source("mnist", MNIST_ROOT)

    # torchvision's folder layout (root/MNIST/raw/, uncompressed)
    raw = tmp_path / "tv" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte", images)
    _write_idx(raw / "train-labels-idx1-ubyte", labels)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(gzip.decompress((MNIST_ROOT / f"{name}.gz").read_bytes()))
    tv = load_source("mnist", tmp_path / "tv")
    assert torch.equal(tv.images[:200], torch.from_numpy(images))
    assert torch.equal(tv.images[200:], reference.images[10000:])
    assert np.array_equal(tv.labels[200:], reference.labels[10000:])

    # test idx alone: test scenes work, train asks for the missing files
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (only_test / f).write_bytes((MNIST_ROOT / f).read_bytes())
    check_labels_match_pixels(make_digit_scenes("mnist", "test", n_scenes=50, root=only_test))
    with pytest.raises(FileNotFoundError):
        make_digit_scenes("mnist", "train", root=only_test)

    # an npz of training digits alone
    only_npz = tmp_path / "only_npz"
    only_npz.mkdir()
    np.savez(only_npz / "small_train.npz", images=images, labels=labels)
    src = load_source("mnist", only_npz)
    assert len(src.indices("train")) == 180 and len(src.indices("val")) == 20
    with pytest.raises(FileNotFoundError):
        src.indices("test")

    with pytest.raises(FileNotFoundError):
        load_source("mnist", tmp_path / "nothing_here")
