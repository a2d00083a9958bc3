"""Batch-scoring steps: load one exact champion version, read the images, score them, write the results."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from patchline.models.scoring.unit_scale import scored_detectors
from patchline.storage.image_files import BadImageError, decode_image, folder_entries
from patchline.storage.model_bundle import BundleDamagedError
from patchline.storage.plots import save_heatmap_overlay
from patchline.storage.pyfunc_model import MAPS_PARAM
from patchline.storage.registry import champion_version, registered_model_name
from patchline.storage.tracking import configure_mlflow

CSV_COLUMNS = ["index", "path", "score", "score_unit", "decision", "threshold", "model_version", "runtime", "heatmap",
               "error"]


@dataclass(frozen=True)
class ChampionModel:
    version: str
    model: mlflow.pyfunc.PyFuncModel
    runtime: str  # what scores: torch, onnxruntime or openvino (`PatchlineModel.runtime`)


@dataclass(frozen=True)
class ScoreInput:
    """One path to report on: its place in the CSV, and why it cannot be scored if that is known already."""

    index: int
    path: Path
    problem: str | None = None


@dataclass(frozen=True)
class ReadImages:
    images: list[tuple[ScoreInput, np.ndarray]]
    unreadable: list[tuple[ScoreInput, str]]


def expand_inputs(inputs: list[str], recursive: bool = False) -> list[ScoreInput]:
    """Every path given, and every entry of a given folder (of its subfolders too when `recursive`), in a
    stable order; each will get one CSV row. Whatever is an image is decided by decoding, not by its name."""
    found: list[tuple[Path, str | None]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            _add_folder(item, recursive, found)
        else:
            found.append((item, None))
    return [ScoreInput(index, path, problem) for index, (path, problem) in enumerate(found)]


def _add_folder(folder: Path, recursive: bool, found: list[tuple[Path, str | None]]) -> None:
    try:
        names = folder_entries(folder)
    except BadImageError as error:
        found.append((folder, error.reason))
        return
    for name in names:
        path = folder / name
        if name.startswith("."):
            found.append((path, "hidden entry (name starts with '.'): not scored"))
        elif not path.is_dir():
            found.append((path, None))
        elif path.is_symlink():
            # Following links could loop forever; a linked folder can be given as an argument itself.
            found.append((path, "link to a folder: not followed"))
        elif recursive:
            _add_folder(path, recursive, found)
        else:
            found.append((path, "a folder: not scored without --recursive"))


@task(name="load-champion", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def load_champion_task(line: str) -> ChampionModel:
    """The version behind `champion` now, loaded by its number: a promotion meanwhile cannot mislabel scores."""
    version = champion_version(configure_mlflow(), line)
    if version is None:
        raise ValueError(f"line {line} has no champion model yet; run `patchline rebuild {line}` first")
    try:
        model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(line)}/{version.version}")
    except BundleDamagedError as error:
        raise BundleDamagedError(f"line {line} v{version.version}: {error}") from None
    return ChampionModel(str(version.version), model, model.unwrap_python_model().runtime)


@task(name="read-images", cache_policy=NO_CACHE)
def read_images_task(inputs: list[str], recursive: bool = False) -> ReadImages:
    """Decode every input; what cannot be scored is kept with the reason."""
    images, unreadable = [], []
    for item in expand_inputs(inputs, recursive):
        if item.problem is not None:
            unreadable.append((item, item.problem))
            continue
        try:
            images.append((item, decode_image(item.path)))
        except BadImageError as error:
            unreadable.append((item, error.reason))
    if unreadable:
        get_run_logger().warning("%d of %d inputs cannot be scored; each has its reason in the CSV",
                                 len(unreadable), len(images) + len(unreadable))
    return ReadImages(images, unreadable)


@task(name="score-batch", cache_policy=NO_CACHE)
def score_batch_task(champion: ChampionModel, batch: list[tuple[ScoreInput, np.ndarray]], out_dir: Path) -> list[dict]:
    """Scores and decisions of one batch as CSV rows, and a heat-map overlay PNG per image, named by its
    CSV index so that images of one name in different folders keep one each."""
    result = champion.model.predict([pixels for _, pixels in batch], params={MAPS_PARAM: True})
    get_run_logger().info("%d images scored by %s", len(batch), ", ".join(scored_detectors(result)))
    (out_dir / "heatmaps").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (item, pixels) in enumerate(batch):
        heatmap = Path("heatmaps") / f"{item.index:05d}_{item.path.stem}.png"
        unit = result["score_unit"][i]
        rows.append({"index": item.index, "path": str(item.path), "score": f"{result['score'][i]:.6f}",
                     "score_unit": "" if np.isnan(unit) else f"{unit:.6f}",
                     "decision": "anomalous" if result["decision"][i] else "good",
                     "threshold": f"{result['threshold'][i]:.6f}", "model_version": champion.version,
                     "runtime": champion.runtime,
                     "heatmap": str(heatmap), "error": ""})
        save_heatmap_overlay(pixels, result["anomaly_map"][i], float(result["threshold"][i]), out_dir / heatmap)
    return rows


@task(name="write-scores", cache_policy=NO_CACHE)
def write_scores_task(rows: list[dict], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "scores.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda row: row["index"]))
    get_run_logger().info("%d rows (%d unreadable) → %s", len(rows), sum(1 for r in rows if r.get("error")), csv_path)
    return csv_path
