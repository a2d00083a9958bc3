"""The review page of a rebuild: one self-contained HTML file (every picture inlined) that puts challenger and
champion side by side on the same test set, shows the images either gets wrong and where they disagree,
and lists the training images the screen quarantined. It opens from the file alone, and in MLflow's
artifact view."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from patchline.models.scoring.metrics import error_rates_at_threshold, image_auroc, roc_curve_points
from patchline.storage.manifest import ManifestRow
from patchline.storage.pixels import read_mask, read_pixels

# Image cards per section: the most wrong first; a page of hundreds of cards would not be read.
CARDS_PER_SECTION = 24


@dataclass(frozen=True)
class ModelScores:
    """One version's deciding detector on the test rows: a score per row and its own threshold."""

    name: str              # e.g. "challenger v8 (patchcore)"
    scores: np.ndarray
    threshold: float

    @property
    def flags(self) -> np.ndarray:
        return self.scores >= self.threshold


@dataclass(frozen=True)
class QuarantinedPicture:
    path: str
    score: float
    threshold: float
    heatmap: Path          # the screen's overlay PNG


def write_review_page(path: Path, title: str, verdict: str, rows: Sequence[ManifestRow], challenger: ModelScores,
                      maps: np.ndarray, champion: ModelScores | None = None,
                      quarantined: Sequence[QuarantinedPicture] = ()) -> Path:
    """`path`: the page. `rows` are the test rows both versions scored (ambiguous ones are left out of
    every figure), `maps` the challenger's anomaly maps of those rows."""
    known = np.array([row.label != "ambiguous" for row in rows])
    anomalous = np.array([row.label == "anomaly" for row in rows])
    models = [challenger] + ([champion] if champion is not None else [])
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p class='verdict'>{html.escape(verdict)}</p>",
             _metrics_table(models, known, anomalous),
             _figure(_roc(models, known, anomalous)), _figure(_histograms(models, known, anomalous))]
    wrong = {model.name: np.flatnonzero(known & (model.flags != anomalous)) for model in models}
    for model in models:
        parts.append(_section(f"{model.name} gets wrong ({len(wrong[model.name])})", wrong[model.name], rows,
                              models, maps, model))
    if champion is not None:
        disagree = np.flatnonzero(known & (challenger.flags != champion.flags))
        parts.append(_section(f"challenger and champion disagree ({len(disagree)})", disagree, rows, models, maps,
                              challenger))
    if quarantined:
        cards = "".join(f"<div class='card'><img src='{_data_uri(item.heatmap.read_bytes())}'><p>"
                        f"<b>{html.escape(Path(item.path).name)}</b><br>{html.escape(item.path)}<br>score "
                        f"{item.score:.4f} ≥ threshold {item.threshold:.4f}</p></div>" for item in quarantined)
        parts.append(f"<h2>Training images the screen quarantined ({len(quarantined)})</h2>"
                     f"<div class='cards'>{cards}</div>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>")
    return path


_STYLE = ("body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}th:first-child,td:first-child"
          "{text-align:left}.verdict{font-size:1.1em}.cards{display:flex;flex-wrap:wrap;gap:.8em}"
          ".card{width:220px;font-size:.8em;overflow-wrap:anywhere}.card img{width:220px}.bad{color:#b00}")


def _metrics_table(models: list[ModelScores], known: np.ndarray, anomalous: np.ndarray) -> str:
    head = "".join(f"<th>{html.escape(model.name)}</th>" for model in models)
    rates = {m.name: error_rates_at_threshold(m.scores[known], anomalous[known], m.threshold) for m in models}
    lines = []
    for label, measure in (
            ("image AUROC", lambda m: f"{image_auroc(m.scores[known], anomalous[known]):.4f}"),
            ("miss rate at its threshold", lambda m: f"{rates[m.name][1]:.4f}"),
            ("false-positive rate at its threshold", lambda m: f"{rates[m.name][0]:.4f}"),
            ("threshold", lambda m: f"{m.threshold:.4f}")):
        lines.append(f"<tr><td>{label}</td>" + "".join(f"<td>{measure(model)}</td>" for model in models) + "</tr>")
    return (f"<p>{int(known.sum())} test images: {int((known & ~anomalous).sum())} good, "
            f"{int(anomalous.sum())} defective.</p><table><tr><th></th>{head}</tr>{''.join(lines)}</table>")


def _section(heading: str, indices: np.ndarray, rows: Sequence[ManifestRow], models: list[ModelScores],
             maps: np.ndarray, ordering: ModelScores) -> str:
    # Most wrong first: farthest from the threshold of the model the section is about.
    order = indices[np.argsort(-np.abs(ordering.scores[indices] - ordering.threshold), kind="stable")]
    cards = [_card(rows[i], [(m, float(m.scores[i])) for m in models], maps[i]) for i in order[:CARDS_PER_SECTION]]
    more = f"<p>… and {len(order) - CARDS_PER_SECTION} more.</p>" if len(order) > CARDS_PER_SECTION else ""
    return f"<h2>{html.escape(heading)}</h2><div class='cards'>{''.join(cards) or 'none'}</div>{more}"


def _card(row: ManifestRow, scored: list[tuple[ModelScores, float]], anomaly_map: np.ndarray) -> str:
    truth = "good" if row.label == "good" else f"defect: {row.defect_type}"
    lines = []
    for model, score in scored:
        decided = "anomalous" if score >= model.threshold else "good"
        right = (decided == "good") == (row.label == "good")
        lines.append(f"<span class='{'' if right else 'bad'}'>{html.escape(model.name.split(' (')[0])}: "
                     f"{score:.4f} vs {model.threshold:.4f} → {decided}</span>")
    threshold = scored[0][0].threshold
    return (f"<div class='card'><img src='{_data_uri(_overlay(row, anomaly_map, threshold))}'><p><b>"
            f"{html.escape(Path(row.source).name)}</b> ({html.escape(truth)})<br>{'<br>'.join(lines)}</p></div>")


def _overlay(row: ManifestRow, anomaly_map: np.ndarray, threshold: float) -> bytes:
    """The image with the challenger's map over it and the ground-truth mask outlined, as PNG bytes; the
    colour scale tops out at twice the threshold, as the other heat maps' do, so cards compare at a glance."""
    pixels = read_pixels(row.source)
    figure = Figure(figsize=(2.2, 2.2))
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_axis_off()
    extent = (0, pixels.shape[1], pixels.shape[0], 0)
    axes.imshow(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, cmap="gray", extent=extent)
    low = float(np.min(anomaly_map))
    axes.imshow(anomaly_map, cmap="jet", alpha=0.4, extent=extent, vmin=low, vmax=max(2 * threshold, low + 1e-6))
    if row.mask:
        mask = read_mask(row).astype(float)
        axes.contour(np.arange(mask.shape[1]) + 0.5, np.arange(mask.shape[0]) + 0.5, mask, levels=[0.5],
                     colors="white", linewidths=1.2)
    return _png(figure)


def _roc(models: list[ModelScores], known: np.ndarray, anomalous: np.ndarray) -> Figure:
    figure = Figure(figsize=(4.5, 4.5))
    axes = figure.add_subplot()
    for model in models:
        fpr, tpr, _ = roc_curve_points(model.scores[known], anomalous[known])
        axes.plot(fpr, tpr, label=f"{model.name} ({image_auroc(model.scores[known], anomalous[known]):.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC on the same test set")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def _histograms(models: list[ModelScores], known: np.ndarray, anomalous: np.ndarray) -> Figure:
    figure = Figure(figsize=(4.5 * len(models), 3.2))
    for column, model in enumerate(models):
        axes = figure.add_subplot(1, len(models), column + 1)
        for name, chosen, colour in (("good", known & ~anomalous, "tab:green"), ("defective", anomalous, "tab:red")):
            axes.hist(model.scores[chosen], bins=30, alpha=0.6, color=colour, label=name)
        axes.axvline(model.threshold, color="black", linestyle="--", label="threshold")
        axes.set(title=model.name, xlabel="score")
        axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _figure(figure: Figure) -> str:
    return f"<p><img src='{_data_uri(_png(figure))}'></p>"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
