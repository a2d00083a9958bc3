"""`patchline export` and the nightly's `export_onnx`: a registered model version (or a rebuild's bundle)
as an ONNX graph (or OpenVINO's IR of it) plus the JSON the runtime scorer (`patchline.runtime`) reads,
checked on each runtime against the version's own PyTorch scoring before it is written."""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
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
from patchline.models.scoring.detection import Detections
from patchline.models.scoring.metrics import fuse_scores
from patchline.runtime import (
    FORMAT, FORMAT_RUNTIMES, METADATA, MODEL_FILES, ExportedLine, file_digest, installed, metadata_digest,
    passed_runtimes)
from patchline.storage.model_bundle import CONFIG, load_bundle
from patchline.storage.registry import champion_version, registered_model_name

# Parity asked of an export (issue 24): image scores within this relative difference (`score_differences`),
# maps within this difference relative to the map's largest value (at least 1), decisions identical.
SCORE_RTOL = 1e-4
MAP_TOL = 1e-3


class ExportError(ValueError):
    """The version cannot be exported, or its export does not score as the version does."""


@dataclass(frozen=True)
class Export:
    folder: Path
    version: str | None  # None: exported by the rebuild that logs it, before its version was registered
    model_format: str
    # Per runtime checked: passed, and parity (max_rel_score_diff, max_map_diff) and speed (img_s) or error.
    runtimes: dict[str, dict]
    torch_img_s: float

    @property
    def runtime(self) -> str:
        """The fastest runtime that passed: the one `patchline.runtime.ExportedLine` takes by default."""
        return passed_runtimes({"runtimes": self.runtimes})[0]


def export_version(client: MlflowClient, line: str, out: Path, version: str | None = None,
                   check_images: list[np.ndarray] | None = None, model_format: str = "onnx") -> Export:
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
        return export_bundle(bundles[0], out, version, check_images, model_format)


def export_bundle(bundle: Path, out: Path, version: str | None = None,
                  check_images: list[np.ndarray] | None = None, model_format: str = "onnx") -> Export:
    """A model bundle (storage/model_bundle.py) into `out` (the graph in `model_format`, line.json), after
    scoring `check_images` (default: a few synthetic ones) with PyTorch and with each installed runtime
    of that format; a runtime that differs is recorded as failed, `ExportError` if none passes."""
    if model_format not in MODEL_FILES:
        raise ExportError(f"unknown export format {model_format!r}; one of {', '.join(MODEL_FILES)}")
    runtimes = [runtime for runtime in FORMAT_RUNTIMES[model_format] if installed(runtime)]
    missing = [module for module in ("onnx", "onnxscript") if importlib.util.find_spec(module) is None]
    if missing or not runtimes:
        needed = missing + ([] if runtimes else [" or ".join(FORMAT_RUNTIMES[model_format])])
        raise ExportError(f"exporting to {model_format} needs {', '.join(needed)}: install patchline's export extra "
                          "(pip install -c constraints.txt 'patchline[export]')")
    detector = load_bundle(bundle, torch.device("cpu"))
    # The graph searches the whole bank: its parity is checked against the exact search, its speed
    # compared with the version's own (an indexed search scores the same images, models/patchcore/nearest_index.py).
    reference = load_bundle(bundle, torch.device("cpu"), search="exact")
    images = check_images or _check_images()
    with tempfile.TemporaryDirectory(prefix="patchline-export-") as scratch:
        staged = Path(scratch)
        outputs = export_onnx(detector, staged / MODEL_FILES["onnx"][0])
        if model_format == "openvino":
            _onnx_to_openvino(staged)
        metadata = {"format": FORMAT, "model_format": model_format, "line": detector.config.name, "version": version,
                    "image_size": detector.config.image_size, "outputs": outputs,
                    "model_digests": {name: file_digest(staged / name) for name in MODEL_FILES[model_format]},
                    **json.loads(detector.calibration.to_json())}
        # Written now for the runtimes' `ExportedLine`s, and again below with what they measured.
        _write_metadata(staged, metadata)
        expected = reference.score(images)
        detector.score(images)
        torch_img_s = len(images) / _best_seconds(lambda: detector.score(images))
        metadata["torch_img_s"] = torch_img_s
        metadata["runtimes"] = {runtime: _checked(reference, expected, ExportedLine(staged, runtime=runtime), images)
                                for runtime in runtimes}
        if not passed_runtimes(metadata):
            raise ExportError("; ".join(f"{runtime}: {found['error']}" for runtime, found in metadata["runtimes"].items()))
        _write_metadata(staged, metadata)
        out.mkdir(parents=True, exist_ok=True)
        for path in staged.iterdir():
            shutil.move(str(path), out / path.name)
    return Export(out, version, model_format, metadata["runtimes"], torch_img_s)


def _write_metadata(folder: Path, metadata: dict) -> None:
    """line.json with its own digest, which `ExportedLine` checks."""
    (folder / METADATA).write_text(json.dumps({**metadata, "digest": metadata_digest(metadata)}, indent=2,
                                              sort_keys=True))


def runtime_summary(runtime: str, found: dict) -> str:
    """One runtime's entry of line.json (`Export.runtimes`) in words, as the CLI and the rebuild log it."""
    if not found["passed"]:
        return f"{runtime}: FAILED the parity check: {found['error']}"
    return (f"{runtime}: scores within {found['max_rel_score_diff']:.1e} relative, maps within "
            f"{found['max_map_diff']:.1e}, {found['img_s']:.1f} images/s")


def _onnx_to_openvino(folder: Path) -> None:
    """Replace the folder's ONNX graph by OpenVINO's IR of it (float32 weights kept as they are)."""
    import openvino

    onnx_path = folder / MODEL_FILES["onnx"][0]
    openvino.save_model(openvino.convert_model(str(onnx_path)), str(folder / MODEL_FILES["openvino"][0]),
                        compress_to_fp16=False)
    onnx_path.unlink()


def _checked(detector: LineDetector, expected: dict[str, Detections], exported: ExportedLine,
             images: list[np.ndarray]) -> dict:
    """One runtime's entry in line.json: its parity with `expected` and its speed, or why it failed."""
    try:
        score_diff, map_diff = check_parity(detector, expected, exported.detections(images))
    except ExportError as error:
        return {"passed": False, "error": str(error)}
    return {"passed": True, "max_rel_score_diff": score_diff, "max_map_diff": map_diff,
            "img_s": len(images) / _best_seconds(lambda: exported.detections(images))}


def _best_seconds(work: Callable[[], object], repeats: int = 3) -> float:
    """The shortest wall time of `repeats` runs of `work` (after a first run elsewhere warmed it up)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def check_parity(detector: LineDetector, expected: dict[str, Detections],
                 found: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """(largest score difference (`score_differences`), largest relative map difference) over every detector
    of `found` (an export's detections) from `expected` (the version's); `ExportError` beyond the
    tolerances or when a decision differs."""
    if set(found) != set(expected):
        raise ExportError(f"the export scores {sorted(found)}, the version {sorted(expected)}")
    calibration = detector.calibration
    score_diff = max(score_differences({name: scores for name, (scores, _) in found.items()},
                                       {name: detections.scores for name, detections in expected.items()},
                                       calibration.normalisers, calibration.fusion_weights).values())
    map_diff = 0.0
    for name, detections in expected.items():
        scale = max(1.0, float(np.abs(detections.maps).max()))
        map_diff = max(map_diff, float(np.max(np.abs(found[name][1] - detections.maps))) / scale)
    decider = calibration.decision_detector
    _, decisions, _ = detector.decide(expected)
    exported_decisions = found[decider][0] >= calibration.thresholds[decider]
    if score_diff > SCORE_RTOL or map_diff > MAP_TOL or not np.array_equal(decisions, exported_decisions):
        raise ExportError(f"the export does not score as the version does: scores differ by up to {score_diff:.2e} "
                          f"(relative; allowed {SCORE_RTOL:g}), maps by {map_diff:.2e} (allowed {MAP_TOL:g}), "
                          f"decisions {'equal' if np.array_equal(decisions, exported_decisions) else 'differ'}")
    return score_diff, map_diff


def score_differences(found: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray],
                      normalisers: Mapping[str, Mapping[str, float]],
                      fusion_weights: Mapping[str, float] | None) -> dict[str, float]:
    """Per detector, the largest difference of `found` from `expected` image scores relative to their size.
    The size of a `fused` score (a weighted mean of z-scores, which crosses 0) is that of its terms: the
    same mean of the detectors' absolute scores over their scales, uncentred. Differences of up to 1e-4
    (relative) in the detectors' scores move the fused score by up to 1e-4 of that."""
    sizes = {name: np.abs(scores) for name, scores in expected.items() if name != FUSED}
    if FUSED in expected:
        scales = {name: {"center": 0.0, "scale": normalisers[name]["scale"]} for name in sizes}
        sizes[FUSED] = fuse_scores(sizes, scales, fusion_weights)
    return {name: float(np.max(np.abs(found[name] - expected[name]) / np.maximum(sizes[name], 1e-12)))
            for name in expected}


def _check_images() -> list[np.ndarray]:
    """A grey and a colour image of other sizes than any line's, with texture and a bright blob."""
    rng = np.random.default_rng(0)
    grey = rng.normal(128, 30, (300, 280)).clip(0, 255).astype(np.uint8)
    grey[100:140, 60:90] = 250
    colour = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    return [grey, colour]
