"""patchline.storage.plots: PNG files are written and readable, and galleries pick the right images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchline.storage.sources.elpv import elpv_arrays
from patchline.storage.plots import (
    plot_heatmap_gallery, plot_pr_curves, plot_roc_curves, plot_score_histograms, select_gallery,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_real_png(path: Path, size: tuple[int, int]) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 10_000
    with Image.open(path) as image:
        assert image.size == size
        # Something was drawn: the image is far from one flat colour.
        assert np.asarray(image.convert("L")).std() > 10


@pytest.fixture(scope="module")
def elpv_sample() -> tuple[np.ndarray, np.ndarray]:
    """12 real ELPV cells: 6 defect-free (level 0), 6 defective (level 3), and their labels."""
    images, levels, _ = elpv_arrays()
    chosen = np.r_[np.flatnonzero(levels == 0)[:6], np.flatnonzero(levels == 3)[:6]]
    return images[chosen], np.where(levels[chosen] == 3, "anomaly", "good")


def test_select_gallery_on_a_hand_case() -> None:
    labels = ["good", "anomaly", "anomaly", "good", "anomaly", "ambiguous", "anomaly", "good", "anomaly", "anomaly"]
    scores = np.array([0.2, 0.1, 0.3, 0.9, 0.8, 0.05, 0.1, 0.7, 0.6, 0.95])
    chosen = select_gallery(scores, labels, threshold=0.5, per_group=2)
    # Misses are anomalies below 0.5: #1 (0.1), #6 (0.1, tie keeps input order), #2 (0.3); the worst
    # miss is the lowest-scoring anomaly. The ambiguous #5 (0.05) never appears.
    np.testing.assert_array_equal(chosen["worst_misses"], [1, 6])
    # False alarms are goods at or above 0.5, highest first: #3 (0.9), #7 (0.7).
    np.testing.assert_array_equal(chosen["worst_false_alarms"], [3, 7])
    # Hits #4 (0.8), #8 (0.6), #9 (0.95) have median 0.8: #4 itself, then #9 (0.15 away) before #8 (0.2 away).
    np.testing.assert_array_equal(chosen["typical_hits"], [4, 9])
    assert scores[chosen["worst_misses"][0]] == scores[np.array(labels) == "anomaly"].min()


def test_select_gallery_returns_empty_groups_when_nothing_qualifies() -> None:
    chosen = select_gallery(np.array([0.1, 0.9]), ["good", "anomaly"], threshold=0.5)
    assert [len(chosen[group]) for group in ("worst_misses", "worst_false_alarms")] == [0, 0]
    np.testing.assert_array_equal(chosen["typical_hits"], [1])


def test_curves_and_histograms_are_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.array(["good"] * 40 + ["anomaly"] * 30 + ["ambiguous"] * 10)
    scores = {"patchcore": rng.normal(size=80) + (labels == "anomaly") * 2,
              "oesdn": rng.normal(size=80) + (labels == "anomaly")}
    roc = plot_roc_curves(scores, labels, tmp_path / "plots")
    pr = plot_pr_curves(scores, labels, tmp_path / "plots")
    histograms = plot_score_histograms(scores, labels, {"patchcore": 1.5, "oesdn": 1.0}, tmp_path / "plots")
    assert (roc.name, pr.name) == ("roc.png", "pr.png")
    assert [path.name for path in histograms] == ["scores_patchcore.png", "scores_oesdn.png"]
    for path in (roc, pr):
        _assert_real_png(path, (500, 500))
    for path in histograms:
        _assert_real_png(path, (600, 400))


def test_heatmap_gallery_of_real_cells(tmp_path: Path, elpv_sample: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = elpv_sample
    # Maps at a quarter of the image size (darker = hotter), so the overlay must be stretched.
    maps = 1.0 - images[:, ::4, ::4].astype(np.float32) / 255.0
    scores = maps.mean(axis=(1, 2))
    threshold = float(np.median(scores))
    path = plot_heatmap_gallery(images, maps, scores, labels, threshold, tmp_path, "patchcore", per_group=3)
    assert path == tmp_path / "gallery_patchcore.png"
    _assert_real_png(path, (720, 780))


def test_bad_plot_input_raises() -> None:
    with pytest.raises(ValueError, match="no threshold given for detectors \\['oesdn'\\]"):
        plot_score_histograms({"oesdn": np.zeros(2)}, ["good", "anomaly"], {}, Path("unused"))
    with pytest.raises(ValueError, match="labels must be one of"):
        select_gallery(np.zeros(2), ["good", "bad"], 0.5)
    with pytest.raises(ValueError, match="differ in length"):
        plot_heatmap_gallery(np.zeros((2, 4, 4), np.uint8), np.zeros((3, 4, 4)), np.zeros(2), ["good"] * 2, 0.5,
                             Path("unused"), "x")
