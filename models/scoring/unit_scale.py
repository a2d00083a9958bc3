"""Scores an operator can read: every detector's raw score mapped to 0..1, with 0.5 at its threshold.

Raw scores mean nothing outside their detector (a PatchCore distance of 40, an OE-SDN residual of
0.14). The map is a logistic of the raw score centred on the detector's threshold; its slope puts the
median held-out good image at `GOOD_MEDIAN_UNIT`. Both come from the calibration goods alone, so the
map is fitted with the threshold and is strictly increasing: it changes no ranking and no decision.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

GOOD_MEDIAN_UNIT = 0.1


def fit_unit_slope(good_scores: ArrayLike, threshold: float) -> float:
    """The logistic's slope: the median good image at `GOOD_MEDIAN_UNIT`, the threshold at 0.5."""
    good = np.asarray(good_scores, dtype=np.float64)
    spread = threshold - float(np.median(good))
    if not spread > 0:
        # Goods whose median reaches the threshold (a tiny or constant calibration set): their spread sets it.
        spread = float(good.std()) or abs(threshold) or 1.0
    return math.log(1 / GOOD_MEDIAN_UNIT - 1) / spread


def unit_scores(scores: ArrayLike, threshold: float, slope: float) -> np.ndarray:
    """Raw scores → 0..1 (float32), 0.5 exactly at `threshold`, increasing with the raw score."""
    z = (np.asarray(scores, dtype=np.float64) - threshold) * slope
    return (0.5 * (1 + np.tanh(z / 2))).astype(np.float32)  # the logistic, without overflow for large |z|


def detector_unit_scores(name: str, scores: ArrayLike, thresholds: dict[str, float],
                         slopes: dict[str, float] | None) -> np.ndarray:
    """Detector `name`'s scores on the 0..1 scale; NaN where no slope was fitted for it (a version
    calibrated before the 0..1 scale)."""
    if not slopes or name not in slopes:
        return np.full(len(scores), np.nan, np.float32)
    return unit_scores(scores, thresholds[name], slopes[name])


def scored_detectors(output: dict[str, np.ndarray]) -> list[str]:
    """The detectors (and `fused`) whose `score_<detector>` a `line_output` dict holds."""
    return [key.removeprefix("score_") for key in output
            if key.startswith("score_") and not key.startswith("score_unit")]


def line_output(scores: dict[str, np.ndarray], decider: str, decider_maps: np.ndarray, thresholds: dict[str, float],
                slopes: dict[str, float] | None) -> dict[str, np.ndarray]:
    """What a line's model returns for N images, from every detector's scores (N,) and the deciding
    detector's maps (N, S, S): `score`, `decision`, `threshold`, `anomaly_map` and `score_unit` of the
    deciding detector, and `score_<detector>`, `score_unit_<detector>` of each. The pyfunc and
    `patchline.runtime` both build their result here."""
    chosen, threshold = scores[decider], thresholds[decider]
    output = {"score": chosen, "decision": chosen >= threshold,
              "threshold": np.full(len(chosen), threshold, np.float32), "anomaly_map": decider_maps, "score_unit": detector_unit_scores(decider, chosen, thresholds, slopes)}
    output.update({f"score_{name}": values for name, values in scores.items()})
    output.update({f"score_unit_{name}": detector_unit_scores(name, values, thresholds, slopes)
                   for name, values in scores.items()})
    return output
