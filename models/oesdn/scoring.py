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


def image_scores(maps: np.ndarray, rule: str = "max", top_fraction: float = 0.01) -> np.ndarray:
    """(N, H, W) anomaly maps → (N,) image scores: each map's maximum, the mean of its largest
    `top_fraction` of pixels ("top_k_mean"), or its mean."""
    flat = maps.reshape(len(maps), -1)
    if not len(flat):
        return np.empty(0, dtype=maps.dtype)
    if rule == "max":
        return flat.max(axis=1)
    if rule == "mean":
        return flat.mean(axis=1)
    if rule != "top_k_mean":
        raise ValueError(f"image score rule must be 'max', 'top_k_mean' or 'mean', got {rule!r}")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction}")
    top_k = max(1, round(top_fraction * flat.shape[1]))
    return np.partition(flat, flat.shape[1] - top_k, axis=1)[:, -top_k:].mean(axis=1)


def _detect(residual: MapFunction, model: torch.nn.Module, images: Sequence[np.ndarray],
            config: OeSdnConfig) -> Detections:
    device = next(model.parameters()).device
    maps = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), config.batch_size), desc="reconstruction scoring", unit="batch",
                          disable=None, leave=False):
            batch = images_to_tensor(images[start:start + config.batch_size], config.image_size, config.channels)
            anomaly = residual(batch.to(device)).float().mean(dim=1, keepdim=True)
            if config.smoothing_sigma > 0:
                anomaly = gaussian_blur(anomaly, config.smoothing_sigma, math.ceil(3 * config.smoothing_sigma))
            maps.append(anomaly[:, 0].cpu().numpy())
    size = config.image_size
    all_maps = np.concatenate(maps) if maps else np.empty((0, size, size), dtype=np.float32)
    return Detections(scores=image_scores(all_maps, config.image_score, config.score_top_fraction), maps=all_maps)
