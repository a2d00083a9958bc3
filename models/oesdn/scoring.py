"""Anomaly maps and image scores of OE-SDN and of its autoencoder baselines, as `Detections`.

OE-SDN: |SDN(x) − AE(x)|. AE-L2: |x − AE(x)|. AE-SSIM: 1 − SSIM(x, AE(x)) per pixel. Each map is
averaged over channels and Gaussian-smoothed; the image score is the map's maximum, its top-k mean or its mean (`image_score`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from patchline.models.config import OeSdnConfig
from patchline.models.images import images_to_tensor
from patchline.models.oesdn.autoencoder import ConvAutoencoder
from patchline.models.oesdn.sdn import StyleDistillationNetwork
from patchline.models.oesdn.ssim import gaussian_blur, ssim_map
from patchline.models.scoring.detection import Detections

MapFunction = Callable[[torch.Tensor], torch.Tensor]


def score_oesdn(autoencoder: ConvAutoencoder, sdn: StyleDistillationNetwork, images: Sequence[np.ndarray],
                config: OeSdnConfig) -> Detections:
    """Uint8 images → OE-SDN scores and maps |SDN(x) − AE(x)| at `config.image_size`."""
    return _detect(lambda batch: (sdn(batch) - autoencoder(batch)).abs(), autoencoder, images, config)


def score_autoencoder(autoencoder: ConvAutoencoder, images: Sequence[np.ndarray], config: OeSdnConfig,
                      residual: Literal["l2", "ssim"] = "l2") -> Detections:
    """Uint8 images → AE-baseline scores and maps, |x − AE(x)| ("l2") or 1 − SSIM(x, AE(x)) ("ssim")."""
    if residual == "l2":
        return _detect(lambda batch: (batch - autoencoder(batch)).abs(), autoencoder, images, config)
    if residual == "ssim":
        return _detect(lambda batch: 1.0 - ssim_map(batch, autoencoder(batch)), autoencoder, images, config)
    raise ValueError(f"residual must be 'l2' or 'ssim', got {residual!r}")


def image_scores(maps: torch.Tensor, rule: str = "max", top_fraction: float = 0.01) -> torch.Tensor:
    """(N, ...) anomaly maps → (N,) image scores: each map's maximum, the mean of its largest
    `top_fraction` of pixels ("top_k_mean"), or its mean. The export graph scores with it too."""
    flat = maps.flatten(1)
    if rule == "max":
        return flat.amax(1)
    if rule == "mean":
        return flat.mean(1)
    if rule != "top_k_mean":
        raise ValueError(f"image score rule must be 'max', 'top_k_mean' or 'mean', got {rule!r}")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction}")
    top_k = max(1, round(top_fraction * flat.shape[1]))
    return flat.topk(top_k, dim=1).values.mean(1)


def smoothed_map(residual: torch.Tensor, config: OeSdnConfig) -> torch.Tensor:
    """A (N, C, S, S) residual → the (N, 1, S, S) anomaly map: its mean over channels, Gaussian-smoothed."""
    anomaly = residual.float().mean(dim=1, keepdim=True)
    if config.smoothing_sigma > 0:
        anomaly = gaussian_blur(anomaly, config.smoothing_sigma, math.ceil(3 * config.smoothing_sigma))
    return anomaly


def _detect(residual: MapFunction, model: torch.nn.Module, images: Sequence[np.ndarray],
            config: OeSdnConfig) -> Detections:
    device = next(model.parameters()).device
    maps, scores = [], []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), config.batch_size), desc="reconstruction scoring", unit="batch",
                          disable=None, leave=False):
            batch = images_to_tensor(images[start:start + config.batch_size], config.image_size, config.channels)
            anomaly = smoothed_map(residual(batch.to(device)), config)
            maps.append(anomaly[:, 0].cpu().numpy())
            scores.append(image_scores(anomaly, config.image_score, config.score_top_fraction).cpu().numpy())
    size = config.image_size
    if not maps:
        return Detections(scores=np.empty(0, np.float32), maps=np.empty((0, size, size), dtype=np.float32))
    return Detections(scores=np.concatenate(scores), maps=np.concatenate(maps))
