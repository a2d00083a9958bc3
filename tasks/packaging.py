"""Packaging a rebuild's fitted detectors as the model bundle the MLflow model carries, and its ONNX export."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from patchline.models.config import LineConfig
from patchline.models.darkness import DarknessDetector
from patchline.models.detectors import Detector
from patchline.models.patchcore.detector import PatchCoreDetector
from patchline.models.patchcore.memory_bank import MemoryBank
from patchline.models.scoring.calibration import Calibration
from patchline.storage.export import export_bundle, runtime_summary
from patchline.storage.model_bundle import save_bundle
from patchline.tasks.oesdn import TrainedNetwork, reconstruction_detectors


@task(name="package-model", cache_policy=NO_CACHE)
def package_model_task(config: LineConfig, calibration: Calibration, folder: Path, bank: MemoryBank | None,
                       autoencoder: TrainedNetwork | None, sdn: TrainedNetwork | None) -> Path:
    """Write the bundle of every detector the line enables into `folder`; returns it."""
    detectors: dict[str, Detector] = {}
    if bank is not None:
        detectors["patchcore"] = PatchCoreDetector(bank)
    if autoencoder is not None:
        detectors.update(reconstruction_detectors(config, autoencoder, sdn))
    if "darkness" in config.evaluation.detectors:
        detectors["darkness"] = DarknessDetector(config.image_size)
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
