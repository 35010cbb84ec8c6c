"""A segmentation data set in a plain folder, its validation, splits and datasets.

The format (every part but ``images/`` optional)::

    DATA/
      images/          one image per sample, any PIL-readable file (png, jpg, tif, ...); the file stem is its id
      masks/           <stem>.<ext> pixel labels for some or all images, matched by stem:
                       - index masks (default): a greyscale or palette PNG whose pixel values are class indices
                         (a palette PNG gives its indices, not its colours); the ignore value (255) = no label;
                       - value masks: raw values mapped to classes by "mask_values" (e.g. 0/255 -> two classes);
                       - colour masks: RGB colours mapped to classes by "mask_colors"
      classes.txt      class names, one per line (line k = class k); class 0 is the background: present in every
                       image, left out of the image-level loss and the F1 score
      dataset.json     instead of / besides classes.txt: {"classes": [...], "ignore_index": 255,
                       "mask_values": {"0": "membrane", "255": "cell"}, "mask_colors": {"#ff0000": "cat", ...}}
                       (a value or colour may map to "ignore"); "ignore_index": null means no ignore value
      labels.csv       image-level labels of images without masks: a header "image,labels" and rows
                       "stem,cat dog" (class names, space or ';' separated), or a header "image,<class>,<class>,..."
                       and 0/1 rows (multi-hot). Images with masks take their labels from the mask.
      splits/          train.txt, val.txt, test.txt: stems, one per line. Without them: a seeded split of the masked
                       images (test, and val if asked) -- evaluation images never enter training, not even as
                       image-level samples.

Every spec field can also come from the caller (the CLI's flags), so a read-only folder such as the ISBI membrane
images (masks 0/255, 255 a class) is used as it is: ``FolderSpec(classes=["membrane", "cell"],
mask_values={0: 0, 255: 1})``.

    data = scan("DATA", FolderSpec.load("DATA"))         # structure: stems, labels.csv, splits (DataError if bad)
    checked = check(data, data.items(data.ids))           # every image and mask decoded once (DataError if bad)
    parts = split(data, seed=0, test_fraction=0.2)        # {"train", "val", "test"}: lists of stems
    train_set = FolderPixelSet(data, labelled, train=True, image_size=128)
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from unroll.segmentation.validate import IGNORE, Checked, DataError, Item, Problem, open_image, validate

__all__ = [
    "IGNORE", "SPLITS", "FolderSpec", "FolderData", "MaskReader", "scan", "check", "split", "read_image",
    "FolderPixelSet", "FolderImageLevelSet", "DataError",
]

SPLITS = ("train", "val", "test")
SPEC_NAME = "dataset.json"


# ------------------------------------------------------------------------------------------------------------- spec
@dataclass
class FolderSpec:
    """What the masks mean. ``mask_values`` / ``mask_colors`` map raw mask values / RGB colours to a class index
    or IGNORE; without either, mask values are class indices and ``ignore_index`` the raw "no label" value."""

    classes: list[str] = field(default_factory=list)
    ignore_index: int | None = IGNORE
    mask_values: dict[int, int] | None = None
    mask_colors: dict[tuple[int, int, int], int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        """JSON-able, the format of dataset.json (classes by name)."""
        def name(k):
            return "ignore" if k == IGNORE else self.classes[k]

        out: dict = {"classes": list(self.classes), "ignore_index": self.ignore_index}
        if self.mask_values is not None:
            out["mask_values"] = {str(v): name(k) for v, k in self.mask_values.items()}
        if self.mask_colors is not None:
            out["mask_colors"] = {"#%02x%02x%02x" % c: name(k) for c, k in self.mask_colors.items()}
        return out

    @classmethod
    def from_json(cls, raw: Mapping, where: str = "dataset.json") -> FolderSpec:
        unknown = set(raw) - {"classes", "ignore_index", "mask_values", "mask_colors"}
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} (known: classes, ignore_index, "
                             "mask_values, mask_colors)")
        classes = [str(c) for c in raw.get("classes") or []]
        spec = cls(classes=classes, ignore_index=raw.get("ignore_index", IGNORE))
        if raw.get("mask_values") is not None:
            spec.mask_values = {parse_int(v, where): class_index(k, classes, where)
                                for v, k in raw["mask_values"].items()}
        if raw.get("mask_colors") is not None:
            spec.mask_colors = {parse_colour(c, where): class_index(k, classes, where)
                                for c, k in raw["mask_colors"].items()}
        spec.check(where)
        return spec

    @classmethod
    def load(cls, root: str | os.PathLike, **overrides) -> FolderSpec:
        """dataset.json and/or classes.txt of ``root``, then the non-None ``overrides`` (field name -> value)."""
        root = Path(root)
        spec = cls()
        path = root / SPEC_NAME
        if path.is_file():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
            spec = cls.from_json(raw, str(path))
        names = root / "classes.txt"
        if names.is_file():
            listed = [line.strip() for line in names.read_text().splitlines() if line.strip()]
            if spec.classes and spec.classes != listed:
                raise ValueError(f"{names} and {path} name different classes: {listed} vs {spec.classes}")
            spec.classes = listed
        for key, value in overrides.items():
            if value is not None:
                setattr(spec, key, value)
        spec.check(str(root))
        return spec

    def check(self, where: str) -> None:
        if self.classes and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"{where}: class names repeat: {self.classes}")
        if len(self.classes) >= IGNORE:
            raise ValueError(f"{where}: {len(self.classes)} classes; at most {IGNORE - 1} (255 marks 'no label')")
        if self.mask_values is not None and self.mask_colors is not None:
            raise ValueError(f"{where}: give mask_values or mask_colors, not both")
        for table in (self.mask_values, self.mask_colors):
            for k in (table or {}).values():
                if k != IGNORE and not 0 <= k < max(len(self.classes), 1):
                    raise ValueError(f"{where}: a mask mapping points at class {k}; there are "
                                     f"{len(self.classes)} classes")


def parse_int(text, where: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: mask value {text!r} is not an integer") from None


def parse_colour(text, where: str) -> tuple[int, int, int]:
    """'#rrggbb', 'r,g,b' or [r, g, b] -> (r, g, b)."""
    if isinstance(text, (list, tuple)):
        parts = list(text)
    elif isinstance(text, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", text.strip()):
        h = text.strip()[1:]
        parts = [int(h[i:i + 2], 16) for i in (0, 2, 4)]
    else:
        parts = str(text).replace(" ", "").split(",")
    try:
        rgb = tuple(int(p) for p in parts)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"{where}: colour {text!r}: expected '#rrggbb' or 'r,g,b' (0-255)")
    return rgb


def class_index(name, classes: Sequence[str], where: str) -> int:
    """A class name, an index, or 'ignore' -> index (IGNORE for 'ignore')."""
    if name == "ignore":
        return IGNORE
    if isinstance(name, str) and name in classes:
        return list(classes).index(name)
    try:
        k = int(name)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name!r} is not a class ({', '.join(classes) or 'no classes given'}), "
                         "an index or 'ignore'") from None
    return k


# ------------------------------------------------------------------------------------------------------------ masks
class MaskReader:
    """``reader(path) -> int64 [H, W]`` class indices (IGNORE = no label) from a mask file under a spec.

    Raises ValueError (naming the values or colours) where the mapping has no entry: an unmapped value is a question
    only the user can answer. In index mode values are passed through (the validation pass reports values that are
    no class), the raw ignore value becoming IGNORE."""

    def __init__(self, spec: FolderSpec):
        self.spec = spec

    def raw(self, path) -> np.ndarray:
        im = open_image(path)
        if im.mode == "1":
            im = im.convert("L")  # bilevel: 0 / 255, as the file shows it
        if im.mode in ("RGB", "RGBA", "LA", "PA") and self.spec.mask_colors is None:
            arr = np.asarray(im.convert("RGB"))
            if not ((arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()):
                raise ValueError(f"colour ({im.mode}) mask: give a colour->class table (mask_colors in "
                                 "dataset.json, or --mask-colors), or save index masks")
            return arr[..., 0].astype(np.int64)  # a grey image stored as RGB
        if self.spec.mask_colors is not None:
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
            return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        return np.asarray(im).astype(np.int64)  # L, P (indices), I;16, I

    def __call__(self, path) -> np.ndarray:
        raw = self.raw(path)
        spec = self.spec
        if spec.mask_colors is not None:
            table = {(r << 16) | (g << 8) | b: k for (r, g, b), k in spec.mask_colors.items()}
            what = "colour(s)"
            show = lambda v: "#%06x" % v  # noqa: E731
        elif spec.mask_values is not None:
            table, what, show = dict(spec.mask_values), "value(s)", str
        else:
            out = raw.copy()
            if spec.ignore_index is not None:
                out[raw == spec.ignore_index] = IGNORE
            return out
        values, inverse = np.unique(raw, return_inverse=True)
        missing = [v for v in values.tolist() if v not in table]
        if missing:
            listed = ", ".join(show(v) for v in missing[:8]) + (" ..." if len(missing) > 8 else "")
            known = ", ".join(show(v) for v in table)
            raise ValueError(f"mask {what} {listed} have no class in the mapping ({known})")
        return np.array([table[v] for v in values.tolist()], np.int64)[inverse.reshape(raw.shape)]


def read_image(path) -> "object":
    """A PIL RGB image from any PIL-readable file. 16-bit greyscale is scaled from its full range (/257);
    32-bit integer or float images are refused (their range is unknown: convert them to 8 or 16 bit)."""
    im = open_image(path)
    if im.mode in ("I;16", "I;16B", "I;16L"):
        from PIL import Image

        arr = (np.asarray(im).astype(np.float64) / 257.0).round().astype(np.uint8)
        im = Image.fromarray(arr, "L")
    elif im.mode in ("I", "F"):
        raise ValueError(f"{im.mode} (32-bit) image: its value range is unknown; save it as 8- or 16-bit")
    return im.convert("RGB")


# ------------------------------------------------------------------------------------------------------------ scan
@dataclass
class FolderData:
    """A scanned folder: what each stem has. ``labels`` holds the labels.csv rows (multi-hot uint8 [K])."""

    root: Path
    spec: FolderSpec
    images: dict[str, Path]
    masks: dict[str, Path]
    labels: dict[str, np.ndarray]
    splits: dict[str, list[str]] | None  # from splits/*.txt, None when the folder has none
    checked: Checked | None = None  # after check(): sizes and mask-derived labels

    @property
    def ids(self) -> list[str]:
        return sorted(self.images)

    def items(self, ids: Iterable[str], role: str = "") -> list[Item]:
        return [Item(i, self.images[i], self.masks.get(i), role) for i in ids]

    def image_labels(self, stem: str) -> np.ndarray | None:
        """Multi-hot uint8 [K]: from the mask (after check()), else from labels.csv, else None."""
        if stem in self.masks and self.checked is not None and stem in self.checked.present:
            out = self.checked.present[stem].astype(np.uint8)
            out[0] = 1  # the background is in every image (and weighs nothing in the loss)
            return out
        return self.labels.get(stem)


def _index_files(folder: Path, problems: list[Problem]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.stem in out:
            problems.append(Problem(str(path), f"two files with the stem {path.stem!r} "
                                               f"({out[path.stem].name}, {path.name}): keep one"))
            continue
        out[path.stem] = path
    return out


def read_labels_csv(path: Path, classes: Sequence[str], problems: list[Problem]) -> dict[str, np.ndarray]:
    """labels.csv -> {stem: multi-hot uint8 [K]}; bad rows become problems naming the line."""
    out: dict[str, np.ndarray] = {}
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return out
    header = [h.strip() for h in rows[0]]
    names_form = [h.lower() for h in header] == ["image", "labels"]
    if not names_form:
        unknown = [h for h in header[1:] if h not in classes]
        missing = [c for c in classes[1:] if c not in header[1:]]
        if header[:1] != ["image"] or unknown or missing:
            problems.append(Problem(str(path), f"header {header}: expected 'image,labels' or 'image' and one "
                                               f"column per class {list(classes)[1:]}"
                                               + (f"; unknown {unknown}" if unknown else "")
                                               + (f"; missing {missing}" if missing else "")))
            return out
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        stem, rest = row[0].strip(), row[1:]
        vec = np.zeros(len(classes), np.uint8)
        vec[0] = 1
        try:
            if names_form:
                for name in re.split(r"[;\s]+", ",".join(rest).strip()):
                    if name:
                        if name not in classes:
                            raise ValueError(f"unknown class {name!r} (classes: {', '.join(classes)})")
                        vec[list(classes).index(name)] = 1
            else:
                if len(rest) != len(header) - 1:
                    raise ValueError(f"{len(rest)} values for {len(header) - 1} columns")
                for name, value in zip(header[1:], rest):
                    if value.strip() not in ("0", "1"):
                        raise ValueError(f"column {name}: {value!r} is not 0 or 1")
                    vec[list(classes).index(name)] = int(value)
        except ValueError as err:
            problems.append(Problem(f"{path}:{line}", str(err), stem))
            continue
        if stem in out:
            problems.append(Problem(f"{path}:{line}", f"{stem!r} is listed twice", stem))
        out[stem] = vec
    return out


def scan(root: str | os.PathLike, spec: FolderSpec) -> FolderData:
    """The folder's structure; a DataError listing every structural problem (duplicate stems, masks or labels of
    no image, unknown classes in labels.csv, split lists naming unknown or overlapping stems)."""
    root = Path(root)
    if not (root / "images").is_dir():
        raise FileNotFoundError(f"{root}: no images/ folder (the folder format: DATA/images/, DATA/masks/, ...)")
    if not spec.classes:
        raise ValueError(f"{root}: no class names: write {root / 'classes.txt'} (one per line) or "
                         f"{root / SPEC_NAME}, or pass --classes")
    problems: list[Problem] = []
    images = _index_files(root / "images", problems)
    masks = _index_files(root / "masks", problems) if (root / "masks").is_dir() else {}
    for stem, path in masks.items():
        if stem not in images:
            problems.append(Problem(str(path), f"mask without an image (no images/{stem}.*)", stem))
    masks = {s: p for s, p in masks.items() if s in images}
    labels = {}
    if (root / "labels.csv").is_file():
        labels = read_labels_csv(root / "labels.csv", spec.classes, problems)
        for stem in [s for s in labels if s not in images]:
            problems.append(Problem(str(root / "labels.csv"), f"{stem!r} has no image in images/", stem))
            labels.pop(stem)
    splits = None
    if (root / "splits").is_dir():
        splits = {}
        for name in SPLITS:
            path = root / "splits" / f"{name}.txt"
            if not path.is_file():
                continue
            stems = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
            for stem in stems:
                if stem not in images:
                    problems.append(Problem(str(path), f"{stem!r} has no image in images/", stem))
                elif name != "train" and stem not in masks:
                    problems.append(Problem(str(path), f"{stem!r} has no mask: {name} images are scored and need "
                                                       "one", stem))
            splits[name] = [s for s in stems if s in images]
        seen: dict[str, str] = {}
        for name, stems in splits.items():
            for stem in stems:
                if stem in seen and seen[stem] != name:
                    problems.append(Problem(str(root / "splits" / f"{name}.txt"),
                                            f"{stem!r} is also in {seen[stem]}.txt: splits must not overlap", stem))
                seen.setdefault(stem, name)
        if not splits:
            splits = None
    if problems:
        raise DataError(problems, "fix these files (the folder format: README, 'Your own data')")
    return FolderData(root, spec, images, masks, labels, splits)


def check(data: FolderData, items: Sequence[Item], *, workers: int | None = None, show_progress: bool = True,
          console=None) -> Checked:
    """The validation pass over ``items`` (see unroll.segmentation.validate); stores the result in
    ``data.checked`` (sizes, mask-derived labels) and returns it. Problems are returned, not raised: the caller
    decides (exit, or --skip-bad)."""
    checked = validate(items, MaskReader(data.spec), data.spec.num_classes, read_image=read_image, workers=workers,
                       show_progress=show_progress, console=console, description="checking images and masks")
    data.checked = checked
    return checked


def split(data: FolderData, seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.0
          ) -> dict[str, list[str]]:
    """{"train", "val", "test"} stems. From splits/*.txt when the folder has them (train: the listed ones, or
    every image not in val/test); otherwise a seeded split of the masked images (at least one test image when two
    or more have masks). Images without masks always go to train."""
    if data.splits is not None:
        held = set(data.splits.get("val", [])) | set(data.splits.get("test", []))
        train = data.splits.get("train") or [s for s in data.ids if s not in held]
        return {"train": sorted(train), "val": sorted(data.splits.get("val", [])),
                "test": sorted(data.splits.get("test", []))}
    masked = sorted(data.masks)
    rng = np.random.default_rng(seed)
    order = [masked[i] for i in rng.permutation(len(masked))]
    n_test = round(test_fraction * len(masked))
    if test_fraction > 0 and len(masked) >= 2:
        n_test = max(1, n_test)
    n_val = round(val_fraction * len(masked))
    if val_fraction > 0 and len(masked) - n_test >= 2:
        n_val = max(1, n_val)
    test, val = order[:n_test], order[n_test:n_test + n_val]
    held = set(test) | set(val)
    return {"train": sorted(s for s in data.ids if s not in held), "val": sorted(val), "test": sorted(test)}


# --------------------------------------------------------------------------------------------------------- datasets
def _load_pair(data: FolderData, stem: str, with_mask: bool):
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    image = tv_tensors.Image(F.pil_to_tensor(read_image(data.images[stem])))
    if not with_mask:
        return image, None
    mask = MaskReader(data.spec)(data.masks[stem])
    return image, tv_tensors.Mask(torch.from_numpy(mask))


class FolderPixelSet(Dataset):
    """Images with their masks (pixel-labelled training, or evaluation at full size with ``train=False``).
    Items as every dataset of the training loop: {"image", "mask", "labels" (classes in the augmented mask, plus
    the background), "has_mask": True, "id"}."""

    def __init__(self, data: FolderData, ids: Sequence[str], train: bool, image_size: int | tuple[int, int] = 256,
                 scale=(0.5, 2.0), mean=None, std=None):
        from unroll.segmentation.transforms import IMAGENET_MEAN, IMAGENET_STD, make_transform

        missing = [i for i in ids if i not in data.masks]
        if missing:
            raise KeyError(f"{len(missing)} ids have no mask, e.g. {missing[:3]}")
        self.data, self.ids, self.train = data, list(ids), train
        self.transform = make_transform(train, image_size, scale, mean or IMAGENET_MEAN, std or IMAGENET_STD)

    def __len__(self):
        return len(self.ids)

    def sizes(self) -> list[tuple[int, int]] | None:
        """(h, w) per item for equal-size evaluation batches (from the validation pass); None when training."""
        if self.train:
            return None
        checked = self.data.checked
        if checked is not None and all(i in checked.sizes for i in self.ids):
            return [checked.sizes[i] for i in self.ids]
        return [tuple(reversed(open_image(self.data.images[i]).size)) for i in self.ids]

    def __getitem__(self, index):
        stem = self.ids[index]
        image, mask = self.transform(*_load_pair(self.data, stem, True))
        mask = mask.as_subclass(torch.Tensor).long()
        k = self.data.spec.num_classes
        present = torch.unique(mask)
        labels = torch.zeros(k)
        labels[present[present < k]] = 1
        labels[0] = 1
        return {"image": image.as_subclass(torch.Tensor), "mask": mask, "labels": labels, "has_mask": True,
                "id": stem}


class FolderImageLevelSet(Dataset):
    """Images with image-level labels only (mask all 255): from masks (derived in the validation pass) or
    labels.csv."""

    def __init__(self, data: FolderData, ids: Sequence[str], train: bool = True,
                 image_size: int | tuple[int, int] = 256, scale=(0.5, 2.0), mean=None, std=None):
        from unroll.segmentation.transforms import IMAGENET_MEAN, IMAGENET_STD, make_transform

        self.data, self.ids = data, list(ids)
        labels = {i: data.image_labels(i) for i in self.ids}
        missing = [i for i, v in labels.items() if v is None]
        if missing:
            raise KeyError(f"{len(missing)} ids have no image-level labels (no mask checked, no labels.csv row), "
                           f"e.g. {missing[:3]}")
        self.labels = {i: torch.as_tensor(v, dtype=torch.float32) for i, v in labels.items()}
        self.transform = make_transform(train, image_size, scale, mean or IMAGENET_MEAN, std or IMAGENET_STD)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        stem = self.ids[index]
        image, _ = _load_pair(self.data, stem, False)
        image = self.transform(image).as_subclass(torch.Tensor)
        mask = torch.full(image.shape[-2:], IGNORE, dtype=torch.long)
        return {"image": image, "mask": mask, "labels": self.labels[stem].clone(), "has_mask": False, "id": stem}
