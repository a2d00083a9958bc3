"""Ingest: the manifest of a line, and the rows each later step works on."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from patchline.models.config import LineConfig
from patchline.models.process import stopwatch
from patchline.storage.ingest import build_manifest
from patchline.storage.manifest import Manifest, ManifestRow, hold_out_calibration


@dataclass(frozen=True)
class LineData:
    manifest: Manifest
    fit: list[ManifestRow]
    calibration: list[ManifestRow]
    test: list[ManifestRow]


# Bad input is not transient, so no retries: the run stops with the message naming the files.
@task(name="ingest", cache_policy=NO_CACHE)
def ingest_line(config: LineConfig) -> LineData:
    """Build and validate the manifest and split off the held-out good images for calibration."""
    with stopwatch() as elapsed:
        manifest = build_manifest(config)
    get_run_logger().info("ingested %s in %.1f s\n%s", config.name, elapsed[0], manifest.summary())
    fit, calibration = hold_out_calibration(manifest.select("train", "good"), config.evaluation.calibration_fraction)
    return LineData(manifest, fit, calibration, manifest.select(split="test"))
