"""OE-SDN's and the AE baseline's scoring of one image as a traceable module, for export
(models/export_graph.py): the residual of `oesdn.scoring`, its map and score by the same functions, and the
detectors' map resize."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from patchline.models.config import OeSdnConfig
from patchline.models.images import resize_exportable
from patchline.models.oesdn.autoencoder import ConvAutoencoder
from patchline.models.oesdn.sdn import StyleDistillationNetwork
from patchline.models.oesdn.scoring import image_scores, smoothed_map


class ReconstructionGraph(nn.Module):
    """(1, 3, H, W) pixels in [0, 1] → image score (1,) and map (1, S, S) of |SDN(x) − AE(x)| (with an
    SDN) or |x − AE(x)| (without)."""

    def __init__(self, autoencoder: ConvAutoencoder, sdn: StyleDistillationNetwork | None, config: OeSdnConfig,
                 map_size: int) -> None:
        super().__init__()
        self.autoencoder, self.sdn, self.config, self.map_size = autoencoder, sdn, config, map_size

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        batch = resize_exportable(pixels, config.image_size)
        if config.channels == 1:
            batch = batch.mean(1, keepdim=True)
        batch = batch.clamp(0.0, 1.0)
        reference = batch if self.sdn is None else self.sdn(batch)
        anomaly = smoothed_map((reference - self.autoencoder(batch)).abs(), config)
        score = image_scores(anomaly, config.image_score, config.score_top_fraction)
        if config.image_size != self.map_size:
            anomaly = F.interpolate(anomaly, size=(self.map_size, self.map_size), mode="bilinear", align_corners=False)
        return score, anomaly[:, 0]
