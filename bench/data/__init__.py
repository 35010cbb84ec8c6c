"""Datasets for the benchmarks (``bench.data.digits``; VOC to follow).

Real data is never downloaded by this package: it is read from the shared data folder that sits beside the checkout
(``../shared/data``), which code finds with :func:`data_root`.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_root"]


def data_root() -> Path:
    """The shared data folder: ``$UNROLL_DATA`` when set, else ``<checkout>/../shared/data``. It may not exist.

    Found relative to this file rather than the working directory, so tests and scripts work from anywhere.
    """
    env = os.environ.get("UNROLL_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"
