"""The policy of incremental rebuilds: when a champion is updated rather than rebuilt, how far its memory
bank grows and when the new images have drifted too far to grow it. Its networks are not updated: every
rebuild trains them on all the fit images (tasks/detectors.py).

tasks/incremental.py and tasks/patchcore.py carry it out against MLflow, the feature store and Dask.
"""

from __future__ import annotations

from patchline.models.patchcore.coreset import coreset_size

# Beyond this many new images per champion fit image, a full rebuild costs little more than an update.
MAX_NEW_SHARE = 0.5
# A grown bank must cover the new images' patches about as tightly as the champion covered its own
# (issue 23 asks for a coverage radius within 1.10 of a full rebuild's); farther means the images drifted.
DRIFT_LIMIT = 1.10


def too_many_new(new: int, old: int) -> bool:
    return new > MAX_NEW_SHARE * old


def bank_growth(bank_rows: int, candidates: int, fit_patches: int, ratio: float) -> int:
    """How many of the new images' `candidates` patches join a champion's bank of `bank_rows`, so that it
    holds the line's coreset `ratio` of all `fit_patches` (old and new)."""
    return min(candidates, max(0, coreset_size(fit_patches, ratio) - bank_rows))


def drifted(grown_radius: float, champion_radius: float | None) -> bool:
    """Whether the new patches lie too far from the grown bank for it to stand for them (or there is no
    champion radius to compare with)."""
    return champion_radius is None or grown_radius > DRIFT_LIMIT * champion_radius
