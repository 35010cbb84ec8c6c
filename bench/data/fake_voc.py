"""A tiny PASCAL VOC 2012 tree for tests and end-to-end smoke runs (real VOC cannot be had everywhere).

The layout is VOC's own (``root/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, Annotations, ImageSets}``), so the
real loaders in :mod:`bench.data.voc` and torchvision's VOC datasets read it unchanged. Each image is a black
(= background's palette colour) canvas with 1-3 rectangles or ellipses, each painted in the VOC palette colour of its
class: a pixel's colour tells its class, which lets tests check that augmentation keeps image and mask aligned.
Masks carry VOC's 255 outline around every object; the XML lists the same objects with their boxes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence
from xml.etree import ElementTree

import numpy as np
from PIL import Image

from bench.data.voc import CLASSES, IGNORE, NUM_CLASSES, voc_palette

SIZES = ((96, 128), (80, 112), (112, 96))  # (H, W): a few, so full-image evaluation sees different sizes


def void_outline(mask: np.ndarray, radius: int = 2) -> np.ndarray:
    """``mask`` with 255 on every pixel within ``radius`` of a label change, like VOC's object outlines."""
    h, w = mask.shape
    padded = np.pad(mask, radius, mode="edge")
    border = np.zeros(mask.shape, bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            border |= padded[dy:dy + h, dx:dx + w] != mask
    return np.where(border, IGNORE, mask).astype(np.uint8)


def _boxes_from_mask(mask: np.ndarray) -> list[tuple[int, tuple[int, int, int, int], bool]]:
    """One object per class present (void excluded): its class and the box around its pixels."""
    objects = []
    for c in np.unique(mask):
        if 0 < c < NUM_CLASSES:
            ys, xs = np.nonzero(mask == c)
            objects.append((int(c), (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), False))
    return objects


def write_voc_sample(
    voc_dir: str | os.PathLike,
    image_id: str,
    rgb: np.ndarray,
    mask: np.ndarray | None = None,
    objects: Sequence[tuple[int, tuple[int, int, int, int], bool]] | None = None,
) -> None:
    """Write one image: JPEGImages/<id>.jpg, Annotations/<id>.xml and, given a mask, SegmentationClass/<id>.png.

    ``mask``: uint8 class indices (255 void), saved as a VOC palette PNG. ``objects``: (class index, (xmin, ymin,
    xmax, ymax) 0-based inclusive, difficult) for the XML; by default one per class present in the mask.
    """
    voc_dir = Path(voc_dir)
    h, w = rgb.shape[:2]
    for sub in ("JPEGImages", "Annotations", "SegmentationClass"):
        (voc_dir / sub).mkdir(parents=True, exist_ok=True)
    # No chroma subsampling: keeps the class colours from bleeding into neighbours.
    Image.fromarray(rgb).save(voc_dir / "JPEGImages" / f"{image_id}.jpg", quality=95, subsampling=0)
    if mask is not None:
        png = Image.fromarray(mask.astype(np.uint8))  # mode L; putpalette turns it into P
        png.putpalette(voc_palette().tobytes())
        png.save(voc_dir / "SegmentationClass" / f"{image_id}.png")
    if objects is None:
        objects = _boxes_from_mask(mask) if mask is not None else []

    ann = ElementTree.Element("annotation")
    ElementTree.SubElement(ann, "folder").text = "VOC2012"
    ElementTree.SubElement(ann, "filename").text = f"{image_id}.jpg"
    size = ElementTree.SubElement(ann, "size")
    for tag, value in (("width", w), ("height", h), ("depth", 3)):
        ElementTree.SubElement(size, tag).text = str(value)
    ElementTree.SubElement(ann, "segmented").text = str(int(mask is not None))
    for c, (x0, y0, x1, y1), difficult in objects:
        obj = ElementTree.SubElement(ann, "object")
        ElementTree.SubElement(obj, "name").text = CLASSES[c]
        ElementTree.SubElement(obj, "pose").text = "Unspecified"
        ElementTree.SubElement(obj, "truncated").text = "0"
        ElementTree.SubElement(obj, "difficult").text = str(int(difficult))
        box = ElementTree.SubElement(obj, "bndbox")
        # VOC boxes are 1-based pixel coordinates.
        for tag, value in (("xmin", x0), ("ymin", y0), ("xmax", x1), ("ymax", y1)):
            ElementTree.SubElement(box, tag).text = str(value + 1)
    ElementTree.ElementTree(ann).write(voc_dir / "Annotations" / f"{image_id}.xml")


def write_lists(voc_dir: str | os.PathLike, lists: Mapping[str, Iterable[str]]) -> None:
    """Write ImageSets files, e.g. ``{"Segmentation/train": ids, "Main/trainval": ids}``."""
    for name, ids in lists.items():
        path = Path(voc_dir) / "ImageSets" / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{i}\n" for i in ids))


def _draw_image(rng: np.random.Generator, classes: Sequence[int], size: tuple[int, int]):
    """Canvas with one shape per class, side by side in equal slots so that none hides another."""
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    objects = []
    slot = w // len(classes)
    yy, xx = np.mgrid[0:h, 0:w]
    for k, c in enumerate(classes):
        bw = int(rng.integers(slot // 2, slot - 4))
        bh = int(rng.integers(h // 3, h - 8))
        x0 = k * slot + int(rng.integers(2, slot - bw - 1))
        y0 = int(rng.integers(4, h - bh - 3))
        x1, y1 = x0 + bw - 1, y0 + bh - 1
        if rng.random() < 0.5:
            shape = (yy >= y0) & (yy <= y1) & (xx >= x0) & (xx <= x1)
        else:
            cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, bh / 2, bw / 2
            shape = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        mask[shape] = c
        ys, xs = np.nonzero(shape)
        objects.append((c, (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), False))
    rgb = voc_palette()[mask]  # colours from the mask before the outline: the image itself has no void
    return rgb, void_outline(mask), objects


def make_fake_voc(root: str | os.PathLike, n_train: int = 8, n_val: int = 4, n_extra: int = 6, seed: int = 0) -> Path:
    """Build ``root/VOCdevkit/VOC2012`` with a handful of images; returns ``root`` (what ``--root`` takes).

    * ``n_train`` / ``n_val`` segmentation images (mask + XML), listed in ImageSets/Segmentation/{train,val,trainval};
    * ``n_extra`` detection-only images (XML, no mask), as image-level training data;
    * like real VOC, the first half of the segmentation images appear in no Main list (VOC 2012's 2007 images), and
      one action-task image (``2012_900000``) has an XML but is in no list — loaders must leave it out.

    Classes are dealt from shuffled decks of all 20, so every class occurs once ``n_train >= 10`` or so; every third
    image marks its second object ``difficult``.
    """
    root = Path(root)
    voc_dir = root / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(seed)
    deck: list[int] = []

    def deal(k):
        while len(deck) < k:
            deck.extend((rng.permutation(NUM_CLASSES - 1) + 1).tolist())
        return [deck.pop(0) for _ in range(k)]

    ids = [f"2012_{k:06d}" for k in range(1, n_train + n_val + n_extra + 1)]
    train, val, extra = ids[:n_train], ids[n_train:n_train + n_val], ids[n_train + n_val:]
    for k, image_id in enumerate(ids):
        classes = deal(int(rng.integers(1, 4)))
        rgb, mask, objects = _draw_image(rng, classes, SIZES[k % len(SIZES)])
        if k % 3 == 0 and len(objects) > 1:
            c, box, _ = objects[1]
            objects[1] = (c, box, True)
        write_voc_sample(voc_dir, image_id, rgb, mask if image_id not in extra else None, objects)

    # An action-layout image: only people annotated, in no Main/Segmentation list.
    rgb, _, objects = _draw_image(rng, [CLASSES.index("person")], SIZES[0])
    write_voc_sample(voc_dir, "2012_900000", rgb, None, objects)

    in_main = lambda split: [i for i in split if i not in train[: n_train // 2] and i not in val[: n_val // 2]]
    write_lists(voc_dir, {
        "Segmentation/train": train,
        "Segmentation/val": val,
        "Segmentation/trainval": train + val,
        "Main/train": in_main(train) + extra,
        "Main/val": in_main(val),
        "Main/trainval": in_main(train) + extra + in_main(val),
    })
    return root
