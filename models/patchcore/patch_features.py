"""Locally aware patch features (PatchCore, Roth et al. CVPR 2022, section 3.1).

Each tapped stage's map is averaged over a `neighbourhood` x `neighbourhood` window (stride 1, zero
padded), the coarser maps are upsampled bilinearly to the finest (stride-8) grid, and the maps are
concatenated; optionally the channel axis is then adaptive-average-pooled to `target_dim`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from patchline.models.config import PatchCoreConfig
from patchline.models.images import images_to_tensor, pick_device
from patchline.models.patchcore.backbones import build_backbone


class PatchFeatureExtractor:
    """One backbone at one image size → (N, H*W, D) float32 patch features on the `grid` (H, W)."""

    def __init__(self, config: PatchCoreConfig, image_size: int, device: torch.device | None = None) -> None:
        self.config = config
        self.image_size = image_size
        self.backbone = build_backbone(config.backbone, image_size, config.layers, config.weights_path,
                                       device or pick_device())
        stride = self.backbone.strides[0]
        self.grid: tuple[int, int] = (image_size // stride, image_size // stride)
        channels = sum(self.backbone.channels)
        if config.target_dim is not None and config.target_dim > channels:
            raise ValueError(f"target_dim {config.target_dim} exceeds the {channels} channels of "
                             f"{config.backbone} layers {self.backbone.taps}; it can only reduce")
        self.dim: int = config.target_dim or channels

    def extract(self, batch: torch.Tensor) -> np.ndarray:
        """(N, 3, S, S) float batch in [0, 1] → (N, H*W, D) float32 patch features."""
        if self.config.normalise_brightness:
            batch = median_to_mid_grey(batch)
        maps = self.backbone(batch)
        with torch.inference_mode():
            features = locally_aware_features(maps, self.config, self.grid)
            return np.ascontiguousarray(features.float().cpu().numpy())

    def extract_images(self, images: Sequence[np.ndarray], progress: bool = True) -> Iterator[np.ndarray]:
        """uint8 images (H, W) or (H, W, C), resized to the image size → features per batch of `batch_size`."""
        batch_size = self.config.batch_size
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="patch features", unit="batch", disable=None if progress else True):
            yield self.extract(images_to_tensor(images[start:start + batch_size], self.image_size))


def locally_aware_features(maps: list[torch.Tensor], config: PatchCoreConfig, grid: tuple[int, int]) -> torch.Tensor:
    """The tapped stages' maps → (N, H*W, D) patch features on `grid`."""
    size = config.neighbourhood
    # Zero padding counted in the average (as PatchCore's reference pooling does) damps border
    # patches. Averaging only the in-map pixels instead measured lower on elpv-mono
    # (benchmarks/README.md, "Figures behind settings in the code").
    pooled = [F.avg_pool2d(m, size, stride=1, padding=size // 2, count_include_pad=True) for m in maps]
    upsampled = [pooled[0]] + [F.interpolate(p, size=grid, mode="bilinear", align_corners=False) for p in pooled[1:]]
    features = torch.cat(upsampled, dim=1).permute(0, 2, 3, 1).flatten(1, 2)
    if config.target_dim is not None:
        features = F.adaptive_avg_pool1d(features, config.target_dim)
    return features


def median_to_mid_grey(batch: torch.Tensor) -> torch.Tensor:
    """Scale each image of a (N, C, H, W) batch in [0, 1] so its median is 0.5, clipped to [0, 1]."""
    flat = batch.flatten(1)
    # ONNX has no median: the export finds the same lower median by bisection.
    median = lower_median_by_bisection(flat) if torch.onnx.is_in_onnx_export() else flat.median(dim=1).values
    # The floor keeps an all-black image finite (it stays black).
    median = median.clamp_min(1 / 255)
    return (batch * (0.5 / median).view(-1, 1, 1, 1)).clamp(0.0, 1.0)


# Halvings of [-1, 1] that narrow it below float32's spacing at 1/255, the median's floor above.
_BISECTION_STEPS = 34


def lower_median_by_bisection(flat: torch.Tensor) -> torch.Tensor:
    """(N, P) values in [0, 1] → each row's lower median, the value `torch.median` returns, from counts of
    the values below a bisected bound: a few dozen passes over the values, where ONNX's one other way, a
    top-k of half of them, took longer than the backbone (benchmarks/README.md, issue 24)."""
    rank = (flat.shape[1] - 1) // 2 + 1  # the lower median is the smallest value with this many at or below it
    low = torch.full_like(flat[:, 0], -1.0)  # fewer than `rank` values at or below
    high = torch.ones_like(low)  # at least `rank` values at or below
    for _ in range(_BISECTION_STEPS):
        middle = (low + high) / 2
        # Counts summed as float32 (exact below 2**24 values): ONNX Runtime sums integers several times slower.
        enough = (flat <= middle[:, None]).to(flat.dtype).sum(1) >= rank
        high = torch.where(enough, middle, high)
        low = torch.where(enough, low, middle)
    # Only the median itself lies in (low, high] now: the largest value at or below `high`.
    return torch.where(flat <= high[:, None], flat, torch.full_like(flat, -1.0)).amax(1)
