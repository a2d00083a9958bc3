"""One product line's fitted detectors together, calibrated: images in, detections and decisions out."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from patchline.models.config import LineConfig
from patchline.models.detector_spec import Detector
from patchline.models.scoring.calibration import FUSED, Calibration, fuse
from patchline.models.scoring.detection import Detections


class LineDetector:
    """The detectors a line enables; `score` turns uint8 images into detections per detector."""

    def __init__(self, config: LineConfig, detectors: Mapping[str, Detector],
                 calibration: Calibration | None = None) -> None:
        missing = [name for name in config.evaluation.detectors if name not in detectors]
        if missing:
            raise ValueError(f"line {config.name} enables {missing} but no fitted detector was given for them")
        self.config, self.calibration = config, calibration
        self.detectors = {name: detectors[name] for name in config.evaluation.detectors}

    def score(self, images: Sequence[np.ndarray], progress: bool = False,
              only: Collection[str] | None = None) -> dict[str, Detections]:
        """Uint8 images → detections of every enabled detector (and `fused` once calibrated), or of the
        detectors named in `only` (`fused` among them when named)."""
        names = list(self.detectors) if only is None else [name for name in self.detectors if name in only]
        results = {name: self.detectors[name].score(images, progress) for name in names}
        if self.calibration is not None and len(self.detectors) > 1 and (only is None or FUSED in only):
            results[FUSED] = fuse(results, self.calibration)
        return results

    def decision_reads(self) -> list[str]:
        """The detectors (and `fused`) that this line's decisions read (`Calibration.decision_reads`)."""
        if self.calibration is None:
            raise ValueError("this detector is not calibrated: no decision to read")
        return self.calibration.decision_reads(list(self.detectors))

    def decide(self, detections: dict[str, Detections]) -> tuple[Detections, np.ndarray, float]:
        """The deciding detector's detections, its per-image decisions (True = anomalous) and threshold."""
        if self.calibration is None:
            raise ValueError("this detector is not calibrated: no threshold to decide with")
        name = self.calibration.decision_detector
        threshold = self.calibration.thresholds[name]
        chosen = detections[name]
        return chosen, chosen.scores >= threshold, threshold
