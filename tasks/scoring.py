"""Batch-scoring steps: load one exact champion version, read the images, score them, write the results."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from patchline.storage.image_files import IMAGE_SUFFIXES, BadImageError, decode_image
from patchline.storage.plots import save_heatmap_overlay
from patchline.storage.registry import champion_version, registered_model_name
from patchline.storage.tracking import configure_mlflow

CSV_COLUMNS = ["path", "score", "decision", "threshold", "model_version", "error"]


@dataclass(frozen=True)
class ChampionModel:
    version: str
    model: mlflow.pyfunc.PyFuncModel


@dataclass(frozen=True)
class ReadImages:
    images: list[tuple[Path, np.ndarray]]
    unreadable: list[tuple[Path, str]]


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, folders as the images directly inside them, in a stable order."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        else:
            paths.append(item)
    return paths


@task(name="load-champion", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def load_champion_task(line: str) -> ChampionModel:
    """The version behind `champion` now, loaded by its number: a promotion meanwhile cannot mislabel scores."""
    version = champion_version(configure_mlflow(), line)
    if version is None:
        raise ValueError(f"line {line} has no champion model yet; run `patchline rebuild {line}` first")
    model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(line)}/{version.version}")
    return ChampionModel(str(version.version), model)


@task(name="read-images", cache_policy=NO_CACHE)
def read_images_task(inputs: list[str]) -> ReadImages:
    """Decode every input image; the unreadable ones are kept with the reason."""
    images, unreadable = [], []
    for path in expand_inputs(inputs):
        try:
            images.append((path, decode_image(path)))
        except BadImageError as error:
            unreadable.append((path, error.reason))
    return ReadImages(images, unreadable)


@task(name="score-batch", cache_policy=NO_CACHE)
def score_batch_task(champion: ChampionModel, batch: list[tuple[Path, np.ndarray]], out_dir: Path) -> list[dict]:
    """Scores and decisions of one batch as CSV rows, and a heat-map overlay PNG per image."""
    result = champion.model.predict([pixels for _, pixels in batch])
    (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (path, pixels) in enumerate(batch):
        rows.append({"path": str(path), "score": f"{result['score'][i]:.6f}",
                     "decision": "anomalous" if result["decision"][i] else "good",
                     "threshold": f"{result['threshold'][i]:.6f}", "model_version": champion.version, "error": ""})
        save_heatmap_overlay(pixels, result["anomaly_map"][i], float(result["threshold"][i]),
                             out_dir / "heatmaps" / f"{path.stem}.png")
    return rows


@task(name="write-scores", cache_policy=NO_CACHE)
def write_scores_task(rows: list[dict], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "scores.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    get_run_logger().info("%d rows (%d unreadable) → %s", len(rows), sum(1 for r in rows if r.get("error")), csv_path)
    return csv_path
