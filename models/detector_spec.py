"""What a detector is to patchline: the `Detector` interface of a fitted one, and the `DetectorSpec` that
registers it (models/detectors.py) with how it is fitted, loaded and configured.

A fitted detector scores uint8 images into `Detections` with maps at the line's image size, saves its
parts into a model bundle folder (`DetectorSpec.load` reads them back), and gives its scoring of one image
as a module that ONNX export traces (models/export_graph.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from pydantic import BaseModel

from patchline.models.scoring.detection import Detections

if TYPE_CHECKING:
    from patchline.models.config import LineConfig


class Detector(Protocol):
    def score(self, images: Sequence[np.ndarray], progress: bool = False) -> Detections: ...

    def save(self, folder: Path) -> None: ...

    def graph(self) -> torch.nn.Module:
        """(1, 3, H, W) float pixels in [0, 1] → (image score (1,), map (1, S, S)), as `score` computes them."""


@dataclass(frozen=True)
class Fitted:
    """A fitted detector and the per-epoch losses of each network it trained, by network."""

    detector: Detector
    histories: dict[str, dict[str, list[float]]] = field(default_factory=dict)


# (line config, good fit images, the detectors of its `after` already fitted in this rebuild) → the fitted
# detector. Every rebuild, incremental or full, fits it on all the fit images: the same images, config and
# seed give the same detector (benchmarks/README.md, "Incremental rebuilds retrain the networks").
Fit = Callable[["LineConfig", Sequence[np.ndarray], Mapping[str, Detector]], Fitted]
Loader = Callable[[Path, "LineConfig", torch.device | None], Detector]


@dataclass(frozen=True)
class DetectorSpec:
    """One registered detector.

    `fit` trains it on the good fit images; None means it is fitted from the line's patch-feature store
    (PatchCore: tasks/patchcore.py extracts, selects the coreset and builds the bank). `settings` is the
    pydantic model of its own config section, `detector_settings: {<name>: ...}` in a line config (the
    built-in detectors have theirs as `patchcore:` and `oesdn:`). `after` names detectors that, when the
    line enables them too, are fitted first and handed to `fit` (OE-SDN reuses the AE baseline's
    autoencoder instead of training a second one). `self_checked` detectors are put through the line's
    self-check (models/scoring/self_check.py), which leaves out one that cannot see painted defects; a
    detector that measures one property by design (darkness) is not judged by it."""

    load: Loader
    fit: Fit | None
    settings: type[BaseModel] | None = None
    after: tuple[str, ...] = ()
    self_checked: bool = False
