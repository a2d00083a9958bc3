"""Every detector's score on one 0..1 scale, 0.5 at its threshold, fitted with the calibration."""

from __future__ import annotations

import json

import numpy as np
import pytest

from patchline.models.scoring.calibration import Calibration, fit_calibration
from patchline.models.scoring.detection import Detections
from patchline.models.scoring.unit_scale import GOOD_MEDIAN_UNIT, fit_unit_slope, unit_scores


def test_scores_on_the_0_to_1_scale_are_half_at_the_threshold_and_keep_the_order():
    rng = np.random.default_rng(3)
    good = {"patchcore": Detections(rng.gamma(4.0, 10.0, 60).astype(np.float32), np.zeros((60, 4, 4), np.float32)),
            "oesdn": Detections(rng.normal(0.14, 0.01, 60).astype(np.float32), np.zeros((60, 4, 4), np.float32))}
    calibration = fit_calibration(good, 95.0, "patchcore")
    assert calibration.target_false_positive_rate == pytest.approx(0.05)
    for name, detections in good.items():
        threshold = calibration.thresholds[name]
        assert calibration.unit_scores(name, np.array([threshold]))[0] == 0.5
        median = calibration.unit_scores(name, np.array([np.median(detections.scores)]))[0]
        assert median == pytest.approx(GOOD_MEDIAN_UNIT, abs=1e-6)
        raw = np.sort(np.concatenate([detections.scores, threshold * np.array([0.0, 2.0, 1e30])]))
        unit = calibration.unit_scores(name, raw)
        assert np.all(np.diff(unit) >= 0) and unit.min() >= 0 and unit.max() == 1.0
        assert np.array_equal(unit > 0.5, raw > threshold)
    # The slopes travel with the version; a version calibrated before them gives NaN, not a made-up scale.
    assert Calibration.from_json(calibration.to_json()) == calibration
    older = json.loads(calibration.to_json())
    del older["unit_slopes"], older["target_false_positive_rate"]
    assert np.isnan(Calibration.from_json(json.dumps(older)).unit_scores("patchcore", np.ones(2))).all()


def test_the_0_to_1_scale_survives_goods_whose_median_is_their_threshold():
    slope = fit_unit_slope(np.full(8, 3.0), 3.0)
    unit = unit_scores(np.array([0.0, 3.0, 6.0]), 3.0, slope)
    assert slope > 0 and np.isfinite(unit).all() and unit[0] < 0.5 == unit[1] < unit[2]
