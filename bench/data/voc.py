"""PASCAL VOC 2012 for the semi-supervised segmentation protocol.

The protocol:

* pixel labels: ``n`` of the 1464 images of the segmentation ``train`` list, picked by :func:`sample_labelled`;
* image-level labels: every fully annotated VOC 2012 image outside the segmentation ``val`` list
  (:func:`image_level_ids`), read once from the XML annotations and cached (:func:`image_labels`);
* evaluation: the 1449 segmentation ``val`` images at full resolution, label 255 ignored.

Files are found through torchvision's VOC datasets, which expect ``root/VOCdevkit/VOC2012`` and can download the
official trainval tar (``download=True``, about 2 GB; never done by the tests). Every item is a dict::

    {"image": float [3, H, W] (ImageNet-normalised), "mask": long [H, W] (255 = unknown),
     "labels": float [21] multi-hot (background always 1), "has_mask": bool, "id": str}

Image-level-only items carry an all-255 mask, so one loss with ``ignore_index=255`` serves both kinds.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence
from xml.etree import ElementTree

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets import VOCDetection, VOCSegmentation
from torchvision.transforms.v2 import functional as F

from unroll.segmentation import sampling, transforms
from unroll.segmentation.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomScale, make_transform  # noqa: F401

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
NUM_CLASSES = len(CLASSES)  # 21: background + 20 object classes
IGNORE = 255  # VOC's "void" label: object outlines and ambiguous regions; also our "no pixel label"

# Padding colour for crops of uint8 images: the mean, so that it normalises to ~0 (make_transform's fill).
MEAN_UINT8 = tuple(round(255 * m) for m in IMAGENET_MEAN)

BALANCED_MAX = sampling.BALANCED_MAX  # at or below: class-balanced pick; above: follows the data
CACHE_NAME = "unroll_image_labels.json"
_CACHE_FORMAT = "unroll-voc12-image-labels/2"  # /2: entries keyed by the XML's sha1


class VOCMissingError(FileNotFoundError):
    """VOC 2012 is not where we looked."""


# ----------------------------------------------------------------------------------------------------------- files
def find_voc(root: str | os.PathLike, download: bool = False) -> Path:
    """``root/VOCdevkit/VOC2012``, downloading it first with torchvision if asked and absent.

    ``root`` is what torchvision calls root (the folder that holds ``VOCdevkit``).
    """
    root = Path(root).expanduser()
    voc_dir = root / "VOCdevkit" / "VOC2012"
    if download and not voc_dir.is_dir():
        # Only when absent: torchvision would re-extract the whole tar on every call.
        VOCSegmentation(str(root), year="2012", image_set="train", download=True)
    needed = [voc_dir / "JPEGImages", voc_dir / "ImageSets" / "Segmentation"]
    if all(p.is_dir() for p in needed):
        return voc_dir
    hint = ""
    if (root / "JPEGImages").is_dir():
        hint = f" ({root} looks like the VOC2012 folder itself: pass the folder two levels up, holding VOCdevkit)"
    raise VOCMissingError(
        f"PASCAL VOC 2012 not found: expected {voc_dir} with JPEGImages/ and ImageSets/Segmentation/{hint}. "
        f"Pass --root DIR where DIR/VOCdevkit/VOC2012 exists, or add --download to fetch it (~2 GB) into --root."
    )


def split_ids(voc_dir: str | os.PathLike, image_set: str = "train", kind: str = "Segmentation") -> list[str]:
    """Ids of ``ImageSets/<kind>/<image_set>.txt`` (kind "Segmentation" or "Main"), in file order."""
    path = Path(voc_dir) / "ImageSets" / kind / f"{image_set}.txt"
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _annotated_ids(voc_dir: Path) -> list[str]:
    """Images whose XML lists every object of the 20 classes: Main/trainval plus the segmentation images.

    The other XMLs in Annotations/ belong to the action and layout tasks, which annotate people only, so their
    image-level labels would be incomplete. The segmentation lists are added because not all of their images are in
    Main (the 2007 ones, as far as we know; the union costs nothing if they are). To use another pool
    (e.g. the train_aug list), pass its ids to image_labels / VOCImageLevelSet.
    """
    root = str(voc_dir.parent.parent)
    main = VOCDetection(root, year="2012", image_set="trainval").annotations
    seg = VOCSegmentation(root, year="2012", image_set="trainval").images
    return sorted({Path(p).stem for p in main} | {Path(p).stem for p in seg})


def image_level_ids(voc_dir: str | os.PathLike) -> list[str]:
    """Every fully annotated VOC 2012 image outside the segmentation val list (the image-level pool)."""
    voc_dir = Path(voc_dir)
    val = set(split_ids(voc_dir, "val"))
    return [i for i in _annotated_ids(voc_dir) if i not in val]


# ---------------------------------------------------------------------------------------------------------- labels
def multi_hot(class_indices: Iterable[int]) -> np.ndarray:
    """uint8 [21] with ones at the given classes and, always, background (every VOC image has some)."""
    out = np.zeros(NUM_CLASSES, np.uint8)
    out[0] = 1
    out[list(class_indices)] = 1
    return out


def parse_xml_labels(xml_path: str | os.PathLike) -> np.ndarray:
    """Image-level multi-hot from one VOC annotation file (ValueError naming the file when it is malformed).

    Every object counts, ``difficult`` and ``truncated`` ones included: they are in the image (and in the
    segmentation masks), and this is how the usual WSSS label files (e.g. IRN's cls_labels) are made.
    """
    index = {name: k for k, name in enumerate(CLASSES)}
    present = []
    try:
        root = ElementTree.parse(xml_path).getroot()
    except ElementTree.ParseError as err:
        raise ValueError(f"{xml_path}: malformed XML ({err})") from None
    for obj in root.iter("object"):
        name = obj.findtext("name", "").strip()
        if name not in index or name == "background":
            raise ValueError(f"{xml_path}: unknown VOC class {name!r}")
        present.append(index[name])
    return multi_hot(present)


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def image_labels(
    voc_dir: str | os.PathLike,
    ids: Sequence[str] | None = None,
    cache: str | os.PathLike | bool | None = True,
    problems: list | None = None,
) -> dict[str, np.ndarray]:
    """{image_id: uint8 [21] multi-hot} read from Annotations/*.xml, cached as JSON.

    ``ids``: which images (default: every fully annotated image, seg val included — callers pick splits).
    ``cache``: True puts ``unroll_image_labels.json`` beside the data (skipped with a warning when that folder is
    read-only), a path puts it there, False/None turns caching off. Each cached entry is keyed by the SHA-1 of its
    XML file: an edited (or replaced) XML is parsed again, whatever its time stamp says.
    ``problems``: a list to append a :class:`unroll.segmentation.validate.Problem` to per bad XML (missing,
    malformed, unknown class; the id is left out of the result); without it every bad XML is collected and one
    :class:`~unroll.segmentation.validate.DataError` lists them all.
    """
    from unroll.segmentation.validate import DataError, Problem

    voc_dir = Path(voc_dir)
    ids = list(ids) if ids is not None else _annotated_ids(voc_dir)
    cache_path = voc_dir / CACHE_NAME if cache is True else (Path(cache) if cache else None)

    stored: dict = {"labels": {}, "sha1": {}}
    if cache_path is not None and cache_path.is_file():
        try:
            raw = json.loads(cache_path.read_text())
        except json.JSONDecodeError:
            raw = {}
        if raw.get("format") == _CACHE_FORMAT:
            stored = raw
    found: list = []
    labels: dict[str, np.ndarray] = {}
    changed = False
    for i in ids:
        path = voc_dir / "Annotations" / f"{i}.xml"
        try:
            digest = _digest(path)
        except OSError:
            found.append(Problem(str(path), "missing (no annotation for an image the run uses)", i, "image-level"))
            continue
        if stored["sha1"].get(i) == digest and i in stored["labels"]:
            labels[i] = multi_hot(stored["labels"][i])
            continue
        try:
            labels[i] = parse_xml_labels(path)
        except ValueError as err:
            found.append(Problem(str(path), str(err).removeprefix(f"{path}: "), i, "image-level"))
            continue
        stored["labels"][i] = np.flatnonzero(labels[i]).tolist()
        stored["sha1"][i] = digest
        changed = True
    if found and problems is None:
        raise DataError(found)
    if problems is not None:
        problems.extend(found)
    if cache_path is not None and changed:
        payload = {
            "format": _CACHE_FORMAT,
            "classes": list(CLASSES),
            "note": "class indices present per image, from the VOC XML objects (difficult included); sha1 of each "
                    "XML file, so an edited one is read again",
            "labels": stored["labels"],
            "sha1": stored["sha1"],
        }
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(payload))
            tmp.replace(cache_path)  # atomic: concurrent runs never read half a file
        except OSError as err:
            warnings.warn(f"could not write the image-label cache {cache_path}: {err}", stacklevel=2)
    return labels


def read_labels_tsv(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Image-level labels from a TSV: header ``image_id`` + the 20 object class names, then 0/1 rows.

    The format of ``shared/data/voc12/image_labels.tsv``; background is added (always 1).
    """
    lines = Path(path).read_text().splitlines()
    header = lines[0].split("\t")
    if tuple(header[1:]) != CLASSES[1:]:
        raise ValueError(f"{path}: expected columns image_id + {CLASSES[1:]}, got {header}")
    out = {}
    for line in lines[1:]:
        if line.strip():
            image_id, *flags = line.split("\t")
            out[image_id] = multi_hot(k + 1 for k, f in enumerate(flags) if int(f))
    return out


# --------------------------------------------------------------------------------------------------------- sampler
def sample_labelled(ids: Sequence[str], labels: Mapping[str, np.ndarray], n: int, seed: int = 0) -> list[str]:
    """``n`` distinct ids out of ``ids`` to receive pixel labels: :func:`unroll.segmentation.sampling.sample_labelled`
    balancing the 20 object classes (background left out).

    Measured on the official train list: n=20 covers all 20 classes (1-2 images each), n=100 gives 6-7 per class,
    n=500 matches the target shares within 0.01 (L1). Returns the ids sorted.
    """
    return sampling.sample_labelled(ids, labels, n, seed, exclude=(0,), balanced_max=BALANCED_MAX)


# ------------------------------------------------------------------------------------------------------ transforms
def voc_palette() -> np.ndarray:
    """The VOC colour map, uint8 [256, 3] (class k -> colour; 255 -> (224, 224, 192))."""
    palette = np.zeros((256, 3), np.uint8)
    for k in range(256):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):  # the devkit's bit-interleaving: bits of k spread over the high bits of r, g, b
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[k] = (r, g, b)
    return palette


def decode_mask(png: Image.Image) -> np.ndarray:
    """Class indices uint8 [H, W] from a SegmentationClass PNG.

    The official files are palette ("P") images whose pixel values already are the class indices. An RGB
    re-encoding (some mirrors ship those) is mapped back through the VOC colours; unknown colours become 255.
    """
    if png.mode in ("P", "L"):
        return np.array(png, dtype=np.uint8)
    rgb = np.array(png.convert("RGB"), dtype=np.int64)
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    pal = voc_palette().astype(np.int64)
    lut = {int((r << 16) | (g << 8) | b): k for k, (r, g, b) in enumerate(pal) if k < NUM_CLASSES or k == IGNORE}
    out = np.full(code.shape, IGNORE, np.uint8)
    for value, k in lut.items():
        out[code == value] = k
    return out


def _load_image(path: str | os.PathLike) -> tv_tensors.Image:
    with Image.open(path) as im:
        return tv_tensors.Image(F.pil_to_tensor(im.convert("RGB")))


def _load_mask(path: str | os.PathLike) -> tv_tensors.Mask:
    with Image.open(path) as im:
        return tv_tensors.Mask(torch.from_numpy(decode_mask(im)))


# -------------------------------------------------------------------------------------------------------- datasets
class VOCPixelSet(Dataset):
    """Images with SegmentationClass masks: the labelled subset of ``train`` (``ids``) or the ``val`` set.

    ``labels`` of an item are the classes present in its (augmented) mask plus background: after a crop they say
    what the crop shows, which keeps the image-level loss consistent with the pixel loss.
    """

    def __init__(self, root, ids: Sequence[str] | None = None, image_set: str = "train", train: bool | None = None,
                 image_size: int | tuple[int, int] = 320, scale=(0.5, 2.0), download: bool = False):
        voc_dir = find_voc(root, download=download)
        base = VOCSegmentation(str(voc_dir.parent.parent), year="2012", image_set=image_set)
        by_id = {Path(img).stem: (img, mask) for img, mask in zip(base.images, base.masks)}
        self.ids = list(by_id) if ids is None else list(ids)
        missing = [i for i in self.ids if i not in by_id]
        if missing:
            raise KeyError(f"{len(missing)} ids are not in Segmentation/{image_set}.txt, e.g. {missing[:3]}")
        self.files = [by_id[i] for i in self.ids]
        self.train = image_set == "train" if train is None else train
        self.transform = make_transform(self.train, image_size, scale)

    def __len__(self):
        return len(self.ids)

    def sizes(self) -> list[tuple[int, int]] | None:
        """(h, w) of every item as __getitem__ returns it, from the JPEG headers (no decoding); None when training
        (random crops). Lets evaluation batch equal-size full images (unroll.segmentation.train.size_batches)."""
        if self.train:
            return None
        out = []
        for image_path, _ in self.files:
            with Image.open(image_path) as im:
                out.append((im.height, im.width))
        return out

    def __getitem__(self, index):
        image_path, mask_path = self.files[index]
        image, mask = self.transform(_load_image(image_path), _load_mask(mask_path))
        mask = mask.as_subclass(torch.Tensor).long()
        present = torch.unique(mask)
        labels = torch.zeros(NUM_CLASSES)
        labels[present[present < NUM_CLASSES]] = 1
        labels[0] = 1
        return {"image": image.as_subclass(torch.Tensor), "mask": mask, "labels": labels, "has_mask": True,
                "id": self.ids[index]}


class VOCImageLevelSet(Dataset):
    """Images with image-level labels only (mask all 255). ``labels``: from :func:`image_labels`."""

    def __init__(self, root, ids: Sequence[str], labels: Mapping[str, np.ndarray], train: bool = True,
                 image_size: int | tuple[int, int] = 320, scale=(0.5, 2.0), download: bool = False):
        self.voc_dir = find_voc(root, download=download)
        self.ids = list(ids)
        missing = [i for i in self.ids if i not in labels]
        if missing:
            raise KeyError(f"{len(missing)} ids have no image-level labels, e.g. {missing[:3]}")
        self.labels = {i: torch.as_tensor(np.asarray(labels[i]), dtype=torch.float32) for i in self.ids}
        self.train = train
        self.transform = make_transform(train, image_size, scale)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        image = self.transform(_load_image(self.voc_dir / "JPEGImages" / f"{image_id}.jpg"))
        image = image.as_subclass(torch.Tensor)
        mask = torch.full(image.shape[-2:], IGNORE, dtype=torch.long)
        return {"image": image, "mask": mask, "labels": self.labels[image_id].clone(), "has_mask": False,
                "id": image_id}


def pad_collate(batch: list[dict]) -> dict:
    """Stack items of different sizes (full-image evaluation): pad bottom/right, image with 0 (the normalised mean),
    mask with 255 so padding never counts in a metric or a loss."""
    h = max(item["image"].shape[-2] for item in batch)
    w = max(item["image"].shape[-1] for item in batch)

    def pad(t, value):
        return nnf.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=value)

    return {
        "image": torch.stack([pad(item["image"], 0.0) for item in batch]),
        "mask": torch.stack([pad(item["mask"], IGNORE) for item in batch]),
        "labels": torch.stack([item["labels"] for item in batch]),
        "has_mask": torch.tensor([bool(item["has_mask"]) for item in batch]),
        "id": [item["id"] for item in batch],
    }


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Images as the transforms give them (ImageNet-normalised, (..., 3, H, W)) back in [0, 1], on the CPU, for
    figures: the inverse of ``make_transform``'s ``v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)``."""
    return transforms.denormalize(images, IMAGENET_MEAN, IMAGENET_STD)


# ------------------------------------------------------------------------------------------------------ validation
def file_items(voc_dir: str | os.PathLike, groups: Mapping[str, tuple[Sequence[str], bool]]) -> list:
    """The files a run reads, as :class:`unroll.segmentation.validate.Item` (one per id): ``groups`` maps a role
    ("val", "labelled", ...) to (ids, whether their masks are read). An id in several roles is one item with its
    roles joined and its mask read if any role reads it."""
    from unroll.segmentation.validate import Item

    voc_dir = Path(voc_dir)
    roles: dict[str, list[str]] = {}
    masked: set[str] = set()
    for role, (ids, with_mask) in groups.items():
        for i in ids:
            roles.setdefault(i, []).append(role)
            if with_mask:
                masked.add(i)
    return [Item(i, voc_dir / "JPEGImages" / f"{i}.jpg",
                 voc_dir / "SegmentationClass" / f"{i}.png" if i in masked else None, "+".join(r))
            for i, r in roles.items()]


def read_mask_file(path: str | os.PathLike) -> np.ndarray:
    """A SegmentationClass PNG's class indices (decode_mask), fully decoded (truncated files raise OSError)."""
    from unroll.segmentation.validate import open_image

    return decode_mask(open_image(path))
