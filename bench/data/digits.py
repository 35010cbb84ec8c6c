"""Digit scenes: a small, exactly labelled weakly-supervised segmentation benchmark made of real handwritten digits.

A scene is a canvas (default 64x64, one channel, float in [0, 1], black background) holding 1-3 real handwritten
digits, each resized (bilinear, antialiased) to a random side between ``scale[0]`` and ``scale[1]`` of the canvas and
placed at a random position such that the digits' square boxes are at least ``gap`` (default 2) pixels apart, so
no two digits overlap or touch. Labels, 11 classes (:data:`class_names`: background, "0", ..., "9"):

- ``mask`` (pixels): a pixel whose intensity is above ``threshold`` (default 0.5) is its digit's class + 1; every other
  pixel is 0, background, including the faint anti-aliased rim of a stroke (0 < intensity <= threshold).
- ``labels`` (image): multi-hot over the 11 classes; background is always 1; a digit class is 1 exactly when it has at
  least one pixel in the mask, so the image label and the pixel labels can never disagree.

``scene="single"`` gives one digit per image, upsampled with nearest neighbour to 128x128 (the MNIST segmentation set
used to compare saliency and CAM), same labels.

Splits. The source digits are split first, by a fixed seed that does not depend on the scene ``seed``, and a split's
scenes are composed only of that split's digits, so train / val / test never share a handwritten digit:

- ``sklearn`` (default, always offline): the 1797 8x8 digits bundled with scikit-learn, stratified by class into
  60% train, 20% val, 20% test.
- ``mnist``: train and val from the MNIST training digits (val = a class-stratified 10%), test = the MNIST test digits.
  Read from ``root`` (default ``data_root() / "mnist"``) as a torchvision ``MNIST`` folder, or raw idx files
  (``train-images-idx3-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]`` with their label files), or ``.npz`` files with
  arrays ``images`` (N, 28, 28) uint8 and ``labels`` whose name says ``train`` or ``test``/``t10k``. Either half may be
  missing; asking for a split whose digits are missing raises ``FileNotFoundError``. Nothing is downloaded unless
  ``download=True`` is passed (torchvision layout only).

Determinism: the same arguments give the same scenes, byte for byte. Scenes are rendered once, vectorised, and kept in
memory as uint8 (a few thousand 64x64 scenes take well under a second and ~8 KiB each).
"""

from __future__ import annotations

import gzip
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from bench.data import data_root

__all__ = ["DigitScenes", "DigitSource", "NUM_CLASSES", "SPLITS", "class_names", "load_source", "make_digit_scenes"]

class_names: list[str] = ["background"] + [str(d) for d in range(10)]
NUM_CLASSES = len(class_names)
SPLITS = ("train", "val", "test")

# Fixed on purpose: if the source split followed the scene seed, train scenes built with one seed and test scenes
# built with another could share digits.
_SPLIT_SEED = 0
# Candidate positions drawn per digit before giving up on its side; with sides <= half the canvas a miss is rare.
_TRIES = 64


# ----------------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class DigitSource:
    """All digits of one source, and the disjoint split of them.

    ``images``: (N, h, w) uint8, 0 = black background, 255 = full ink. ``labels``: (N,) int64 digit 0-9.
    ``splits``: split name -> sorted int64 indices into ``images``; the splits share no index.
    """

    name: str
    images: Tensor
    labels: np.ndarray
    splits: dict[str, np.ndarray]

    def indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self.splits:
            raise FileNotFoundError(f"source {self.name!r} has no digits for split {split!r} (files missing)")
        return self.splits[split]


def load_source(source: str = "sklearn", root: str | Path | None = None, download: bool = False) -> DigitSource:
    """Load (once per process, then cached) the digits of ``source`` ("sklearn" or "mnist") and their split."""
    if source == "sklearn":
        return _sklearn_source()
    if source == "mnist":
        root = Path(root) if root is not None else data_root() / "mnist"
        return _mnist_source(str(root.expanduser().resolve()), download)
    raise ValueError(f"source must be 'sklearn' or 'mnist', got {source!r}")


def _stratified_split(labels: np.ndarray, fractions: dict[str, float], rest: str) -> dict[str, np.ndarray]:
    """Split positions 0..len(labels)-1 by class: each named split takes its fraction of every class, ``rest`` the
    remainder. Stratified so that a small split (360 sklearn test digits) still holds every class in proportion."""
    rng = np.random.default_rng(_SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in [*fractions, rest]}
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for name, frac in fractions.items():
            stop = start + int(round(frac * len(members)))
            parts[name].append(members[start:stop])
            start = stop
        parts[rest].append(members[start:])
    return {name: np.sort(np.concatenate(p)).astype(np.int64) for name, p in parts.items()}


@cache
def _sklearn_source() -> DigitSource:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no network

    digits = load_digits()
    # 17 grey levels 0..16 -> 0..255, so every source is uint8 with the same meaning of intensity.
    images = torch.from_numpy(np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8))
    labels = digits.target.astype(np.int64)
    splits = _stratified_split(labels, {"test": 0.2, "val": 0.2}, rest="train")
    return DigitSource("sklearn", images, labels, splits)


@cache
def _mnist_source(root: str, download: bool) -> DigitSource:
    train = _read_mnist(Path(root), train=True, download=download)
    test = _read_mnist(Path(root), train=False, download=download)
    if train is None and test is None:
        raise FileNotFoundError(
            f"no MNIST digits under {root}: expected a torchvision MNIST folder, idx files "
            "(train-/t10k-images-idx3-ubyte[.gz] + labels), or a *train*.npz / *test*.npz with images/labels"
        )
    images, labels, splits = [], [], {}
    offset = 0
    if train is not None:  # training digits first: ids 0..n_train-1
        splits.update(_stratified_split(train[1], {"val": 0.1}, rest="train"))
        images.append(train[0])
        labels.append(train[1])
        offset = len(train[1])
    if test is not None:  # then the test digits, so every digit has one id in one array
        splits["test"] = np.arange(offset, offset + len(test[1]), dtype=np.int64)
        images.append(test[0])
        labels.append(test[1])
    return DigitSource("mnist", torch.cat(images), np.concatenate(labels), splits)


def _read_mnist(root: Path, train: bool, download: bool) -> tuple[Tensor, np.ndarray] | None:
    """One half of MNIST as (uint8 (N, 28, 28), int64 (N,)), from the first layout found under ``root``."""
    import torchvision

    try:  # torchvision's own layout (root/MNIST/raw/...); raises RuntimeError when absent and download is False
        ds = torchvision.datasets.MNIST(str(root), train=train, download=download)
        return ds.data.to(torch.uint8), ds.targets.numpy().astype(np.int64)
    except RuntimeError:
        pass

    prefix = "train" if train else "t10k"
    for suffix in ("", ".gz"):
        image_file = root / f"{prefix}-images-idx3-ubyte{suffix}"
        label_file = root / f"{prefix}-labels-idx1-ubyte{suffix}"
        if image_file.is_file() and label_file.is_file():
            from torchvision.datasets.mnist import read_image_file, read_label_file

            images = _read_idx(image_file, read_image_file)
            labels = _read_idx(label_file, read_label_file).numpy().astype(np.int64)
            return images, labels

    words = ("train",) if train else ("test", "t10k")
    for npz in sorted(root.glob("*.npz")) if root.is_dir() else []:
        if any(w in npz.name.lower() for w in words):
            with np.load(npz) as z:
                return torch.from_numpy(z["images"].astype(np.uint8)), z["labels"].astype(np.int64)
    return None


def _read_idx(path: Path, reader) -> Tensor:
    """torchvision's idx readers take an uncompressed path, so a .gz is inflated into a temporary file first."""
    if path.suffix != ".gz":
        return reader(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / path.stem
        plain.write_bytes(gzip.decompress(path.read_bytes()))
        return reader(str(plain))


# ----------------------------------------------------------------------------------------------------------- dataset


def _to_float(images_u8: Tensor) -> Tensor:
    # The one conversion used both to threshold the mask at build time and to return images, so that
    # "mask > 0  <=>  image > threshold" holds exactly, not up to rounding.
    return images_u8.float() / 255.0


def _above(threshold: float) -> np.ndarray:
    """Lookup table over the 256 grey levels: True where the returned image value exceeds ``threshold``. Computed with
    :func:`_to_float` itself so that the mask agrees with the returned image bit for bit."""
    return (_to_float(torch.arange(256, dtype=torch.uint8)) > threshold).numpy()


def _nearest(image: Tensor, size: int) -> Tensor:
    """Nearest-neighbour resize of one (h, w) image to (size, size) by integer index gather (exact, any dtype).
    Gathered in numpy: torch's threaded gather is far slower on small, busy CPUs, and this runs per item."""
    h, w = image.shape
    if (h, w) == (size, size):
        return image
    rows = np.arange(size) * h // size
    cols = np.arange(size) * w // size
    return torch.from_numpy(image.numpy()[np.ix_(rows, cols)])


class DigitScenes(Dataset):
    """Digit scenes held in memory. Build with :func:`make_digit_scenes`.

    Item ``i`` is ``{"image": FloatTensor (C, H, W) in [0, 1], "mask": LongTensor (H, W) in 0..10,
    "labels": FloatTensor (11,) multi-hot, labels[0] = 1}``.

    Also exposed, for inspection and tests: ``images`` / ``masks`` (N, h, w) uint8 as stored (at source resolution for
    ``scene="single"``, upsampled on access), ``labels`` (N, 11), ``source_ids`` (N, D) int64 indices into
    ``load_source(source, root).images`` (-1 = no digit in that slot), ``digit_classes`` (N, D) (-1 = none),
    ``boxes`` (N, D, 3) = (top, left, side) of each digit in output pixels (-1 = none).
    """

    class_names = class_names
    num_classes = NUM_CLASSES

    def __init__(
        self,
        images: Tensor,
        masks: Tensor,
        source_ids: np.ndarray,
        digit_classes: np.ndarray,
        boxes: np.ndarray,
        size: int,
        channels: int = 1,
        source: str = "",
        split: str = "",
    ) -> None:
        self.images = images
        self.masks = masks
        self.source_ids = torch.as_tensor(source_ids, dtype=torch.long)
        self.digit_classes = torch.as_tensor(digit_classes, dtype=torch.long)
        self.boxes = torch.as_tensor(boxes, dtype=torch.long)
        self.size = size
        self.channels = channels
        self.source = source
        self.split = split
        # Image label = the classes that own at least one mask pixel, plus background.
        flat = masks.reshape(len(masks), -1).numpy()
        present = np.stack([(flat == k).any(axis=1) for k in range(NUM_CLASSES)], axis=1)
        present[:, 0] = True
        self.labels = torch.from_numpy(present.astype(np.float32))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        image = _to_float(_nearest(self.images[i], self.size))
        mask = _nearest(self.masks[i], self.size).long()
        return {
            "image": image.unsqueeze(0).repeat(self.channels, 1, 1),
            "mask": mask,
            "labels": self.labels[i].clone(),
        }


def make_digit_scenes(
    source: str = "sklearn",
    split: str = "train",
    n_scenes: int | None = None,
    size: int | None = None,
    seed: int = 0,
    root: str | Path | None = None,
    *,
    scene: str = "scenes",
    min_digits: int = 1,
    max_digits: int = 3,
    scale: tuple[float, float] = (0.25, 0.5),
    threshold: float = 0.5,
    gap: int = 2,
    channels: int = 1,
    download: bool = False,
) -> DigitScenes:
    """Build the scenes of one split. See the module docstring for the labels and the split.

    Args:
        source: "sklearn" (offline, default) or "mnist" (read from ``root``).
        split: "train", "val" or "test".
        n_scenes: number of images; ``None`` = as many as the split has source digits. Scenes draw their digits at
            random from the split (distinct within a scene, repeats across scenes). ``scene="single"`` with ``None``
            shows each digit of the split once, in source order; with a number, a random sample (with replacement
            only when more are asked for than the split holds).
        size: canvas side; ``None`` = 64 for "scenes", 128 for "single".
        seed: the scene seed (layouts and digit choice). Does not affect which digits belong to which split.
        root: MNIST folder; ``None`` = ``data_root() / "mnist"``. Ignored for "sklearn".
        scene: "scenes" (1-3 digits on a canvas) or "single" (one digit, nearest-upsampled).
        min_digits, max_digits: digits per scene, drawn uniformly in this range.
        scale: digit side as a fraction of the canvas side, drawn uniformly (as integers) in this range. The upper
            end must not exceed 0.5, so that three digits usually fit; a digit for which no free spot is found in 64
            random tries is retried at the smallest side, then dropped (rare: ~0.1% of digits with the defaults;
            a scene always keeps its first digit).
        threshold: intensity above which a digit pixel is labelled with its class.
        gap: least number of background pixels between two digits' boxes (scikit-learn digits fill their box,
            so touching boxes would make touching digits).
        channels: image channels (the grey image repeated), e.g. 3 for ImageNet-style backbones.
        download: let torchvision download MNIST into ``root`` (never used by tests).
    """
    src = load_source(source, root, download)
    pool = src.indices(split)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    # The split index is mixed into the seed so that train and val built with the same seed differ in layout too.
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    n = len(pool) if n_scenes is None else int(n_scenes)

    if scene == "single":
        size = 128 if size is None else size
        if n_scenes is None:
            chosen = pool
        else:
            chosen = rng.choice(pool, size=n, replace=n > len(pool))
        images = src.images[torch.from_numpy(chosen)]
        classes = torch.from_numpy(src.labels[chosen] + 1).to(torch.uint8)
        # Thresholding at source resolution then nearest-upsampling equals thresholding the upsampled image.
        above = torch.from_numpy(_above(threshold))[images.long()]
        masks = torch.where(above, classes[:, None, None], 0).to(torch.uint8)
        boxes = np.tile(np.array([0, 0, size]), (n, 1, 1))
        return DigitScenes(
            images, masks, chosen[:, None], src.labels[chosen][:, None], boxes, size, channels, source, split
        )

    if scene != "scenes":
        raise ValueError(f"scene must be 'scenes' or 'single', got {scene!r}")
    size = 64 if size is None else size
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    lo, hi = int(round(scale[0] * size)), int(round(scale[1] * size))
    if not 1 <= lo <= hi <= size // 2:
        raise ValueError(f"scale {scale} gives digit sides {lo}..{hi}; need 1 <= lo <= hi <= size // 2")
    if len(pool) < max_digits:
        raise ValueError(f"split {split!r} has {len(pool)} digits, fewer than max_digits={max_digits}")

    counts = rng.integers(min_digits, max_digits + 1, size=n)
    picks = _distinct_picks(rng, len(pool), n, max_digits)
    sides = rng.integers(lo, hi + 1, size=(n, max_digits))
    placed, tops, lefts, sides = _place(rng, size, counts, sides, lo, gap)

    images, owners = _render(src.images, pool, src.labels, picks, placed, tops, lefts, sides, n, size)
    masks = torch.from_numpy(np.where(_above(threshold)[images.numpy()], owners.numpy(), 0).astype(np.uint8))

    source_ids = np.where(placed, pool[picks], -1)
    digit_classes = np.where(placed, src.labels[pool[picks]], -1)
    boxes = np.where(placed[..., None], np.stack([tops, lefts, sides], axis=-1), -1)
    return DigitScenes(images, masks, source_ids, digit_classes, boxes, size, channels, source, split)


def _distinct_picks(rng: np.random.Generator, pool_size: int, n: int, k: int) -> np.ndarray:
    """(n, k) positions into the pool, distinct within each row (no scene shows the same handwritten digit twice)."""
    picks = rng.integers(0, pool_size, size=(n, k))
    while True:
        ordered = np.sort(picks, axis=1)
        clash = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not clash.any():
            return picks
        picks[clash] = rng.integers(0, pool_size, size=(int(clash.sum()), k))


def _place(
    rng: np.random.Generator, size: int, counts: np.ndarray, sides: np.ndarray, min_side: int, gap: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rejection-sample square boxes at least ``gap`` apart, one digit slot at a time, vectorised over all scenes.

    Returns ``placed`` (n, D) bool and ``tops``, ``lefts``, ``sides`` (n, D) int (meaningful where placed).
    """
    n, d = sides.shape
    sides = sides.copy()
    tops = np.zeros((n, d), dtype=np.int64)
    lefts = np.zeros((n, d), dtype=np.int64)
    placed = np.zeros((n, d), dtype=bool)
    for j in range(d):
        for shrink in (False, True):
            rows = np.flatnonzero((counts > j) & ~placed[:, j])
            if len(rows) == 0:
                break
            if shrink:  # a smallest-size digit fits into gaps the drawn size did not
                sides[rows, j] = min_side
            s = sides[rows, j]
            cy = rng.integers(0, size - s + 1, size=(_TRIES, len(rows)))
            cx = rng.integers(0, size - s + 1, size=(_TRIES, len(rows)))
            free = np.ones((_TRIES, len(rows)), dtype=bool)
            for k in range(j):  # must be apart (on one axis at least) from every digit already placed
                yk, xk, sk = tops[rows, k], lefts[rows, k], sides[rows, k]
                apart = (cy + s + gap <= yk) | (yk + sk + gap <= cy) | (cx + s + gap <= xk) | (xk + sk + gap <= cx)
                free &= apart | ~placed[rows, k]
            found = free.any(axis=0)
            first = free.argmax(axis=0)
            cols = np.arange(len(rows))
            hit = rows[found]
            tops[hit, j] = cy[first, cols][found]
            lefts[hit, j] = cx[first, cols][found]
            placed[hit, j] = True
    return placed, tops, lefts, sides


def _render(
    source_images: Tensor,
    pool: np.ndarray,
    labels: np.ndarray,
    picks: np.ndarray,
    placed: np.ndarray,
    tops: np.ndarray,
    lefts: np.ndarray,
    sides: np.ndarray,
    n: int,
    size: int,
) -> tuple[Tensor, Tensor]:
    """Paste the resized digits: returns uint8 canvases (n, size, size) and, per pixel, the class + 1 of the digit
    whose box covers it (0 outside boxes). One interpolate call and one scatter per distinct digit side."""
    # Everything but the resize is numpy: on small shared CPUs torch's multi-threaded elementwise and index_put
    # kernels are an order of magnitude slower than numpy for these many small arrays.
    canvas = np.zeros((n, size, size), dtype=np.uint8)
    owner = np.zeros((n, size, size), dtype=np.uint8)
    for side in np.unique(sides[placed]):
        side = int(side)
        scene_idx, slot = np.nonzero(placed & (sides == side))
        ids = pool[picks[scene_idx, slot]]
        digits = _to_float(source_images[torch.from_numpy(ids)]).unsqueeze(1)
        digits = F.interpolate(digits, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        digits = np.rint(np.clip(digits[:, 0].numpy(), 0, 1) * 255).astype(np.uint8)
        # Fancy indexing writes every box of this side in one go; boxes never overlap, so no write collides.
        r = np.arange(side)
        at = scene_idx[:, None, None]
        yy = tops[scene_idx, slot][:, None, None] + r[None, :, None]
        xx = lefts[scene_idx, slot][:, None, None] + r[None, None, :]
        canvas[at, yy, xx] = digits
        owner[at, yy, xx] = (labels[ids] + 1).astype(np.uint8)[:, None, None]
    return torch.from_numpy(canvas), torch.from_numpy(owner)
