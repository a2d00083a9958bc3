"""The mean-darkness detector's step: it fits nothing, so it only scores."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from models.config import LineConfig
from models.detection import Detections
from models.line_detector import darkness_detections
from storage.manifest import ManifestRow
from storage.pixels import read_pixels


@task(name="score-darkness", cache_policy=NO_CACHE)
def score_darkness_task(config: LineConfig, rows: list[ManifestRow]) -> dict[str, Detections]:
    """Mean-darkness detections of `rows` (empty when the line does not enable the detector)."""
    return darkness_detections(config, [read_pixels(r.source) for r in rows])
