"""Evaluation: calibrate on held-out good images, score every metric per detector, draw the plots."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from patchline.models.config import LineConfig
from patchline.models.scoring.calibration import FUSED, Calibration, fit_calibration, fuse
from patchline.models.scoring.detection import Detections
from patchline.models.scoring.metrics import best_detector, choose_decision_detector, evaluate_detector, robust_spread
from patchline.models.scoring.self_check import SelfCheck
from patchline.storage.manifest import ManifestRow
from patchline.storage.pixels import read_mask, read_pixels
from patchline.storage.plots import plot_heatmap_gallery, plot_pr_curves, plot_roc_curves, plot_score_histograms


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, dict[str, float]]  # detector → metric name → value
    calibration: Calibration
    best: str
    plots: list[Path]
    decision_reason: str  # why `calibration.decision_detector` decides (models/scoring/metrics.py)
    test: dict[str, Detections]  # every detector's (and `fused`'s) detections of the test rows
    self_check: SelfCheck | None = None

    @property
    def left_out(self) -> dict[str, str]:
        """The detectors the self-check left out of the decisions, with why."""
        return self.self_check.left_out if self.self_check is not None else {}

    @property
    def decision_test(self) -> Detections:
        return self.test[self.calibration.decision_detector]

    @property
    def decision_metrics(self) -> dict[str, float]:
        return self.metrics[self.calibration.decision_detector]

    def flat_metrics(self) -> dict[str, float]:
        """`<detector>_<metric>` for every detector, plus the deciding detector's metrics unprefixed."""
        flat = {f"{name}_{key}": value for name, values in self.metrics.items() for key, value in values.items()}
        if self.self_check is not None:
            flat.update({f"{name}_self_check_auroc": auroc for name, auroc in self.self_check.aurocs.items()})
        flat.update(self.decision_metrics)
        return flat


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(config: LineConfig, test_rows: list[ManifestRow], calibration_set: dict[str, Detections],
                  test_set: dict[str, Detections], out_dir: Path,
                  champion: tuple[str, str] | None = None, self_check: SelfCheck | None = None) -> Evaluation:
    """Metrics of every detector (and the fused one) on the test rows, thresholds from held-out goods; the
    deciding detector is the `champion`'s (version, detector) unless the line config names one. Detectors
    that `self_check` left out weigh 0 in `fused` and are never "auto"'s choice."""
    started = time.perf_counter()
    settings = config.evaluation
    left_out = self_check.left_out if self_check is not None else {}
    calibration = fit_calibration(calibration_set, settings.threshold_percentile, next(iter(calibration_set)),
                                  fusion_weights_without(settings.fusion_weights, list(calibration_set), left_out))
    good_scores = {name: d.scores for name, d in calibration_set.items()}
    test_set = dict(test_set)
    if len(calibration_set) > 1:
        good_scores[FUSED] = fuse(calibration_set, calibration).scores
        test_set[FUSED] = fuse(test_set, calibration)
    labels = [row.label for row in test_rows]
    defect_types = [row.defect_type for row in test_rows]
    masks = _masks(test_rows, config.image_size)
    metrics = {
        name: evaluate_detector(d.scores, labels, defect_types, d.maps if masks is not None else None, masks,
                                good_scores_for_threshold=good_scores[name], percentile=settings.threshold_percentile)
        for name, d in test_set.items()}
    for name, values in metrics.items():
        values["good_spread"] = robust_spread(good_scores[name])
    best = best_detector(metrics)
    decision, why = choose_decision_detector(settings.decision_detector, metrics, champion, left_out)
    if decision not in metrics:
        raise ValueError(f"decision_detector {decision!r} is not among this line's detectors {sorted(metrics)}")
    calibration = dataclasses.replace(calibration, decision_detector=decision)
    plots = _plots(test_rows, labels, test_set, calibration, out_dir)
    get_run_logger().info("%s: image AUROC %s; best %s, deciding %s (%s); evaluated in %.1f s", config.name,
                          {n: round(m["image_auroc"], 4) for n, m in metrics.items()}, best, decision, why,
                          time.perf_counter() - started)
    return Evaluation(metrics, calibration, best, plots, why, test_set, self_check)


def fusion_weights_without(weights: dict[str, float] | None, detectors: list[str],
                           left_out: dict[str, str]) -> dict[str, float] | None:
    """The line's fusion `weights` of its `detectors` with those `left_out` at 0; the weights as they are when
    that would leave none weighing (a line whose config weighs only a left-out detector still fuses)."""
    if not left_out:
        return weights
    kept = {name: 0.0 if name in left_out else (1.0 if weights is None else weights.get(name, 0.0))
            for name in detectors}
    return kept if any(kept.values()) else weights


def _masks(rows: list[ManifestRow], size: int) -> np.ndarray | None:
    """Ground truth at the maps' resolution, or None when the line has no masks at all."""
    if not any(row.mask for row in rows):
        return None
    return np.stack([_resized_mask(row, size) for row in rows])


def _resized_mask(row: ManifestRow, size: int) -> np.ndarray:
    mask = torch.from_numpy(read_mask(row))[None, None].float()
    return (F.interpolate(mask, size=(size, size), mode="nearest")[0, 0] > 0.5).numpy()


def _plots(rows: list[ManifestRow], labels: list[str], test_set: dict[str, Detections],
           calibration: Calibration, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = {name: d.scores for name, d in test_set.items()}
    paths = [plot_roc_curves(scores, labels, out_dir), plot_pr_curves(scores, labels, out_dir)]
    paths += plot_score_histograms(scores, labels, calibration.thresholds, out_dir)
    images = [read_pixels(row.source) for row in rows]
    for name, detections in test_set.items():
        paths.append(plot_heatmap_gallery(images, detections.maps, detections.scores, labels,
                                          calibration.thresholds[name], out_dir, name))
    return paths
