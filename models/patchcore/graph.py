"""PatchCore's scoring of one image as a traceable module, for export (models/export_graph.py).

The feature steps of `PatchFeatureExtractor.extract` written for one image without its batching and
threads (ONNX has no such things); the search and eq. 7 are the scorer's own functions
(models/patchcore/nearest.py), on one query tile of all the image's patches.
"""

from __future__ import annotations

import torch
from torch import nn

from patchline.models.images import imagenet_normalize, resize_exportable
from patchline.models.patchcore.memory_bank import PatchCoreScorer
from patchline.models.patchcore.nearest import nearest_distances_sq, reweighted_scores
from patchline.models.patchcore.patch_features import PatchFeatureExtractor, locally_aware_features, median_to_mid_grey

# Bank rows per GEMM in the exported graph: each tile's product of all the image's patches stays in cache.
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
        distances = nearest_distances_sq(patches, self.bank, self.bank_sq_norms, len(patches), _BANK_TILE).sqrt()
        worst = patches[distances.argmax()][None]
        score = reweighted_scores(worst, self.bank, self.bank_sq_norms, self.config.reweight_neighbours)
        heat = self.map_rows @ distances.view(self.grid) @ self.map_columns.T
        return score, heat[None]
