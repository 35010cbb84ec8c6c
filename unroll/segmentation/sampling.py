"""Which images get pixel labels: a class-balanced, seeded pick of ``n`` out of a pool with image-level labels.

Shared by every data set (VOC, a user's folder): the caller passes multi-hot image-level labels over its own
classes and says which columns to leave out of the balance (background, present everywhere).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

__all__ = ["BALANCED_MAX", "sample_labelled"]

# At or below this many labelled images the sampler balances classes; above it follows the data.
BALANCED_MAX = 100


def sample_labelled(ids: Sequence[str], labels: Mapping[str, np.ndarray], n: int, seed: int = 0, *,
                    exclude: Sequence[int] = (0,), balanced_max: int = BALANCED_MAX) -> list[str]:
    """``n`` distinct ids out of ``ids`` to receive pixel labels, a deterministic function of (ids set, labels, seed).

    ``labels[i]``: multi-hot over the K classes (any integer/bool dtype); the columns in ``exclude`` (default the
    background, column 0) take no part in the balance. The picked images' class counts follow a target distribution
    over the remaining classes:

    * ``n <= balanced_max`` (100): uniform -- as balanced as possible; the first picks cover every class that
      occurs at all, then it goes round-robin;
    * larger ``n``: the average of uniform and the class distribution of ``ids`` (rare classes lifted, common ones
      still dominant);
    * ``n == len(ids)``: all of them.

    Each pick takes the class furthest behind its target (picked / target; ties: the rarer class in ``ids``) and a
    random unpicked image containing it, preferring images whose other classes are not "full": for n <= balanced_max
    none of them already ahead of that class (strict balance), above that none of them past its final quota (target
    x n x mean classes per image), which keeps the share of multi-object images near that of ``ids``. Without the
    preference, classes that co-occur with everything (VOC's person: in 30% of the train images) pile up above even
    their share in ``ids``. Images without any balanced class are taken (at random) only once no class has an
    unpicked image left. Returns the ids sorted.
    """
    pool = sorted(set(ids))
    if not 0 <= n <= len(pool):
        raise ValueError(f"n={n} must lie in [0, {len(pool)}] (the number of candidate ids)")
    if n == len(pool):
        return pool
    if n == 0:
        return []
    full_labels = np.stack([np.asarray(labels[i]).astype(bool) for i in pool])  # [N, K]
    keep = [k for k in range(full_labels.shape[1]) if k not in set(exclude)]
    has = full_labels[:, keep]  # [N, C] the balanced classes
    rng = np.random.default_rng(seed)
    if has.shape[1] == 0:  # nothing to balance (a single-class task): a seeded random pick
        return sorted(rng.choice(pool, n, replace=False).tolist())
    freq = has.sum(0)  # images per class in the pool
    uniform = np.full(has.shape[1], 1 / has.shape[1])
    target = uniform if n <= balanced_max else 0.5 * uniform + 0.5 * freq / max(freq.sum(), 1)
    quota = target * n * has.sum(1).mean()  # expected final image count per class
    free = np.ones(len(pool), bool)
    picked_count = np.zeros(has.shape[1])  # picked images per class

    for _ in range(n):
        available = (has & free[:, None]).any(0)  # classes with an unpicked image left
        if not available.any():  # only images without balanced classes remain: take any
            i = rng.choice(np.flatnonzero(free))
        else:
            behind = picked_count / target  # how far each class is along its quota (smaller = further behind)
            order = np.lexsort((freq, behind))
            c = next(k for k in order if available[k])
            candidates = np.flatnonzero(has[:, c] & free)
            if n <= balanced_max:
                full = behind > behind[c]  # strict: any class already ahead of c
            else:
                full = picked_count + 1 > quota  # loose: classes that would pass their final quota
            full[c] = False
            over = (has[candidates] & full).sum(1)
            i = rng.choice(candidates[over == over.min()])
        free[i] = False
        picked_count += has[i]
    return [pool[i] for i in np.flatnonzero(~free)]
