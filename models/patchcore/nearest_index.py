"""An inverted-file index over a memory bank, and the exact re-check that keeps image scores exact.

The bank's rows are grouped into cells by k-means; a patch is compared with the rows of the `PROBES`
cells whose centroids are nearest to it, not with the whole bank. The distance found is to a real bank
row, so it is never below the exact nearest distance: an upper bound, and usually the exact value.

An image's score (eq. 7) depends only on its most distant patch. `exact_maxima` re-checks an image's
patches against the whole bank in descending order of their bounds and stops once the next bound is
below the largest exact distance found: no later patch can then be the most distant, because its exact
distance is at most its bound. So the image scores are those of the exact search, at the cost of the few
patches re-checked; the other patches keep their bounds, which is what an indexed map is drawn from.

The cells are a pure function of the bank's rows (seeded), written into the bank's file and covered by its
digest like the rows themselves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from patchline.models.patchcore.nearest import squared_norms

# Cells hold about √M rows each, so a query's work (√M centroids plus PROBES cells) grows with √M.
# PROBES was chosen on ELPV training cells (benchmarks/README.md, "Indexed scoring").
PROBES = 8
_KMEANS_ITERATIONS = 10
# A next bound within this relative margin of the largest exact distance is still re-checked, so that
# rounding in the two searches' sums cannot pick another patch than the exact search does.
_MARGIN = 1e-5
# Patches re-checked per image per round; on ELPV cells every image stopped after the first round.
_STEP = 8


@dataclass(frozen=True)
class CellIndex:
    """The bank's rows grouped by cell: `order` lists row numbers cell by cell, cell c's rows are
    order[offsets[c]:offsets[c + 1]], `centroids` (C, D) float32 their means."""

    centroids: np.ndarray
    order: np.ndarray
    offsets: np.ndarray

    def check(self, rows: int, dims: int) -> None:
        """ValueError unless this indexes a bank of `rows` × `dims` (every row in exactly one non-empty cell)."""
        cells = len(self.centroids)
        if (self.centroids.ndim != 2 or self.centroids.shape[1] != dims or cells == 0
                or self.offsets.shape != (cells + 1,) or self.order.shape != (rows,)):
            raise ValueError(f"the nearest-row index does not fit a bank of {rows} × {dims}")
        if (self.offsets[0] != 0 or self.offsets[-1] != rows or np.any(np.diff(self.offsets) <= 0)
                or not np.array_equal(np.sort(self.order), np.arange(rows))
                or not np.isfinite(self.centroids).all()):
            raise ValueError("the nearest-row index is inconsistent (cells do not partition the bank's rows)")

    @classmethod
    def build(cls, features: np.ndarray, seed: int = 0) -> CellIndex:
        """k-means (Lloyd, seeded start on distinct rows) into about √M cells; empty cells are dropped."""
        rows = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        cells = max(1, round(math.sqrt(len(rows))))
        start = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:cells]
        centroids = rows[start].clone()
        for _ in range(_KMEANS_ITERATIONS):
            assigned = _nearest_centroid(rows, centroids)
            counts = torch.bincount(assigned, minlength=len(centroids))
            sums = torch.zeros_like(centroids).index_add_(0, assigned, rows)
            filled = counts > 0
            centroids[filled] = sums[filled] / counts[filled, None].to(rows.dtype)
        assigned = _nearest_centroid(rows, centroids)
        counts = torch.bincount(assigned, minlength=len(centroids))
        kept = counts > 0
        renumber = torch.cumsum(kept.long(), 0) - 1
        assigned = renumber[assigned]
        order = torch.argsort(assigned, stable=True)
        offsets = torch.zeros(int(kept.sum()) + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts[kept], 0)
        return cls(centroids[kept].numpy(), order.numpy(), offsets.numpy())


def _nearest_centroid(rows: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each row's nearest centroid (its own norm does not change which)."""
    centroid_sq = squared_norms(centroids)
    return torch.cat([torch.addmm(centroid_sq, block, centroids.T, alpha=-2.0).argmin(1)
                      for block in rows.split(8192)])


class IndexedSearch:
    """Upper bounds of the nearest-row distances through a `CellIndex`, on the scorer's device."""

    def __init__(self, index: CellIndex, bank: torch.Tensor, bank_sq_norms: torch.Tensor) -> None:
        device = bank.device
        order = torch.from_numpy(index.order).to(device)
        self.rows, self.row_sq = bank[order].contiguous(), bank_sq_norms[order].contiguous()
        self.centroids = torch.from_numpy(index.centroids).to(device)
        self.centroid_sq = squared_norms(self.centroids)
        self.offsets = index.offsets.tolist()
        self.probes = min(PROBES, len(self.centroids))

    def upper_bounds(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q, D) → (Q,) distance to the nearest row in the queries' `PROBES` nearest cells (≥ the exact one)."""
        probed = torch.addmm(self.centroid_sq, queries, self.centroids.T, alpha=-2.0).topk(
            self.probes, dim=1, largest=False).indices.reshape(-1)
        # The (query, cell) pairs grouped by cell: one GEMM per cell with the queries that probe it, each
        # pair's minimum written to its own slot, so no query's slots are read back while being written.
        pairs = torch.argsort(probed, stable=True)
        asking = torch.div(pairs, self.probes, rounding_mode="floor")
        ends = torch.cumsum(torch.bincount(probed, minlength=len(self.centroids)), 0).tolist()
        found = torch.empty(len(pairs), device=queries.device)
        first = 0
        for cell, last in enumerate(ends):
            if last > first:
                lo, hi = self.offsets[cell], self.offsets[cell + 1]
                found[pairs[first:last]] = torch.addmm(self.row_sq[lo:hi], queries[asking[first:last]],
                                                       self.rows[lo:hi].T, alpha=-2.0).amin(1)
            first = last
        best = found.view(len(queries), self.probes).amin(1)
        return (best + squared_norms(queries)).clamp_min_(0.0).sqrt_()


def exact_maxima(features: torch.Tensor, bounds: torch.Tensor,
                 exact: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(N, P, D) patch features and (N, P) upper bounds of their nearest distances → the bounds with each
    image's re-checked patches set to their exact distance (`exact`: (Q, D) → (Q,)), so that every image's
    largest value and its position are the exact search's; and how many patches were re-checked."""
    distances = bounds.clone()
    count, patches = bounds.shape
    ranked = bounds.argsort(1, descending=True)
    largest = torch.full((count,), -math.inf, device=bounds.device)
    active = torch.arange(count, device=bounds.device)
    checked = 0
    for position in range(0, patches, _STEP):
        take = ranked[active, position:position + _STEP]
        found = exact(features[active[:, None], take].reshape(-1, features.shape[2])).view(take.shape)
        distances[active[:, None], take] = found
        largest[active] = torch.maximum(largest[active], found.amax(1))
        checked += take.numel()
        if position + _STEP >= patches:
            break
        following = bounds[active, ranked[active, position + _STEP]]
        active = active[following >= largest[active] * (1.0 - _MARGIN)]
        if len(active) == 0:
            break
    return distances, checked
