"""`patchline export` and the nightly's `export_onnx`: a registered model version (or a rebuild's bundle)
as an ONNX graph plus the JSON the runtime scorer (`patchline.runtime`) reads, checked against its own
PyTorch scoring before it is written."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from patchline.models.export_graph import export_onnx
from patchline.models.line_detector import LineDetector
from patchline.models.scoring.calibration import FUSED
from patchline.runtime import FORMAT, METADATA, MODEL, ExportedLine
from patchline.storage.model_bundle import CONFIG, load_bundle
from patchline.storage.registry import champion_version, registered_model_name

# Parity asked of an export (issue 24): image scores within this relative difference (the fused score,
# a weighted z-score that crosses 0, within this absolute one: 1e-4 of a good image's spread), maps
# within this difference relative to the map's largest value (at least 1), decisions identical.
SCORE_RTOL = 1e-4
MAP_TOL = 1e-3


class ExportError(ValueError):
    """The version cannot be exported, or its export does not score as the version does."""


@dataclass(frozen=True)
class Export:
    folder: Path
    version: str | None  # None: exported by the rebuild that logs it, before its version was registered
    max_rel_score_diff: float
    max_map_diff: float


def export_version(client: MlflowClient, line: str, out: Path, version: str | None = None,
                   check_images: list[np.ndarray] | None = None) -> Export:
    """Export `version` (default: the champion) of `line` into `out` (`export_bundle`)."""
    name = registered_model_name(line)
    if version is None:
        champion = champion_version(client, line)
        if champion is None:
            raise ExportError(f"line {line!r} has no champion to export; name a version with --version")
        version = str(champion.version)
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise ExportError(f"line {line!r} has no model version {version!r}") from None
    with tempfile.TemporaryDirectory(prefix="patchline-export-") as scratch:
        downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=scratch))
        bundles = [path.parent for path in downloaded.rglob(CONFIG)]
        if len(bundles) != 1:
            raise ExportError(f"{name} version {version}: expected one model bundle, found {len(bundles)}")
        return export_bundle(bundles[0], out, version, check_images)


def export_bundle(bundle: Path, out: Path, version: str | None = None,
                  check_images: list[np.ndarray] | None = None) -> Export:
    """A model bundle (storage/model_bundle.py) into `out` (model.onnx, line.json), after scoring
    `check_images` (default: a few synthetic ones) both ways; `ExportError` if they differ."""
    missing = [module for module in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(module) is None]
    if missing:
        raise ExportError(f"exporting needs {', '.join(missing)}: install patchline's export extra "
                          "(pip install -c constraints.txt 'patchline[export]')")
    detector = load_bundle(bundle, torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="patchline-export-") as scratch:
        staged = Path(scratch)
        export_onnx(detector, staged / MODEL)
        metadata = {"format": FORMAT, "line": detector.config.name, "version": version,
                    "image_size": detector.config.image_size, "runtime": "onnxruntime",
                    **json.loads(detector.calibration.to_json())}
        (staged / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        score_diff, map_diff = check_parity(detector, ExportedLine(staged), check_images or _check_images())
        metadata["parity"] = {"max_rel_score_diff": score_diff, "max_map_diff": map_diff}
        (staged / METADATA).write_text(json.dumps(metadata, indent=2, sort_keys=True))
        out.mkdir(parents=True, exist_ok=True)
        for path in staged.iterdir():
            shutil.move(str(path), out / path.name)
    return Export(out, version, score_diff, map_diff)


def check_parity(detector: LineDetector, exported: ExportedLine, images: list[np.ndarray]) -> tuple[float, float]:
    """(largest score difference (`score_difference`), largest relative map difference) over every detector;
    `ExportError` beyond the tolerances or when a decision differs."""
    expected = detector.score(images)
    found = exported.detections(images)
    if set(found) != set(expected):
        raise ExportError(f"the export scores {sorted(found)}, the version {sorted(expected)}")
    score_diff = map_diff = 0.0
    for name, detections in expected.items():
        scores, maps = found[name]
        score_diff = max(score_diff, score_difference(name, scores, detections.scores))
        scale = max(1.0, float(np.abs(detections.maps).max()))
        map_diff = max(map_diff, float(np.max(np.abs(maps - detections.maps))) / scale)
    decider = detector.calibration.decision_detector
    _, decisions, _ = detector.decide(expected)
    exported_decisions = found[decider][0] >= detector.calibration.thresholds[decider]
    if score_diff > SCORE_RTOL or map_diff > MAP_TOL or not np.array_equal(decisions, exported_decisions):
        raise ExportError(f"the export does not score as the version does: scores differ by up to {score_diff:.2e} "
                          f"(relative; allowed {SCORE_RTOL:g}), maps by {map_diff:.2e} (allowed {MAP_TOL:g}), "
                          f"decisions {'equal' if np.array_equal(decisions, exported_decisions) else 'differ'}")
    return score_diff, map_diff


def score_difference(detector: str, found: np.ndarray, expected: np.ndarray) -> float:
    """The largest difference of `found` from `expected` image scores: relative, absolute for `fused`."""
    scale = 1.0 if detector == FUSED else np.maximum(np.abs(expected), 1e-12)
    return float(np.max(np.abs(found - expected) / scale))


def _check_images() -> list[np.ndarray]:
    """A grey and a colour image of other sizes than any line's, with texture and a bright blob."""
    rng = np.random.default_rng(0)
    grey = rng.normal(128, 30, (300, 280)).clip(0, 255).astype(np.uint8)
    grey[100:140, 60:90] = 250
    colour = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    return [grey, colour]
