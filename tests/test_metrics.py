"""patchline.models.scoring.metrics against scikit-learn, hand-computed cases, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score, roc_curve

from patchline.models.scoring import metrics
from patchline.models.scoring.metrics import (
    aupro, best_detector, error_rates_at_threshold, evaluate_detector, f1_max, fit_fusion_normalisers,
    fuse_scores, image_auroc, pixel_auroc, pr_curve_points, roc_curve_points, threshold_from_good_scores,
)

HAND_SCORES = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.1, 0.9])
HAND_CLASSES = np.array([0, 0, 1, 1, 1, 0, 1, 0], bool)


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Even seeds: few distinct integer scores (many ties); odd seeds: continuous scores."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    classes = rng.random(n) < rng.uniform(0.1, 0.9)
    classes[:2] = (True, False)
    scores = rng.integers(0, 6, n).astype(float) if seed % 2 == 0 else rng.normal(size=n) + classes
    return scores, classes


CASES = [(HAND_SCORES, HAND_CLASSES)] + [_random_case(seed) for seed in range(8)]


@pytest.mark.parametrize(("scores", "classes"), CASES)
def test_image_curves_and_auroc_match_sklearn(scores: np.ndarray, classes: np.ndarray) -> None:
    assert image_auroc(scores, classes) == pytest.approx(roc_auc_score(classes, scores), abs=1e-12)
    for ours, theirs in zip(roc_curve_points(scores, classes), roc_curve(classes, scores, drop_intermediate=False)):
        np.testing.assert_allclose(ours, theirs)
    for ours, theirs in zip(pr_curve_points(scores, classes), precision_recall_curve(classes, scores)):
        np.testing.assert_allclose(ours, theirs)


@pytest.mark.parametrize(("scores", "classes"), CASES)
def test_f1_max_is_the_best_f1_over_thresholds_and_its_highest_threshold(scores: np.ndarray,
                                                                           classes: np.ndarray) -> None:
    best, threshold = f1_max(scores, classes)
    every = {t: f1_score(classes, scores >= t) for t in np.unique(scores)}
    assert best == pytest.approx(max(every.values()), abs=1e-12)
    assert threshold == max(t for t, f1 in every.items() if f1 == pytest.approx(best, abs=1e-12))


def test_hand_case_auroc_value() -> None:
    # 4 anomalies × 4 goods = 16 pairs. Anomaly 0.35 beats goods 0.1 (1 pair); 0.8 beats 0.1, 0.4, 0.4
    # (3); 0.4 beats 0.1 and ties 0.4 twice (1 + 1); 0.1 ties 0.1 (0.5) → 6.5 / 16.
    assert image_auroc(HAND_SCORES, HAND_CLASSES) == 6.5 / 16


def _maps_and_masks(seed: int, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 12, 12), bool)
    masks[1, 2:5, 3:8] = True
    masks[2, 7:11, 1:3] = True
    masks[2, 0, 11] = True
    masks[4, 5:9, 5:9] = True
    maps = rng.integers(0, 4, masks.shape) if tied else rng.random(masks.shape)
    return (maps + masks * rng.uniform(0, 2)).astype(np.float32), masks


@pytest.mark.parametrize("tied", [True, False])
def test_pixel_auroc_matches_sklearn(tied: bool) -> None:
    maps, masks = _maps_and_masks(3, tied)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(maps, masks.astype(np.uint8)) == pytest.approx(expected, abs=1e-12)


def test_pixel_metrics_stream_in_chunks_and_read_zarr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    maps, masks = _maps_and_masks(5, tied=True)
    whole = (pixel_auroc(maps, masks), aupro(maps, masks))
    # Two images per chunk: normal pixels of one chunk are counted against defect values of others.
    monkeypatch.setattr(metrics, "_CHUNK_PIXELS", 2 * 12 * 12)
    stored_maps = zarr.create_array(tmp_path / "maps.zarr", shape=maps.shape, chunks=(2, 12, 12), dtype="float32")
    stored_maps[:] = maps
    stored_masks = zarr.create_array(tmp_path / "masks.zarr", shape=masks.shape, chunks=(2, 12, 12), dtype="bool")
    stored_masks[:] = masks
    assert (pixel_auroc(stored_maps, stored_masks), aupro(stored_maps, stored_masks)) == pytest.approx(whole, abs=1e-12)


def _aupro_hand_case(tie: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two 1×7 maps. Image 0 holds region R1 (pixels 0-2) and region R2 (pixel 5); image 1 is all normal."""
    masks = np.zeros((2, 1, 7), bool)
    masks[0, 0, [0, 1, 2, 5]] = True
    maps = np.array([[[0.9, 0.8, 0.3, 0.1, 0.1, 0.7, 0.1]],
                     [[0.85, 0.7 if tie else 0.6, 0.2, 0.1, 0.1, 0.1, 0.1]]])
    return maps, masks


def test_aupro_on_a_hand_computed_case() -> None:
    # Normal pixels (10): 0.85, 0.6, 0.2 and seven 0.1. Flagging score >= t, the (FPR, PRO) points are
    #   t=0.9 → (0, 1/6) [R1 1/3, R2 0]; 0.85 → (0.1, 1/6); 0.8 → (0.1, 1/3); 0.7 → (0.1, 5/6);
    #   0.6 → (0.2, 5/6); 0.3 → (0.2, 1); 0.2 → (0.3, 1); 0.1 → (1, 1), starting from (0, 0).
    # Area up to FPR 0.3: 0.1·1/6 + 0.1·5/6 + 0.1·1 = 0.2 → normalised 0.2 / 0.3 = 2/3.
    # Up to 0.25: 0.1·1/6 + 0.1·5/6 + 0.05·1 = 0.15 → 0.15 / 0.25 = 0.6.
    maps, masks = _aupro_hand_case(tie=False)
    assert aupro(maps, masks) == pytest.approx(2 / 3, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=0.25) == pytest.approx(0.6, abs=1e-12)


def test_aupro_draws_a_tied_threshold_as_a_straight_segment() -> None:
    # As above but the normal 0.6 becomes 0.7, tying with R2: at t=0.7 the curve goes straight from
    # (0.1, 1/3) to (0.2, 5/6), a trapezoid of 0.1·(1/3 + 5/6)/2 = 7/120 instead of 10/120.
    # Area up to 0.3: 2/120 + 7/120 + 12/120 = 21/120 → normalised 21/120 / 0.3 = 7/12.
    maps, masks = _aupro_hand_case(tie=True)
    assert aupro(maps, masks) == pytest.approx(7 / 12, abs=1e-12)


def test_threshold_and_error_rates_on_a_hand_case() -> None:
    # 90th percentile of 1..5 with linear interpolation: position 0.9·4 = 3.6 → 4 + 0.6·(5 − 4) = 4.6.
    threshold = threshold_from_good_scores([5, 1, 3, 2, 4], percentile=90)
    assert threshold == pytest.approx(4.6)
    scores = np.array([1.0, threshold, 5.0, 4.5, threshold, 9.0, 10.0])
    classes = np.array([0, 0, 0, 1, 1, 1, 1], bool)
    # Goods flagged (>= threshold): 4.6 and 5 → 2/3; anomalies missed: 4.5 → 1/4.
    assert error_rates_at_threshold(scores, classes, threshold) == pytest.approx((2 / 3, 1 / 4))


def test_fusion_normalises_with_median_and_mad_of_good_scores() -> None:
    # a: median 3, |deviations| 2,1,0,1,97 → MAD 1 (the outlier 100 does not move it); b: median 30, MAD 10.
    normalisers = fit_fusion_normalisers({"a": [1, 2, 3, 4, 100], "b": [10, 20, 30, 40, 50]})
    assert normalisers == {"a": {"center": 3.0, "scale": pytest.approx(1.4826)},
                           "b": {"center": 30.0, "scale": pytest.approx(14.826)}}
    test_scores = {"a": np.array([3.0, 3 + 1.4826]), "b": np.array([30.0, 30 + 2 * 14.826])}
    np.testing.assert_allclose(fuse_scores(test_scores, normalisers), [0.0, 1.5])
    # Weighted: (1 × 1 + 3 × 2) / 4; a detector left out of the weights weighs 0.
    np.testing.assert_allclose(fuse_scores(test_scores, normalisers, {"a": 1.0, "b": 3.0}), [0.0, 1.75])
    np.testing.assert_allclose(fuse_scores(test_scores, normalisers, {"b": 2.0}), [0.0, 2.0])
    maps = {"a": np.full((2, 4, 4), 3 + 1.4826), "b": np.full((2, 4, 4), 30.0)}
    np.testing.assert_allclose(fuse_scores(maps, normalisers), np.full((2, 4, 4), 0.5))


def test_best_detector_picks_the_highest_metric() -> None:
    results = {"patchcore": {"image_auroc": 0.91}, "oesdn": {"image_auroc": 0.95}, "fused": {"image_auroc": 0.93}}
    assert best_detector(results) == "oesdn"
    with pytest.raises(ValueError, match="aupro_30"):
        best_detector(results, "aupro_30")


def test_evaluate_detector_reports_every_metric() -> None:
    rng = np.random.default_rng(0)
    labels = np.array(["good"] * 20 + ["anomaly"] * 12 + ["ambiguous"] * 5)
    types = np.array(["good"] * 20 + ["Scratch"] * 6 + ["broken large"] * 6 + ["?"] * 5)
    scores = rng.normal(size=len(labels)) + (labels == "anomaly") * np.where(types == "Scratch", 2.0, 0.5)
    scores[-5:] = [0.0, 1.5, 2.0, 3.0, 4.5]
    maps = rng.random((len(labels), 8, 8)).astype(np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[20:32, 2:5, 2:5] = True
    maps[masks] += 0.3
    # Ambiguous images carry masks that pixel metrics must ignore.
    masks[32:, :4] = True
    held_out_goods = np.linspace(-2.0, 2.0, 101)

    result = evaluate_detector(scores, labels, types, maps, masks, good_scores_for_threshold=held_out_goods,
                               percentile=75)

    known = labels != "ambiguous"
    is_anomaly = labels[known] == "anomaly"
    assert set(result) == {
        "count_good", "count_anomaly", "count_ambiguous", "image_auroc", "image_f1_max", "f1_threshold",
        "threshold", "fpr_at_threshold", "miss_rate_at_threshold", "auroc_defect_scratch",
        "auroc_defect_broken_large", "pixel_auroc", "aupro_30", "ambiguous_mean_score", "ambiguous_flag_rate"}
    assert (result["count_good"], result["count_anomaly"], result["count_ambiguous"]) == (20, 12, 5)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(is_anomaly, scores[known]))
    assert result["threshold"] == pytest.approx(1.0)
    assert result["fpr_at_threshold"] == np.mean(scores[:20] >= result["threshold"])
    assert result["miss_rate_at_threshold"] == np.mean(scores[20:32] < result["threshold"])
    scratch = np.r_[0:26]
    assert result["auroc_defect_scratch"] == pytest.approx(roc_auc_score(labels[scratch] == "anomaly", scores[scratch]))
    assert result["auroc_defect_scratch"] > result["auroc_defect_broken_large"]
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks[known].ravel(), maps[known].ravel()))
    assert result["aupro_30"] == pytest.approx(aupro(maps[known], masks[known]))
    assert (result["ambiguous_mean_score"], result["ambiguous_flag_rate"]) == (2.2, 0.8)


def test_evaluate_detector_without_ambiguous_or_pixels_leaves_those_metrics_out() -> None:
    result = evaluate_detector(HAND_SCORES, np.where(HAND_CLASSES, "anomaly", "good"),
                               good_scores_for_threshold=[0.1, 0.2, 0.3])
    assert not {"pixel_auroc", "aupro_30", "ambiguous_mean_score", "ambiguous_flag_rate"} & set(result)
    assert result["count_ambiguous"] == 0


@pytest.mark.parametrize(("call", "message"), [
    (lambda: image_auroc([0.1, 0.2, 0.3], [0, 0, 0]), "both good and anomalous"),
    (lambda: image_auroc([0.1, 0.2, 0.3], [0, 1]), "3 entries but is_anomaly has 2"),
    (lambda: f1_max([0.1, np.nan], [0, 1]), "NaN"),
    (lambda: roc_curve_points([0.1, 0.2], [0, 2]), "bool or 0/1"),
    (lambda: threshold_from_good_scores([1.0, 2.0], percentile=100), "percentile"),
    (lambda: pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 4), bool)), "no defect pixels"),
    (lambda: pixel_auroc(np.zeros((2, 4, 4)), np.ones((2, 4, 4), bool)), "normal pixels"),
    (lambda: pixel_auroc(np.zeros((2, 4, 4)), np.full((2, 4, 4), 255, np.uint8)), "mask > 0"),
    (lambda: pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5), bool)), "one shape"),
    (lambda: aupro(np.zeros((1, 2, 2)), np.eye(2, dtype=bool)[None], fpr_limit=0), "fpr_limit"),
    (lambda: fit_fusion_normalisers({"a": [1.0, 1.0, 1.0, 5.0]}), "zero spread"),
    (lambda: fuse_scores({"a": [1.0]}, {"b": {"center": 0.0, "scale": 1.0}}), "differ from detectors"),
    (lambda: fuse_scores({"a": [1.0]}, {"a": {"center": 0.0, "scale": 1.0}}, {"b": 1.0}), "have no scores"),
    (lambda: fuse_scores({"a": [1.0]}, {"a": {"center": 0.0, "scale": 1.0}}, {"a": 0.0}), "positive sum"),
    (lambda: fuse_scores({"a": [1.0], "b": [1.0]}, {n: {"center": 0.0, "scale": 1.0} for n in "ab"},
                         {"a": 1.0, "b": -1.0}), "positive sum"),
    (lambda: evaluate_detector([1.0, 2.0], ["good", "defect"], good_scores_for_threshold=[1.0]), "labels must be"),
    (lambda: evaluate_detector([1.0, 2.0], ["good", "anomaly"], maps=np.zeros((2, 2, 2)),
                               good_scores_for_threshold=[1.0]), "go together"),
])
def test_bad_input_raises_a_specific_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
