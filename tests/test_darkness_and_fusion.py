"""The mean-darkness detector on real ELPV cells, and weighted fusion from the line config to the calibration."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from patchline.models.config import EvaluationConfig
from patchline.models.darkness import score_darkness
from patchline.models.scoring.calibration import FUSED, Calibration, fit_calibration, fuse
from patchline.models.scoring.detection import Detections
from patchline.models.scoring.metrics import image_auroc
from patchline.storage.sources.elpv import elpv_arrays


def test_darkness_rises_when_a_real_cell_dims_and_its_map_is_flat() -> None:
    images, levels, _ = elpv_arrays()
    cell = images[np.flatnonzero(levels == 0)[0]]
    dimmed = (cell // 2).astype(np.uint8)
    rgba = np.dstack([cell, cell, cell, np.zeros_like(cell)])
    detections = score_darkness([cell, dimmed, rgba], map_size=16)
    assert detections.scores[1] > detections.scores[0] + 0.1
    # The alpha channel is ignored: the RGBA copy is as dark as the grey cell.
    assert detections.scores[2] == pytest.approx(detections.scores[0])
    assert detections.maps.shape == (3, 16, 16)
    np.testing.assert_allclose(detections.maps[:, 5, 7], detections.scores)
    assert np.ptp(detections.maps, axis=(1, 2)).max() == 0


def test_darkness_separates_defective_elpv_cells_from_good_ones() -> None:
    """Defective cells are darker on average (inactive regions emit no EL): measured 0.78 on the whole protocol."""
    images, levels, _ = elpv_arrays()
    rng = np.random.default_rng(0)
    good = rng.choice(np.flatnonzero(levels == 0), 150, replace=False)
    defective = rng.choice(np.flatnonzero(levels == 3), 150, replace=False)
    scores = score_darkness(list(images[np.r_[good, defective]]), map_size=8).scores
    assert image_auroc(scores, np.r_[np.zeros(150, bool), np.ones(150, bool)]) > 0.7


def test_darkness_names_the_bad_image() -> None:
    with pytest.raises(ValueError, match="image 1: expected uint8"):
        score_darkness([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.float32)], map_size=4)


def _detections(scores: list[float]) -> Detections:
    values = np.asarray(scores, np.float32)
    return Detections(values, np.broadcast_to(values[:, None, None], (len(values), 2, 2)).copy())


def test_calibration_fuses_with_the_configured_weights_and_survives_json() -> None:
    good = {"patchcore": _detections([1, 2, 3, 4, 5]), "darkness": _detections([10, 20, 30, 40, 50])}
    # "oesdn" is not part of this run: its weight is dropped rather than failing the rebuild.
    calibration = fit_calibration(good, 90.0, "fused", {"patchcore": 1.0, "darkness": 0.5, "oesdn": 2.0})
    assert calibration.fusion_weights == {"patchcore": 1.0, "darkness": 0.5}
    test = {"patchcore": _detections([3.0, 3 + 1.4826]), "darkness": _detections([30.0, 30 + 4 * 14.826])}
    # Normalised: patchcore (0, 1), darkness (0, 4) → weighted mean (1 × 1 + 0.5 × 4) / 1.5 = 2.
    fused = fuse(test, Calibration.from_json(calibration.to_json()))
    np.testing.assert_allclose(fused.scores, [0.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(fused.maps[:, 1, 1], [0.0, 2.0], atol=1e-6)
    unweighted = fuse(test, fit_calibration(good, 90.0, "fused"))
    np.testing.assert_allclose(unweighted.scores, [0.0, 2.5], atol=1e-6)


def test_calibration_without_weights_still_loads() -> None:
    """Bundles saved before fusion weights existed hold no such key; they fuse every detector alike."""
    calibration = Calibration.from_json('{"normalisers": {}, "thresholds": {}, "decision_detector": "ae"}')
    assert calibration.fusion_weights is None


def test_weights_of_no_run_detector_fail_the_calibration() -> None:
    good = {"patchcore": _detections([1, 2, 3, 4, 5])}
    with pytest.raises(ValueError, match=r"every detector of this run \(\['patchcore'\]\) weight 0"):
        fit_calibration(good, 90.0, "patchcore", {"darkness": 1.0})


@pytest.mark.parametrize("weights, message", [
    ({"patchcore": 0.0}, "at least one detector a weight above 0"),
    ({"patchcore": -1.0}, "greater than or equal to 0"),
    ({"coreset": 1.0}, "fusion weight of 'coreset' is not a registered detector"),
])
def test_bad_fusion_weights_are_refused_by_the_config(weights, message) -> None:
    with pytest.raises(ValidationError, match=message):
        EvaluationConfig(fusion_weights=weights)


def test_the_decision_reads_only_the_detectors_it_weighs_and_fuses_without_the_others() -> None:
    """Issue 36: scoring runs only the detectors a decision reads; a fused score without the detectors it
    does not weigh is the same score, and one without a detector it weighs is refused."""
    rng = np.random.default_rng(3)
    good = {name: Detections(rng.gamma(2.0, 1.0, 40).astype(np.float32), rng.random((40, 4, 4), np.float32))
            for name in ("a", "b", "c")}
    calibration = fit_calibration(good, 95.0, FUSED, {"a": 1.0, "b": 0.5})
    assert calibration.decision_reads(["a", "b", "c"]) == ["a", "b", FUSED]
    assert fit_calibration(good, 95.0, "c", {"a": 1.0, "b": 0.5}).decision_reads(["a", "b", "c"]) == ["c"]
    assert fit_calibration(good, 95.0, FUSED).decision_reads(["a", "b", "c"]) == ["a", "b", "c", FUSED]
    whole = fuse(good, calibration)
    without_c = fuse({name: good[name] for name in ("a", "b")}, calibration)
    np.testing.assert_array_equal(without_c.scores, whole.scores)
    np.testing.assert_array_equal(without_c.maps, whole.maps)
    with pytest.raises(ValueError, match=r"weighs \['b'\], which were not scored"):
        fuse({"a": good["a"]}, calibration)
