"""Packaging a rebuild's fitted detectors as the model bundle the MLflow model carries, and its ONNX export."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from patchline.models.config import LineConfig
from patchline.models.detector_spec import Detector
from patchline.models.scoring.calibration import Calibration
from patchline.storage.export import export_bundle, runtime_summary
from patchline.storage.model_bundle import save_bundle


@task(name="package-model", cache_policy=NO_CACHE)
def package_model_task(config: LineConfig, calibration: Calibration, folder: Path,
                       detectors: dict[str, Detector]) -> Path:
    """Write the bundle of every detector the line enables into `folder`; returns it."""
    return save_bundle(folder, config, calibration, detectors)


# No retries: an export that does not score as the bundle does will not on a second try.
@task(name="export-onnx", cache_policy=NO_CACHE)
def export_model_task(bundle: Path, folder: Path) -> Path:
    """The bundle exported into `folder` and checked for parity (a line's `export_onnx`): a failed check
    fails the rebuild before anything is logged or registered."""
    exported = export_bundle(bundle, folder)
    logger = get_run_logger()
    for runtime, found in exported.runtimes.items():
        (logger.info if found["passed"] else logger.warning)("exported to ONNX, %s", runtime_summary(runtime, found))
    return folder
