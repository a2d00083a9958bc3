"""Batch scoring with a line's champion model: a CSV of decisions and heat-map PNGs."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger

from storage.image_files import IMAGE_SUFFIXES, BadImageError, decode_image
from storage.plots import save_heatmap_overlay
from storage.registry import CHAMPION, champion_version, registered_model_name
from storage.tracking import configure_mlflow

CSV_COLUMNS = ["path", "score", "decision", "threshold", "model_version", "error"]


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders as the images directly inside them, in a stable order."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        else:
            paths.append(item)
    return paths


@flow(name="score-images", flow_run_name="score-{line}")
def score_images(line: str, inputs: list[str], out: str, batch_size: int = 16) -> str:
    """Score image files (or folders of them) with `models:/patchline-<line>@champion`; returns the CSV path."""
    log = get_run_logger()
    client = configure_mlflow()
    version = champion_version(client, line)
    if version is None:
        raise ValueError(f"line {line} has no champion model yet; run `patchline rebuild {line}` first")
    model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(line)}@{CHAMPION}")
    out_dir = Path(out)
    (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
    rows, good = [], []
    for path in expand_inputs(inputs):
        try:
            good.append((path, decode_image(path)))
        except BadImageError as error:
            rows.append({"path": str(path), "error": error.reason, "model_version": version.version})
    for start in range(0, len(good), batch_size):
        chunk = good[start:start + batch_size]
        result = model.predict([pixels for _, pixels in chunk])
        for i, (path, pixels) in enumerate(chunk):
            rows.append({"path": str(path), "score": f"{result['score'][i]:.6f}",
                         "decision": "anomalous" if result["decision"][i] else "good",
                         "threshold": f"{result['threshold'][i]:.6f}", "model_version": version.version, "error": ""})
            save_heatmap_overlay(pixels, result["anomaly_map"][i], float(result["threshold"][i]),
                                 out_dir / "heatmaps" / f"{path.stem}.png")
    csv_path = out_dir / "scores.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    bad = sum(1 for row in rows if row.get("error"))
    log.info("scored %d images with %s v%s (%d unreadable) → %s", len(good), line, version.version, bad, csv_path)
    return str(csv_path)
