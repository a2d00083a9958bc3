"""Calibration on held-out good images: per-detector normalisers and thresholds, and the fused detector.

Raw scores of different detectors live on different scales, so each is normalised with statistics of
held-out good images before fusing; the same held-out scores give each detector its decision threshold.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from patchline.models.scoring.detection import Detections
from patchline.models.scoring.metrics import fit_fusion_normalisers, fuse_scores, threshold_from_good_scores
from patchline.models.scoring.unit_scale import detector_unit_scores, fit_unit_slope

FUSED = "fused"


@dataclass(frozen=True)
class Calibration:
    """Fitted on held-out good images only: per-detector normalisers, thresholds, and the deciding detector."""

    normalisers: dict[str, dict[str, float]]
    thresholds: dict[str, float]
    decision_detector: str
    # Weights of the normalised scores in `fused` (None = alike); kept here so a deployed model fuses
    # exactly as the rebuild that set its fused threshold did.
    fusion_weights: dict[str, float] | None = None
    # Per detector, the slope of its 0..1 score (models/scoring/unit_scale.py), and the share of good
    # images its threshold was set to flag; None in versions calibrated before the 0..1 scores.
    unit_slopes: dict[str, float] | None = None
    target_false_positive_rate: float | None = None

    def unit_scores(self, name: str, scores: np.ndarray) -> np.ndarray:
        """Detector `name`'s raw scores on the 0..1 scale (0.5 = its threshold); NaN when uncalibrated for it."""
        return detector_unit_scores(name, scores, self.thresholds, self.unit_slopes)

    def decision_reads(self, detectors: list[str]) -> list[str]:
        """Of a line's `detectors`, those its decisions read: the deciding one, or when that is `fused`, the
        detectors it weighs (and `fused`)."""
        if self.decision_detector != FUSED:
            return [self.decision_detector]
        weights = self.fusion_weights
        return [name for name in detectors if weights is None or weights.get(name, 0.0) > 0] + [FUSED]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        return cls(**json.loads(text))


def fit_calibration(good: dict[str, Detections], percentile: float, decision_detector: str,
                    fusion_weights: dict[str, float] | None = None) -> Calibration:
    """Normalisers and thresholds from the held-out good images' detections of each base detector."""
    normalisers = fit_fusion_normalisers({name: d.scores for name, d in good.items()})
    if fusion_weights is not None:
        fusion_weights = {name: weight for name, weight in fusion_weights.items() if name in good}
        if not any(fusion_weights.values()):
            raise ValueError(f"fusion_weights give every detector of this run ({sorted(good)}) weight 0")
    fused = fuse_scores({name: d.scores for name, d in good.items()}, normalisers, fusion_weights)
    good_scores = {**{name: d.scores for name, d in good.items()}, FUSED: fused}
    thresholds = {name: threshold_from_good_scores(scores, percentile) for name, scores in good_scores.items()}
    if decision_detector not in thresholds:
        raise ValueError(f"decision detector {decision_detector!r} is not one of {sorted(thresholds)}")
    slopes = {name: fit_unit_slope(scores, thresholds[name]) for name, scores in good_scores.items()}
    return Calibration(normalisers, thresholds, decision_detector, fusion_weights, slopes, 1 - percentile / 100)


def fuse(detections: dict[str, Detections], calibration: Calibration) -> Detections:
    """The fused detector: weighted mean of normalised scores, and of maps normalised with the same statistics.
    Detectors that weigh 0 may be left out of `detections`; one that weighs is needed."""
    weights = calibration.fusion_weights
    weighing = set(calibration.normalisers) if weights is None else {n for n, w in weights.items() if w > 0}
    if weighing - set(detections):
        raise ValueError(f"the fused score weighs {sorted(weighing - set(detections))}, which were not scored")
    normalisers = {name: calibration.normalisers[name] for name in detections}
    weights = None if weights is None else {name: w for name, w in weights.items() if name in detections}
    scores = fuse_scores({name: d.scores for name, d in detections.items()}, normalisers, weights)
    maps = fuse_scores({name: d.maps for name, d in detections.items()}, normalisers, weights)
    return Detections(scores.astype(np.float32), maps.astype(np.float32))


def resize_maps(detections: Detections, size: int) -> Detections:
    """The same detections with maps resized (bilinear) to `size` × `size`."""
    if detections.maps.shape[1:] == (size, size):
        return detections
    maps = F.interpolate(torch.from_numpy(detections.maps)[:, None], size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0].numpy()
    return Detections(detections.scores, maps)
