"""The one nearest-row search of PatchCore, shared by the scorer, its export graph and the coreset, and
eq. 7 of the paper on top of it. Plain tensor code, so the export traces the same functions that score.

Distances are taken as ‖q‖² + min over rows (‖b‖² − 2 q·b): one GEMM per tile (`addmm` with the row
norms as its bias), a tile of rows at a time so that a tile's product stays in cache instead of the
whole (queries × rows) matrix going to memory and back.
"""

from __future__ import annotations

import torch


def squared_norms(rows: torch.Tensor) -> torch.Tensor:
    return rows.square().sum(1)


def nearest_distances_sq(queries: torch.Tensor, rows: torch.Tensor, row_sq_norms: torch.Tensor,
                         query_tile: int, row_tile: int) -> torch.Tensor:
    """(Q, D) queries → (Q,) squared Euclidean distance to the nearest of `rows` (M, D), `row_sq_norms` its
    squared norms; `query_tile` queries against `row_tile` rows per GEMM."""
    blocks = [queries.new_zeros(0)]
    for start in range(0, len(queries), query_tile):
        block = queries[start:start + query_tile]
        best = None
        for first in range(0, len(rows), row_tile):
            part = torch.addmm(row_sq_norms[first:first + row_tile], block,
                               rows[first:first + row_tile].T, alpha=-2.0).amin(1)
            best = part if best is None else torch.minimum(best, part)
        blocks.append(best + squared_norms(block))
    return torch.cat(blocks).clamp_min(0.0)


def reweighted_scores(worst: torch.Tensor, bank: torch.Tensor, bank_sq_norms: torch.Tensor,
                      neighbours: int) -> torch.Tensor:
    """Eq. 7 for each image's most distant patch q* (rows of `worst`, (N, D)) and its nearest bank row m*:
    s = (1 − exp‖q* − m*‖ / Σ_{m ∈ N_b(m*)} exp‖q* − m‖) · ‖q* − m*‖, N_b(m*) the b = `neighbours` bank rows
    nearest to m* (m* among them)."""
    nearest_sq_to_worst, matched = torch.addmm(bank_sq_norms, worst, bank.T, alpha=-2.0).min(1)
    nearest = (nearest_sq_to_worst + squared_norms(worst)).clamp_min(0.0).sqrt()
    support = torch.addmm(bank_sq_norms, bank[matched], bank.T, alpha=-2.0).topk(
        min(neighbours, len(bank)), dim=1, largest=False).indices
    support_distances = torch.linalg.vector_norm(bank[support] - worst[:, None], dim=2)
    # exp(d*) / Σ exp(d) as exp(d* − logsumexp(d)): distances of a few hundred would overflow exp.
    return (1.0 - torch.exp(nearest - torch.logsumexp(support_distances, dim=1))) * nearest
