"""Evaluation plots written as PNG files: ROC and PR curves, score histograms, heat-map galleries.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting works without a
display and from worker threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from patchline.models.scoring.metrics import LABELS, image_auroc, pr_curve_points, roc_curve_points

_LABEL_COLOURS = {"good": "tab:green", "anomaly": "tab:red", "ambiguous": "tab:orange"}
GALLERY_GROUPS = ("worst_misses", "worst_false_alarms", "typical_hits")


def _checked_labels(labels: Sequence[str], n_images: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=str)
    if labels.shape != (n_images,):
        raise ValueError(f"labels has shape {labels.shape}, expected ({n_images},) like the scores")
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        raise ValueError(f"labels must be one of {LABELS}, got {unknown}")
    return labels


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=100)
    return path


def _known_scores(scores_by_detector: Mapping[str, np.ndarray], labels: Sequence[str]):
    """Yield (detector, scores, is_anomaly) over good and anomalous images only."""
    if not scores_by_detector:
        raise ValueError("scores_by_detector is empty: nothing to plot")
    for name, scores in scores_by_detector.items():
        scores = np.asarray(scores, dtype=np.float64)
        checked = _checked_labels(labels, len(scores))
        known = checked != "ambiguous"
        yield name, scores[known], checked[known] == "anomaly"


def plot_roc_curves(scores_by_detector: Mapping[str, np.ndarray], labels: Sequence[str], out_dir: Path) -> Path:
    """`out_dir`/roc.png: the image-level ROC curve of every detector on one set of axes."""
    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    for name, scores, is_anomaly in _known_scores(scores_by_detector, labels):
        fpr, tpr, _ = roc_curve_points(scores, is_anomaly)
        axes.plot(fpr, tpr, label=f"{name} (AUROC {image_auroc(scores, is_anomaly):.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right")
    return _save(figure, Path(out_dir) / "roc.png")


def plot_pr_curves(scores_by_detector: Mapping[str, np.ndarray], labels: Sequence[str], out_dir: Path) -> Path:
    """`out_dir`/pr.png: the image-level precision-recall curve of every detector on one set of axes."""
    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    for name, scores, is_anomaly in _known_scores(scores_by_detector, labels):
        precision, recall, _ = pr_curve_points(scores, is_anomaly)
        axes.step(recall, precision, where="post", label=name)
    axes.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower left")
    return _save(figure, Path(out_dir) / "pr.png")


def plot_score_histograms(scores_by_detector: Mapping[str, np.ndarray], labels: Sequence[str],
                          thresholds: Mapping[str, float], out_dir: Path) -> list[Path]:
    """`out_dir`/scores_<detector>.png per detector: score histograms per label with the threshold line."""
    missing = sorted(set(scores_by_detector) - set(thresholds))
    if missing:
        raise ValueError(f"no threshold given for detectors {missing}")
    paths = []
    for name, scores in scores_by_detector.items():
        scores = np.asarray(scores, dtype=np.float64)
        checked = _checked_labels(labels, len(scores))
        figure = Figure(figsize=(6, 4))
        axes = figure.add_subplot()
        bins = np.histogram_bin_edges(scores, bins=40)
        for label in LABELS:
            of_label = scores[checked == label]
            if len(of_label):
                axes.hist(of_label, bins=bins, alpha=0.5, color=_LABEL_COLOURS[label],
                          label=f"{label} ({len(of_label)})")
        axes.axvline(thresholds[name], color="black", linestyle="--", label=f"threshold {thresholds[name]:.4g}")
        axes.set(xlabel="anomaly score", ylabel="images", title=f"{name}: scores")
        axes.legend()
        paths.append(_save(figure, Path(out_dir) / f"scores_{name}.png"))
    return paths


def select_gallery(scores: np.ndarray, labels: Sequence[str], threshold: float,
                   per_group: int = 4) -> dict[str, np.ndarray]:
    """Image indices per gallery group, flagged = score >= threshold.

    worst_misses: missed anomalies, lowest score first; worst_false_alarms: flagged goods, highest
    score first; typical_hits: flagged anomalies closest to the median score of all flagged anomalies.
    Ties keep input order.
    """
    if per_group < 1:
        raise ValueError(f"per_group must be at least 1, got {per_group}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    labels = _checked_labels(labels, len(scores))
    flagged = scores >= threshold
    misses = np.flatnonzero((labels == "anomaly") & ~flagged)
    false_alarms = np.flatnonzero((labels == "good") & flagged)
    hits = np.flatnonzero((labels == "anomaly") & flagged)
    typical = (hits[np.argsort(np.abs(scores[hits] - np.median(scores[hits])), kind="stable")]
               if len(hits) else hits)
    return {
        "worst_misses": misses[np.argsort(scores[misses], kind="stable")][:per_group],
        "worst_false_alarms": false_alarms[np.argsort(-scores[false_alarms], kind="stable")][:per_group],
        "typical_hits": typical[:per_group],
    }


def plot_heatmap_gallery(images: Sequence[np.ndarray], maps: np.ndarray, scores: np.ndarray,
                         labels: Sequence[str], threshold: float, out_dir: Path, detector: str,
                         per_group: int = 4) -> Path:
    """`out_dir`/gallery_<detector>.png: uint8 images with their anomaly maps overlaid, one row per
    `select_gallery` group; maps may have another size than the images (they are stretched over them)."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(images) != len(scores) or len(maps) != len(scores):
        raise ValueError(f"images ({len(images)}), maps ({len(maps)}) and scores ({len(scores)}) differ in length")
    chosen = select_gallery(scores, labels, threshold, per_group)
    shown = np.concatenate(list(chosen.values())).astype(int)
    # One colour scale for the whole gallery, so heat reads the same in every cell.
    low, high = (float(np.min(maps[shown])), float(np.max(maps[shown]))) if len(shown) else (0.0, 1.0)
    figure = Figure(figsize=(2.4 * per_group, 2.6 * len(GALLERY_GROUPS)))
    grid = figure.subplots(len(GALLERY_GROUPS), per_group, squeeze=False)
    for row, group in enumerate(GALLERY_GROUPS):
        for column in range(per_group):
            axes = grid[row, column]
            axes.set_xticks([])
            axes.set_yticks([])
            if column == 0:
                axes.set_ylabel(group.replace("_", " "))
            if column >= len(chosen[group]):
                if column == 0:
                    axes.text(0.5, 0.5, "none", ha="center", va="center", transform=axes.transAxes)
                else:
                    axes.set_axis_off()
                continue
            index = int(chosen[group][column])
            _draw_overlay(axes, images[index], maps[index], low, high, f"image {index}")
            axes.set_title(f"#{index} score {scores[index]:.3g}", fontsize=8)
    figure.suptitle(f"{detector}: threshold {threshold:.4g}")
    figure.tight_layout()
    return _save(figure, Path(out_dir) / f"gallery_{detector}.png")


def _draw_overlay(axes, image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float, name: str) -> None:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    height, width = image.shape[:2]
    axes.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    axes.imshow(np.asarray(anomaly_map), cmap="jet", alpha=0.4, vmin=low, vmax=high,
                extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="bilinear")


def save_heatmap_overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, path: Path) -> Path:
    """One image with its anomaly map overlaid; the colour scale tops out at twice the threshold so
    maps of different images compare at a glance (red = well past the decision threshold)."""
    figure = Figure(figsize=(4, 4.3))
    axes = figure.subplots()
    axes.set_axis_off()
    low = float(np.min(anomaly_map))
    _draw_overlay(axes, image, anomaly_map, low, max(2 * threshold, low + 1e-6), str(path))
    axes.set_title(f"max {float(np.max(anomaly_map)):.3g} / threshold {threshold:.3g}", fontsize=9)
    figure.tight_layout()
    return _save(figure, Path(path))
