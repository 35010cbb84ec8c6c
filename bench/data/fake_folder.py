"""A tiny data set in the folder format (unroll.segmentation.folder) for tests and smoke runs.

Each image is a grey canvas with one to two shapes, each class painted in its own colour, so a pixel's colour tells
its class. ``mask_kind`` picks how the masks are written: "index" (greyscale PNG of class indices, 255 = void
outline), "palette" (the same indices in a palette PNG whose colours are not the indices), "values" (0/128/255
greyscale, needing a value->class mapping) or "colors" (RGB, needing a colour->class table).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

CLASSES = ("background", "square", "disk")
COLOURS = ((90, 90, 90), (230, 60, 40), (40, 90, 230))  # image colours of the classes
VALUES = (0, 128, 255)  # the raw values of mask_kind="values"
MASK_COLOURS = ((0, 0, 0), (255, 0, 0), (0, 0, 255))  # mask colours of mask_kind="colors"


def draw(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(rgb uint8 [H, W, 3], mask uint8 [H, W] class indices) with 1-2 objects side by side."""
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    classes = rng.choice([1, 2], size=int(rng.integers(1, 3)), replace=False)
    slot = w // len(classes)
    yy, xx = np.mgrid[0:h, 0:w]
    for k, c in enumerate(classes):
        bw, bh = int(rng.integers(slot // 2, slot - 2)), int(rng.integers(h // 3, h - 4))
        x0, y0 = k * slot + int(rng.integers(1, slot - bw)), int(rng.integers(1, h - bh))
        if c == 1:
            shape = (yy >= y0) & (yy < y0 + bh) & (xx >= x0) & (xx < x0 + bw)
        else:
            shape = ((yy - y0 - bh / 2) / (bh / 2)) ** 2 + ((xx - x0 - bw / 2) / (bw / 2)) ** 2 <= 1
        mask[shape] = c
    rgb = np.asarray(COLOURS, np.uint8)[mask]
    noise = rng.integers(-12, 13, size=rgb.shape)
    return np.clip(rgb.astype(int) + noise, 0, 255).astype(np.uint8), mask


def write_mask(path: Path, mask: np.ndarray, kind: str) -> None:
    if kind == "index":
        Image.fromarray(mask, "L").save(path)
    elif kind == "palette":
        png = Image.fromarray(mask, "L")
        palette = np.zeros((256, 3), np.uint8)
        palette[: len(MASK_COLOURS)] = MASK_COLOURS
        palette[255] = (255, 255, 255)
        png.putpalette(palette.tobytes())
        png.save(path)
    elif kind == "values":
        Image.fromarray(np.asarray(VALUES, np.uint8)[mask], "L").save(path)
    elif kind == "colors":
        Image.fromarray(np.asarray(MASK_COLOURS, np.uint8)[mask], "RGB").save(path)
    else:
        raise ValueError(f"mask_kind must be index, palette, values or colors, got {kind!r}")


def make_fake_folder(root: str | os.PathLike, n_masked: int = 12, n_unmasked: int = 3,
                     sizes: Sequence[tuple[int, int]] = ((48, 64), (56, 48)), mask_kind: str = "index",
                     image_format: str = "png", seed: int = 0, spec: str = "json") -> Path:
    """Write ``root`` in the folder format and return it: ``n_masked`` images with masks, ``n_unmasked`` with only
    a labels.csv row (class names), and the class names (``spec="json"``: dataset.json with the mapping the masks
    need; ``"txt"``: classes.txt only, index masks)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_masked + n_unmasked):
        stem = f"img{k:03d}"
        rgb, mask = draw(rng, sizes[k % len(sizes)])
        Image.fromarray(rgb).save(root / "images" / f"{stem}.{image_format}",
                                  **({"quality": 95} if image_format == "jpg" else {}))
        if k < n_masked:
            write_mask(root / "masks" / f"{stem}.png", mask, kind=mask_kind)
        else:
            rows.append(f"{stem}," + " ".join(CLASSES[c] for c in np.unique(mask) if c > 0))
    (root / "labels.csv").write_text("image,labels\n" + "".join(r + "\n" for r in rows))
    if spec == "txt":
        (root / "classes.txt").write_text("".join(c + "\n" for c in CLASSES))
    else:
        meta: dict = {"classes": list(CLASSES), "ignore_index": 255}
        if mask_kind == "values":
            meta["mask_values"] = {str(v): c for v, c in zip(VALUES, CLASSES)}
        if mask_kind == "colors":
            meta["mask_colors"] = {"#%02x%02x%02x" % col: c for col, c in zip(MASK_COLOURS, CLASSES)}
        (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
