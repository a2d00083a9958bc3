"""Evaluation metrics for anomaly detectors: image and pixel level, thresholds from good images, fusion.

Conventions: higher score = more anomalous; an image is flagged when `score >= threshold`.
Image labels are "good", "anomaly" or "ambiguous"; ambiguous images never enter AUROC or F1 and
are reported on their own.

Metric names returned by `evaluate_detector` (flat, so they log to MLflow as they are):

- `count_good`, `count_anomaly`, `count_ambiguous`: images of each label in the test set.
- `image_auroc`: area under the image-level ROC curve, good vs anomaly (ties count half).
- `image_f1_max`, `f1_threshold`: best F1 over all thresholds, and the highest threshold reaching it.
- `threshold`: the `percentile`-th percentile of held-out good scores (no defects needed).
- `fpr_at_threshold`, `miss_rate_at_threshold`: share of test goods flagged / anomalies not flagged.
- `auroc_defect_<type>`: image AUROC of one defect type against all goods (type lower-cased,
  characters outside [a-z0-9_] replaced by "_").
- `pixel_auroc`, `aupro_30` (only with maps and masks): pixel AUROC, and the area under the
  per-region-overlap curve up to FPR 0.3 divided by 0.3 (the suffix is 100 × `fpr_limit`).
- `ambiguous_mean_score`, `ambiguous_flag_rate` (only when ambiguous images exist): their mean
  score and the share flagged at `threshold`.

`good_spread` (`robust_spread` of the held-out good scores) is added by the evaluation: the gate
measures a threshold's rise in it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from scipy.stats import rankdata

LABELS = ("good", "anomaly", "ambiguous")
# Regions are 8-connected, as in the MVTec AD evaluation code (Bergmann et al., IJCV 2021).
_REGION_STRUCTURE = np.ones((3, 3), dtype=int)
# MAD × 1.4826 equals the standard deviation for normally distributed scores.
_MAD_TO_STD = 1.4826
# Pixels per chunk when streaming maps: bounds the working memory to a few hundred MB.
_CHUNK_PIXELS = 1 << 23


def _binary_scores(scores: ArrayLike, is_anomaly: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated float scores (N,) and bool classes (N,) with both classes present."""
    scores = np.asarray(scores, dtype=np.float64)
    classes = np.asarray(is_anomaly)
    if scores.ndim != 1 or classes.ndim != 1:
        raise ValueError(f"scores and is_anomaly must be 1-D, got shapes {scores.shape} and {classes.shape}")
    if len(scores) != len(classes):
        raise ValueError(f"scores has {len(scores)} entries but is_anomaly has {len(classes)}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores contain {np.count_nonzero(~np.isfinite(scores))} NaN or infinite values")
    if classes.dtype != bool:
        if not np.isin(classes, (0, 1)).all():
            raise ValueError("is_anomaly must be bool or 0/1")
        classes = classes.astype(bool)
    if classes.all() or not classes.any():
        raise ValueError(f"need both good and anomalous images, got {classes.sum()} anomalous of {len(classes)}")
    return scores, classes


def _counts_at_thresholds(scores: np.ndarray, is_anomaly: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positives when flagging `score >= t`, for each distinct score t in decreasing order."""
    order = np.argsort(scores, kind="stable")[::-1]
    ordered = scores[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(ordered)), len(ordered) - 1]
    true_positives = np.cumsum(is_anomaly[order])[last_of_value]
    false_positives = last_of_value + 1 - true_positives
    return false_positives, true_positives, ordered[last_of_value]


def roc_curve_points(scores: ArrayLike, is_anomaly: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, thresholds decreasing from +inf (as sklearn's roc_curve
    with drop_intermediate=False)."""
    scores, classes = _binary_scores(scores, is_anomaly)
    false_positives, true_positives, thresholds = _counts_at_thresholds(scores, classes)
    return (np.r_[0.0, false_positives / false_positives[-1]], np.r_[0.0, true_positives / true_positives[-1]],
            np.r_[np.inf, thresholds])


def pr_curve_points(scores: ArrayLike, is_anomaly: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) with thresholds increasing and a final (1, 0) point without a threshold
    (as sklearn's precision_recall_curve)."""
    scores, classes = _binary_scores(scores, is_anomaly)
    false_positives, true_positives, thresholds = _counts_at_thresholds(scores, classes)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / true_positives[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def image_auroc(scores: ArrayLike, is_anomaly: ArrayLike) -> float:
    """Image AUROC by the Mann-Whitney rank sum, tied scores counting half (equals sklearn's roc_auc_score)."""
    scores, classes = _binary_scores(scores, is_anomaly)
    n_anomalous = int(classes.sum())
    n_good = len(classes) - n_anomalous
    rank_sum = rankdata(scores)[classes].sum()
    return float((rank_sum - n_anomalous * (n_anomalous + 1) / 2) / (n_anomalous * n_good))


def f1_max(scores: ArrayLike, is_anomaly: ArrayLike) -> tuple[float, float]:
    """(best F1 over all thresholds, the highest threshold reaching it); flagged = score >= threshold."""
    scores, classes = _binary_scores(scores, is_anomaly)
    false_positives, true_positives, thresholds = _counts_at_thresholds(scores, classes)
    f1 = 2 * true_positives / (true_positives + false_positives + classes.sum())
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def threshold_from_good_scores(good_scores: ArrayLike, percentile: float = 99.0) -> float:
    """The `percentile`-th percentile (linear interpolation) of held-out good scores."""
    good_scores = np.asarray(good_scores, dtype=np.float64)
    if good_scores.ndim != 1 or len(good_scores) == 0:
        raise ValueError(f"good_scores must be a non-empty 1-D array, got shape {good_scores.shape}")
    if not np.isfinite(good_scores).all():
        raise ValueError("good_scores contain NaN or infinite values")
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    return float(np.percentile(good_scores, percentile))


def error_rates_at_threshold(scores: ArrayLike, is_anomaly: ArrayLike, threshold: float) -> tuple[float, float]:
    """(false-positive rate over goods, miss rate over anomalies) when flagging `score >= threshold`."""
    scores, classes = _binary_scores(scores, is_anomaly)
    flagged = scores >= threshold
    return float(flagged[~classes].mean()), float((~flagged[classes]).mean())


def fit_fusion_normalisers(good_scores_by_detector: Mapping[str, ArrayLike]) -> dict[str, dict[str, float]]:
    """Per detector {"center": median, "scale": 1.4826 × MAD} of its held-out good scores.

    Median/MAD rather than mean/std: held-out "good" sets on real lines hold a few unnoticed defects
    and the scores are right-skewed, and those few tail images would drag a mean/std but not a median/MAD.
    Plain floats, so the deployed model can store them as JSON.
    """
    if not good_scores_by_detector:
        raise ValueError("good_scores_by_detector is empty: fusion needs at least one detector")
    normalisers = {}
    for name, scores in good_scores_by_detector.items():
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 1 or len(scores) < 2 or not np.isfinite(scores).all():
            raise ValueError(f"detector {name!r}: need at least 2 finite held-out good scores (1-D), "
                             f"got shape {scores.shape}")
        center, scale = float(np.median(scores)), robust_spread(scores)
        if scale == 0:
            raise ValueError(f"detector {name!r}: held-out good scores have zero spread (MAD = 0)")
        normalisers[name] = {"center": center, "scale": scale}
    return normalisers


def robust_spread(scores: ArrayLike) -> float:
    """1.4826 x the median absolute deviation: the standard deviation of normal scores, unmoved by a few outliers."""
    scores = np.asarray(scores, dtype=np.float64)
    return _MAD_TO_STD * float(np.median(np.abs(scores - np.median(scores))))


def fuse_scores(scores_by_detector: Mapping[str, ArrayLike], normalisers: Mapping[str, Mapping[str, float]],
                weights: Mapping[str, float] | None = None) -> np.ndarray:
    """Normalise each detector's scores (or equally shaped maps) with its good-image stats, then take
    their weighted mean elementwise; `weights` None = every detector alike, a detector left out weighs 0."""
    if set(scores_by_detector) != set(normalisers) or not normalisers:
        raise ValueError(f"detectors with scores {sorted(scores_by_detector)} differ from detectors with "
                         f"normalisers {sorted(normalisers)}")
    weights = {name: 1.0 for name in scores_by_detector} if weights is None else weights
    if set(weights) - set(scores_by_detector):
        raise ValueError(f"weights name {sorted(set(weights) - set(scores_by_detector))}, which have no scores")
    total = sum(weights.get(name, 0.0) for name in scores_by_detector)
    if total <= 0 or any(weight < 0 for weight in weights.values()):
        raise ValueError(f"weights must be >= 0 with a positive sum over the detectors, got {dict(weights)}")
    fused = None
    for name, scores in scores_by_detector.items():
        weight = weights.get(name, 0.0)
        if weight == 0:
            continue
        normalised = (np.asarray(scores, dtype=np.float64) - normalisers[name]["center"]) / normalisers[name]["scale"]
        if fused is not None and normalised.shape != fused.shape:
            raise ValueError(f"detectors' scores differ in shape: {normalised.shape} and {fused.shape}")
        fused = weight * normalised if fused is None else fused + weight * normalised
    return fused / total


def best_detector(metrics_by_detector: Mapping[str, Mapping[str, float]], metric: str = "image_auroc") -> str:
    """The detector with the highest `metric` (the first listed wins a tie)."""
    if not metrics_by_detector:
        raise ValueError("metrics_by_detector is empty")
    missing = [name for name, metrics in metrics_by_detector.items() if metric not in metrics]
    if missing:
        raise ValueError(f"metric {metric!r} missing for detectors {missing}")
    return max(metrics_by_detector, key=lambda name: metrics_by_detector[name][metric])


def choose_decision_detector(setting: str, metrics_by_detector: Mapping[str, Mapping[str, float]],
                             champion: tuple[str, str] | None,
                             left_out: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The detector whose decisions a version deploys, and why. `setting` is the line's
    `evaluation.decision_detector`; `champion` is (version, its deciding detector) once the line has one;
    `left_out` holds the detectors the self-check left out (models/scoring/self_check.py), which "auto"
    never picks.

    "auto" picks the best image AUROC only for a line's first version: picking again each night on the
    test images that then judge the pick would let a poisoned rebuild switch to whichever detector the
    poison hurt least."""
    if setting != "auto":
        return setting, "set in the line config (evaluation.decision_detector)"
    left_out = left_out or {}
    eligible = {name: metrics for name, metrics in metrics_by_detector.items() if name not in left_out}
    if champion is not None and champion[1] in eligible:
        return champion[1], (f"kept from champion v{champion[0]} ('auto' chooses for a line's first version only; "
                             "set evaluation.decision_detector or promote a version to change it)")
    best = best_detector(eligible)
    lost = ""
    if champion is not None:
        lost = (f"champion v{champion[0]}'s {champion[1]} was left out by the self-check; " if champion[1] in left_out
                else f"champion v{champion[0]}'s {champion[1]} is not built by this rebuild; ")
    return best, (f"{lost}auto: the best image AUROC of this rebuild ({eligible[best]['image_auroc']:.4f}), "
                  "chosen on the test split that also reports it, so that figure is optimistic")


def _pixel_chunks(maps: ArrayLike, masks: ArrayLike, keep: np.ndarray):
    """Yield (maps, bool masks) of the kept images, a slice of images at a time so memory stays bounded."""
    if len(maps.shape) != 3 or tuple(maps.shape) != tuple(masks.shape):
        raise ValueError(f"maps and masks must both be (N, H, W) of one shape, got {maps.shape} and {masks.shape}")
    step = max(1, _CHUNK_PIXELS // (maps.shape[1] * maps.shape[2]))
    for start in range(0, len(keep), step):
        chunk_keep = keep[start:start + step]
        chunk_maps = np.asarray(maps[start:start + step])[chunk_keep]
        chunk_masks = np.asarray(masks[start:start + step])[chunk_keep]
        where = f"images {start}..{start + len(chunk_keep) - 1}"
        if not np.isfinite(chunk_maps).all():
            raise ValueError(f"maps of {where} contain NaN or infinite values")
        if chunk_masks.dtype != bool:
            if not np.isin(chunk_masks, (0, 1)).all():
                raise ValueError(f"masks of {where} must be bool or 0/1 (convert 0/255 masks with mask > 0)")
            chunk_masks = chunk_masks.astype(bool)
        yield chunk_maps, chunk_masks


def _defect_pixel_ranks(maps: ArrayLike, masks: ArrayLike, keep: np.ndarray | None = None) -> dict[str, np.ndarray | int]:
    """For each distinct defect-pixel value: how many defect pixels and how much region weight it holds, and the
    share of normal pixels scoring above it and at least it.

    Exact and streaming: only the defect pixels are held (sorted once); normal pixels pass through in
    chunks, each chunk sorted and counted against them. Memory: a few tens of bytes per defect pixel plus
    one chunk (measured: benchmarks/README.md, "Figures behind settings in the code").
    """
    maps, masks = (array if hasattr(array, "shape") else np.asarray(array) for array in (maps, masks))
    keep = np.ones(maps.shape[0], bool) if keep is None else keep
    values, inverse_region_sizes = [], []
    n_regions = 0
    for chunk_maps, chunk_masks in _pixel_chunks(maps, masks, keep):
        for image_map, mask in zip(chunk_maps, chunk_masks):
            regions, count = ndimage.label(mask, structure=_REGION_STRUCTURE)
            if count:
                region_of_pixel = regions[mask]
                sizes = np.bincount(region_of_pixel)
                values.append(image_map[mask])
                inverse_region_sizes.append(1.0 / sizes[region_of_pixel])
                n_regions += count
    if not n_regions:
        raise ValueError("masks contain no defect pixels: pixel metrics need at least one")
    distinct, position = np.unique(np.concatenate(values), return_inverse=True)
    counts = np.bincount(position, minlength=len(distinct))
    region_weights = np.bincount(position, weights=np.concatenate(inverse_region_sizes), minlength=len(distinct))
    del values, inverse_region_sizes, position

    normals_above = np.zeros(len(distinct), np.int64)
    normals_at_or_above = np.zeros(len(distinct), np.int64)
    n_normal = 0
    for chunk_maps, chunk_masks in _pixel_chunks(maps, masks, keep):
        normal = np.sort(chunk_maps[~chunk_masks].astype(distinct.dtype, copy=False))
        normals_above += len(normal) - np.searchsorted(normal, distinct, side="right")
        normals_at_or_above += len(normal) - np.searchsorted(normal, distinct, side="left")
        n_normal += len(normal)
    if not n_normal:
        raise ValueError("masks mark every pixel as defect: pixel metrics need normal pixels too")
    return {"counts": counts, "region_weights": region_weights, "n_regions": n_regions,
            "fpr_above": normals_above / n_normal, "fpr_at_or_above": normals_at_or_above / n_normal}


def _area_left_of(fpr_above: np.ndarray, fpr_at_or_above: np.ndarray, limit: float) -> np.ndarray:
    """For each defect pixel value: the area its detection adds under the piecewise-linear curve on [0, limit].

    A defect pixel counts once the threshold drops to its value; there the FPR jumps from `fpr_above` to
    `fpr_at_or_above` and the curve, drawn linearly across the jump, gives it a ramp from 0 to 1.
    """
    width = fpr_at_or_above - fpr_above
    ramp = np.divide((limit - fpr_above) ** 2, 2 * width, out=np.zeros_like(width), where=width > 0)
    return np.where(limit >= fpr_at_or_above, limit - fpr_at_or_above + width / 2,
                    np.where(limit > fpr_above, ramp, 0.0))


def _pixel_auroc_from(ranks: dict) -> float:
    area = _area_left_of(ranks["fpr_above"], ranks["fpr_at_or_above"], 1.0)
    return float((ranks["counts"] * area).sum() / ranks["counts"].sum())


def _aupro_from(ranks: dict, fpr_limit: float) -> float:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    area = _area_left_of(ranks["fpr_above"], ranks["fpr_at_or_above"], fpr_limit)
    return float((ranks["region_weights"] * area).sum() / (ranks["n_regions"] * fpr_limit))


def pixel_auroc(maps: ArrayLike, masks: ArrayLike) -> float:
    """Exact pixel AUROC of anomaly maps (N, H, W) against binary masks (N, H, W), ties counting half.

    Accepts any array that slices along the first axis (NumPy, memmap, Zarr); memory grows with the
    number of defect pixels, not with all pixels.
    """
    return _pixel_auroc_from(_defect_pixel_ranks(maps, masks))


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Exact normalised area under the PRO curve up to `fpr_limit` (MVTec AD protocol).

    PRO at a threshold = mean over all 8-connected defect regions (of all images) of the share of the
    region flagged; FPR = share of normal pixels flagged; the curve is integrated by trapezoids up to
    `fpr_limit` (interpolating at the limit) and divided by `fpr_limit`.
    """
    return _aupro_from(_defect_pixel_ranks(maps, masks), fpr_limit)


def metric_name_for_defect(defect_type: str) -> str:
    """The MLflow metric name of one defect type's AUROC."""
    return "auroc_defect_" + re.sub(r"[^a-z0-9_]+", "_", defect_type.lower()).strip("_")


def evaluate_detector(scores: ArrayLike, labels: Sequence[str], defect_types: Sequence[str] | None = None,
                      maps: ArrayLike | None = None, masks: ArrayLike | None = None, *,
                      good_scores_for_threshold: ArrayLike, percentile: float = 99.0,
                      fpr_limit: float = 0.3) -> dict[str, float]:
    """Every metric of one detector on one test set, flat names as in this module's docstring.

    `labels` per image in "good", "anomaly", "ambiguous"; `defect_types` per image (read for anomalies
    only); `maps`/`masks` (N, H, W) add pixel metrics over the good and anomalous images; the threshold
    comes from `good_scores_for_threshold`, held-out good images that are not in this test set.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=str)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"scores and labels must be 1-D of one length, got {scores.shape} and {labels.shape}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores contain {np.count_nonzero(~np.isfinite(scores))} NaN or infinite values")
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        raise ValueError(f"labels must be one of {LABELS}, got {unknown}")
    known = labels != "ambiguous"
    is_anomaly = labels[known] == "anomaly"
    threshold = threshold_from_good_scores(good_scores_for_threshold, percentile)
    best_f1, best_f1_threshold = f1_max(scores[known], is_anomaly)
    fpr, miss_rate = error_rates_at_threshold(scores[known], is_anomaly, threshold)
    metrics = {
        "count_good": float((labels == "good").sum()),
        "count_anomaly": float((labels == "anomaly").sum()),
        "count_ambiguous": float((~known).sum()),
        "image_auroc": image_auroc(scores[known], is_anomaly),
        "image_f1_max": best_f1,
        "f1_threshold": best_f1_threshold,
        "threshold": threshold,
        "fpr_at_threshold": fpr,
        "miss_rate_at_threshold": miss_rate,
    }
    if defect_types is not None:
        defect_types = np.asarray(defect_types, dtype=str)
        if defect_types.shape != labels.shape:
            raise ValueError(f"defect_types has {len(defect_types)} entries but labels has {len(labels)}")
        good = labels == "good"
        for defect_type in sorted(set(defect_types[labels == "anomaly"])):
            name = metric_name_for_defect(defect_type)
            if name in metrics:
                raise ValueError(f"defect types map to the same metric name {name!r}; rename one")
            of_type = (labels == "anomaly") & (defect_types == defect_type)
            metrics[name] = image_auroc(scores[good | of_type], of_type[good | of_type])
    if (maps is None) != (masks is None):
        raise ValueError("maps and masks go together: pass both for pixel metrics, or neither")
    if maps is not None:
        maps = maps if hasattr(maps, "shape") else np.asarray(maps)
        if maps.shape[0] != len(labels):
            raise ValueError(f"maps has {maps.shape[0]} images but labels has {len(labels)}")
        ranks = _defect_pixel_ranks(maps, masks, known)
        metrics["pixel_auroc"] = _pixel_auroc_from(ranks)
        metrics[f"aupro_{fpr_limit * 100:g}"] = _aupro_from(ranks, fpr_limit)
    if (~known).any():
        metrics["ambiguous_mean_score"] = float(scores[~known].mean())
        metrics["ambiguous_flag_rate"] = float((scores[~known] >= threshold).mean())
    return metrics
