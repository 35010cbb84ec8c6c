"""One pass over every file a run will read, before any training: each bad file is reported by path with what is
wrong, all of them at once (a run should never die on file 9000 after an hour of training, nor score a broken mask
silently).

What is checked, per item (an image and, optionally, its mask):

* the image decodes completely (a truncated JPEG or PNG fails here, not in the middle of an epoch);
* the mask decodes completely and ``read_mask`` accepts it (e.g. every raw value has a class);
* the mask has the image's size;
* every mask value is a class index ``< num_classes`` or the ignore label (255).

The pass also returns what it learnt on the way, so nothing is decoded twice for it: the image sizes and the
classes present in each mask (image-level labels derived from masks).

    checked = validate(items, read_mask, num_classes=21)
    if checked.problems:
        raise DataError(checked.problems)
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = ["IGNORE", "Item", "Problem", "DataError", "Checked", "check_item", "validate", "open_image"]

IGNORE = 255  # the training loop's "no pixel label"


@dataclass(frozen=True)
class Item:
    """One sample a run will read: ``image`` and, for pixel-labelled or evaluated samples, ``mask``. ``role`` says
    what the run uses it for (shown in reports: "train", "val", "test", "image-level", ...)."""

    id: str
    image: Path
    mask: Path | None = None
    role: str = ""


@dataclass(frozen=True)
class Problem:
    """A bad file: its path, what is wrong, and the id / role of the sample it belongs to."""

    path: str
    what: str
    id: str = ""
    role: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.what}" + (f" [{self.role}]" if self.role else "")

    def to_dict(self) -> dict:
        return {"path": self.path, "what": self.what, "id": self.id, "role": self.role}


class DataError(ValueError):
    """Bad input data; ``problems`` lists every bad file. The message names them all (the first 50 in full)."""

    def __init__(self, problems: Sequence[Problem], hint: str = ""):
        self.problems = list(problems)
        self.hint = hint
        shown = "\n".join(f"  {p}" for p in self.problems[:50])
        more = f"\n  ... and {len(self.problems) - 50} more" if len(self.problems) > 50 else ""
        super().__init__(f"{len(self.problems)} bad file(s):\n{shown}{more}" + (f"\n{hint}" if hint else ""))


@dataclass
class Checked:
    problems: list[Problem] = field(default_factory=list)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> image (h, w)
    present: dict[str, np.ndarray] = field(default_factory=dict)  # id -> bool [num_classes], classes in the mask

    @property
    def bad_ids(self) -> set[str]:
        return {p.id for p in self.problems}


def open_image(path: str | os.PathLike):
    """The decoded PIL image (fully loaded: a truncated file raises here, with the path in the message)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
        raise OSError(f"cannot decode: {type(err).__name__}: {err}") from err


def _values_text(values: np.ndarray) -> str:
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:10])) + (f" (+{len(values) - 10} more)" if len(values) > 10 else "")


def check_item(item: Item, read_mask: Callable[[Path], np.ndarray] | None, num_classes: int,
               read_image: Callable[[Path], object] = open_image
               ) -> tuple[list[Problem], tuple[int, int] | None, np.ndarray | None]:
    """Problems of one item, its image (h, w) and the classes present in its mask (None without a mask).
    ``read_image(path)`` decodes an image (a PIL image or an array [H, W, ...]); OSError / ValueError = bad file."""
    problems = []

    def bad(path, what):
        problems.append(Problem(str(path), what, item.id, item.role))

    size = present = None
    try:
        im = read_image(item.image)
        size = (im.height, im.width) if hasattr(im, "height") else tuple(np.shape(im)[:2])
    except FileNotFoundError:
        bad(item.image, "missing")
    except (OSError, ValueError) as err:
        bad(item.image, str(err))
    if item.mask is None:
        return problems, size, None
    if read_mask is None:
        raise ValueError("items with masks need read_mask")
    try:
        mask = np.asarray(read_mask(item.mask))
    except FileNotFoundError:
        bad(item.mask, "missing")
        return problems, size, None
    except (OSError, ValueError) as err:
        bad(item.mask, str(err))
        return problems, size, None
    if mask.ndim != 2:
        bad(item.mask, f"mask has shape {mask.shape}, expected (H, W) class indices")
        return problems, size, None
    if size is not None and mask.shape != size:
        bad(item.mask, f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH), its image {item.image.name} is "
                       f"{size[1]}x{size[0]}")
    values = np.unique(mask)
    wrong = values[(values >= num_classes) & (values != IGNORE) | (values < 0)]
    if len(wrong):
        bad(item.mask, f"label value(s) {_values_text(wrong)} are not classes (0-{num_classes - 1}) nor the "
                       f"ignore label {IGNORE}")
    present = np.zeros(num_classes, bool)
    present[values[(values >= 0) & (values < num_classes)].astype(int)] = True
    return problems, size, present


def validate(items: Iterable[Item], read_mask: Callable[[Path], np.ndarray] | None, num_classes: int, *,
             read_image: Callable[[Path], object] = open_image, workers: int | None = None,
             show_progress: bool = True, console=None,
             description: str = "checking data") -> Checked:
    """:func:`check_item` on every item (threads: PIL decodes without holding the GIL), with a rich progress bar
    when ``show_progress``. Items sharing an image (or mask) path are checked once per item (cheap to dedupe at the
    caller if it matters)."""
    items = list(items)
    workers = workers or min(8, os.cpu_count() or 1)
    out = Checked()

    def run(check):
        with ThreadPoolExecutor(max(1, workers)) as pool:
            yield from pool.map(check, items)

    results = run(lambda it: check_item(it, read_mask, num_classes, read_image))
    if show_progress and items:
        from rich.progress import track

        results = track(results, total=len(items), description=description, console=console, transient=True)
    for item, (problems, size, present) in zip(items, results):
        out.problems.extend(problems)
        if size is not None:
            out.sizes[item.id] = size
        if present is not None:
            out.present[item.id] = present
    return out
