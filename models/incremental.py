"""The policy of incremental rebuilds: when a champion is updated rather than rebuilt, what its networks
replay, how far its memory bank grows and when the new images have drifted too far to grow it.

tasks/incremental.py and tasks/patchcore.py carry it out against MLflow, the feature store and Dask.
"""

from __future__ import annotations

import numpy as np

from patchline.models.patchcore.coreset import coreset_size

# Beyond this many new images per champion fit image, a full rebuild costs little more than an update.
MAX_NEW_SHARE = 0.5
# A warm start trains on the new images and as many old fit images per new one (at least MIN_REPLAY),
# so the networks keep what they knew of the old ones.
REPLAY_PER_NEW = 1
MIN_REPLAY = 32
# A grown bank must cover the new images' patches about as tightly as the champion covered its own
# (issue 23 asks for a coverage radius within 1.10 of a full rebuild's); farther means the images drifted.
DRIFT_LIMIT = 1.10


def too_many_new(new: int, old: int) -> bool:
    return new > MAX_NEW_SHARE * old


def replayed_old(old: int, new: int, seed: int) -> np.ndarray:
    """Sorted indices of the old fit images a warm start replays beside `new` new ones: a seeded sample."""
    count = min(old, max(MIN_REPLAY, REPLAY_PER_NEW * new))
    return np.sort(np.random.default_rng(seed).choice(old, count, replace=False))


def bank_growth(bank_rows: int, candidates: int, fit_patches: int, ratio: float) -> int:
    """How many of the new images' `candidates` patches join a champion's bank of `bank_rows`, so that it
    holds the line's coreset `ratio` of all `fit_patches` (old and new)."""
    return min(candidates, max(0, coreset_size(fit_patches, ratio) - bank_rows))


def drifted(grown_radius: float, champion_radius: float | None) -> bool:
    """Whether the new patches lie too far from the grown bank for it to stand for them (or there is no
    champion radius to compare with)."""
    return champion_radius is None or grown_radius > DRIFT_LIMIT * champion_radius
