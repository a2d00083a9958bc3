"""The detector interface, and the one registry of the detectors a line can enable.

A detector scores uint8 images into `Detections` with maps at the line's image size, saves its fitted
parts into a model bundle folder and loads them back, and gives its scoring of one image as a module
that ONNX export traces (models/export_graph.py). Adding one means its module, its entry here and
its config section (`models/config.py`); fitting it is a task of the rebuild flow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from patchline.models.config import LineConfig
from patchline.models.darkness import DarknessDetector
from patchline.models.oesdn.detector import AutoencoderDetector, OeSdnDetector
from patchline.models.patchcore.detector import PatchCoreDetector
from patchline.models.scoring.detection import Detections


class Detector(Protocol):
    def score(self, images: Sequence[np.ndarray], progress: bool = False) -> Detections: ...

    def save(self, folder: Path) -> None: ...

    def graph(self) -> torch.nn.Module:
        """(1, 3, H, W) float pixels in [0, 1] → (image score (1,), map (1, S, S)), as `score` computes them."""


Loader = Callable[[Path, LineConfig, torch.device | None], Detector]

DETECTORS: dict[str, Loader] = {
    "patchcore": PatchCoreDetector.load,
    "oesdn": OeSdnDetector.load,
    "ae": AutoencoderDetector.load,
    "darkness": DarknessDetector.load,
}


def load_detectors(folder: Path, config: LineConfig, device: torch.device | None = None) -> dict[str, Detector]:
    """The line's enabled detectors, read from a bundle folder that their `save` wrote."""
    return {name: DETECTORS[name](folder, config, device) for name in config.evaluation.detectors}
