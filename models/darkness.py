"""Mean darkness: a fit-free global detector for electroluminescence (EL) images.

An EL image shows where a solar cell emits light under forward bias; cracked-off, inactive or badly
contacted regions emit little and show dark, so a defective cell is on average darker than a good
one. On the ELPV protocol mean darkness alone separates good from defective cells well above chance, and
fused with PatchCore (which compares local texture, not overall brightness) it lifts PatchCore — figures in
benchmarks/README.md, "Fusing mean darkness". It has no notion of where the defect is, so its map is flat: in the
fused map it shifts a whole image up or down and leaves the localisation to the other detectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from patchline.models.config import LineConfig
from patchline.models.detector_spec import Detector, Fitted
from patchline.models.scoring.detection import Detections


def score_darkness(images: Sequence[np.ndarray], map_size: int) -> Detections:
    """uint8 images (H, W) or (H, W, C) → score = 1 − mean intensity in [0, 1]; map = that score everywhere."""
    scores = np.empty(len(images), dtype=np.float32)
    for index, image in enumerate(images):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"image {index}: expected uint8 pixels, got {array.dtype}")
        if array.ndim == 3:
            # An alpha channel says nothing about brightness.
            array = array[:, :, :3]
        elif array.ndim != 2:
            raise ValueError(f"image {index}: expected (H, W) or (H, W, C), got {array.shape}")
        scores[index] = 1.0 - array.mean(dtype=np.float64) / 255.0
    maps = np.broadcast_to(scores[:, None, None], (len(images), map_size, map_size)).copy()
    return Detections(scores, maps)


class DarknessDetector:
    """Mean darkness as a line detector: nothing to fit, nothing to save."""

    def __init__(self, map_size: int) -> None:
        self.map_size = map_size

    def score(self, images: Sequence[np.ndarray], progress: bool = False) -> Detections:
        return score_darkness(images, self.map_size)

    def graph(self) -> DarknessGraph:
        return DarknessGraph(self.map_size)

    def save(self, folder: Path) -> None:
        pass

    @classmethod
    def load(cls, folder: Path, config: LineConfig, device: torch.device | None = None) -> DarknessDetector:
        return cls(config.image_size)


def fit_darkness(config: LineConfig, images: Sequence[np.ndarray], fitted: Mapping[str, Detector]) -> Fitted:
    """Nothing to learn: the detector for the line's map size (the images are not read)."""
    return Fitted(DarknessDetector(config.image_size))


class DarknessGraph(torch.nn.Module):
    """(1, 3, H, W) pixels in [0, 1] (grey replicated) → 1 − their mean (1,), and that everywhere (1, S, S)."""

    def __init__(self, map_size: int) -> None:
        super().__init__()
        self.map_size = map_size

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A float32 sum over a whole image drifts by ~1e-4 (relative) from the float64 mean of `score_darkness`,
        # and OpenVINO computes float64 as float32. A row's sum of 0..255 values is an integer below 2**24,
        # exact in float32: the mean of the rows' means leaves a float32 sum of only C * H terms.
        levels = (pixels * 255.0).round()
        score = 1.0 - (levels.sum(3) / levels.shape[3]).flatten(1).mean(1) / 255.0
        return score, score.view(-1, 1, 1).expand(-1, self.map_size, self.map_size)
