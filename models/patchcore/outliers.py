"""Training images unlike the rest, found from the memory bank alone: a line's first build has no champion
to screen its training images with (tasks/screening.py).

Greedy k-center selection picks the patches farthest from all others first, so a defect's patches are in
the bank. Scoring each image against the bank rows of the *other* images (leave one image out) then shows
the patches that no other image has; measuring bank rows only keeps it to one bank-by-bank search.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from patchline.models.scoring.metrics import robust_spread

# Iglewicz and Hoaglin's cut-off for outliers: a modified z-score (x - median) / (1.4826 MAD) above 3.5.
OUTLIER_Z = 3.5
# Bank rows measured at once against the whole bank (rows x bank floats in memory).
_TILE = 1024


def leave_one_image_out_scores(bank: np.ndarray, row_images: np.ndarray, images: int) -> np.ndarray:
    """Per image, the largest distance from one of its bank rows to the nearest bank row of another image
    (0 for an image without bank rows). `row_images[r]` is the image (0..images-1) of bank row r."""
    if len(np.unique(row_images)) < 2:
        raise ValueError("leave-one-image-out scores need bank rows from at least two images")
    rows = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32))
    owners = torch.from_numpy(np.asarray(row_images, dtype=np.int64))
    norms = rows.square().sum(1)
    nearest = torch.empty(len(rows))
    for start in range(0, len(rows), _TILE):
        block = rows[start:start + _TILE]
        squared = torch.addmm(norms, block, rows.T, alpha=-2.0) + block.square().sum(1, keepdim=True)
        squared[owners[start:start + _TILE, None] == owners[None, :]] = math.inf
        nearest[start:start + _TILE] = squared.amin(1)
    scores = np.zeros(images)
    np.maximum.at(scores, row_images, nearest.clamp(min=0).sqrt().numpy().astype(np.float64))
    return scores


def unlike_the_rest(scores: np.ndarray) -> tuple[np.ndarray, float]:
    """The indices of the scores beyond the outlier cut-off (median + `OUTLIER_Z` robust spreads), and that cut-off.

    The cut-off is taken over the images with bank rows (score > 0) only: an image without any is covered by
    the others, and a small bank leaves most images without rows, which would put the median at 0 and
    report every image that has one."""
    held = scores[scores > 0]
    if len(held) == 0:
        return np.array([], dtype=np.int64), 0.0
    cutoff = float(np.median(held)) + OUTLIER_Z * robust_spread(held)
    return np.flatnonzero(scores > cutoff), cutoff
