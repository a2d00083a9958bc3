"""A toy detector, added as a user adds one (ARCHITECTURE.md, "Adding a detector"): this module, one entry
in the registry (`register`) and one settings section (`detector_settings: {toy: {...}}`), nothing else.

It learns the mean good image at `size` px and scores the distance from it: |x − mean|, its mean over the
map as the image score. Its scoring is its graph run on each image, so the export traces the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn import functional as F

from patchline.models.config import LineConfig
from patchline.models.detector_spec import Detector, DetectorSpec, Fitted
from patchline.models.detectors import DETECTORS
from patchline.models.scoring.detection import Detections

MEAN = "toy_mean.npy"


class ToySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    size: int = Field(16, ge=4)


def grey(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) pixels in [0, 1] → their grey level at size × size, (N, 1, size, size)."""
    return F.interpolate(pixels.mean(1, keepdim=True), size=(size, size), mode="bilinear", align_corners=False)


class ToyGraph(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, map_size: int) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.map_size = map_size

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        distance = (grey(pixels, self.mean.shape[-1]) - self.mean).abs()
        return distance.flatten(1).mean(1), F.interpolate(distance, size=(self.map_size, self.map_size),
                                                          mode="bilinear", align_corners=False)[:, 0]


class ToyDetector:
    def __init__(self, mean: np.ndarray, map_size: int) -> None:
        self.mean, self.map_size = mean, map_size

    def graph(self) -> ToyGraph:
        return ToyGraph(torch.from_numpy(self.mean)[None, None], self.map_size)

    def score(self, images: Sequence[np.ndarray], progress: bool = False) -> Detections:
        graph = self.graph()
        with torch.inference_mode():
            results = [graph(_pixels(image)) for image in images]
        return Detections(np.concatenate([s.numpy() for s, _ in results]).astype(np.float32),
                          np.concatenate([m.numpy() for _, m in results]).astype(np.float32))

    def save(self, folder: Path) -> None:
        np.save(folder / MEAN, self.mean)

    @classmethod
    def load(cls, folder: Path, config: LineConfig, device: torch.device | None = None) -> ToyDetector:
        return cls(np.load(folder / MEAN), config.image_size)


def _pixels(image: np.ndarray) -> torch.Tensor:
    grey = image if image.ndim == 2 else image[:, :, :3].mean(2)
    return torch.from_numpy(np.repeat(np.asarray(grey, np.float32)[None, None] / 255.0, 3, axis=1))


def fit_toy(config: LineConfig, images: Sequence[np.ndarray], fitted: Mapping[str, Detector]) -> Fitted:
    size = config.settings_of("toy").size
    mean = torch.cat([grey(_pixels(image), size) for image in images]).mean(0)[0]
    return Fitted(ToyDetector(mean.numpy(), config.image_size))


def register(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DETECTORS, "toy", DetectorSpec(load=ToyDetector.load, fit=fit_toy, settings=ToySettings))
