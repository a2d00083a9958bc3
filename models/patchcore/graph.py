"""PatchCore's scoring of one image as a traceable module, for export (models/export_graph.py).

The same steps as `PatchFeatureExtractor.extract` and `PatchCoreScorer.score`, written for one image
without their batching and threads (ONNX has no such things); the search keeps a tiling of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from patchline.models.images import imagenet_normalize, resize_exportable
from patchline.models.patchcore.memory_bank import PatchCoreScorer
from patchline.models.patchcore.patch_features import PatchFeatureExtractor, locally_aware_features, median_to_mid_grey


_BANK_TILE = 2048


class PatchCoreGraph(nn.Module):
    """(1, 3, H, W) pixels in [0, 1] → eq. 7 image score (1,) and smoothed map (1, S, S)."""

    def __init__(self, extractor: PatchFeatureExtractor, scorer: PatchCoreScorer) -> None:
        super().__init__()
        self.config, self.image_size, self.grid = extractor.config, extractor.image_size, extractor.grid
        self.stages, self.taps = extractor.backbone.stages, extractor.backbone.taps
        self.register_buffer("bank", scorer.bank)
        self.register_buffer("bank_sq_norms", scorer.bank_sq_norms)
        self.register_buffer("map_rows", scorer.map_operator(self.grid[0], self.image_size))
        self.register_buffer("map_columns", scorer.map_operator(self.grid[1], self.image_size))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = resize_exportable(pixels, self.image_size).clamp(0.0, 1.0)
        if self.config.normalise_brightness:
            batch = median_to_mid_grey(batch)
        x = imagenet_normalize(batch)
        tapped = []
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index in self.taps:
                tapped.append(x)
        patches = locally_aware_features(tapped, self.config, self.grid)[0]
        distances = self._nearest_sq_tiled(patches).clamp_min(0.0).sqrt()
        worst = patches[distances.argmax()][None]
        worst_sq = self._nearest_sq(worst)[0]
        matched = worst_sq.argmin()
        nearest = worst_sq[matched].clamp_min(0.0).sqrt()
        around = self.bank_sq_norms - 2.0 * (self.bank[matched][None] @ self.bank.T)[0]
        support = around.topk(self.config.reweight_neighbours, largest=False).indices
        support_distances = torch.linalg.vector_norm(self.bank[support] - worst, dim=1)
        score = (1.0 - torch.exp(nearest - torch.logsumexp(support_distances, dim=0))) * nearest
        heat = self.map_rows @ distances.view(self.grid) @ self.map_columns.T
        return score[None], heat[None]

    def _nearest_sq_tiled(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q, D) → (Q,) squared distance to the nearest bank row, `_BANK_TILE` rows at a time: the whole
        (Q, M) product would be written to memory and read back, each tile's stays in cache. One `addmm`
        a tile (ONNX Gemm with the norms as its bias) rather than a product and a subtraction."""
        partial = [torch.addmm(self.bank_sq_norms[start:start + _BANK_TILE][None], queries,
                               self.bank[start:start + _BANK_TILE].T, alpha=-2.0).amin(1)
                   for start in range(0, len(self.bank), _BANK_TILE)]
        return torch.stack(partial).amin(0) + (queries * queries).sum(1)

    def _nearest_sq(self, queries: torch.Tensor) -> torch.Tensor:
        """(Q, D) → (Q, M) squared distances to every bank row."""
        return (queries * queries).sum(1, keepdim=True) + self.bank_sq_norms[None] - 2.0 * queries @ self.bank.T
