"""The mean-darkness detector's step: it fits nothing, so it only scores."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from patchline.models.config import LineConfig
from patchline.models.darkness import DarknessDetector
from patchline.models.scoring.detection import Detections
from patchline.storage.manifest import ManifestRow
from patchline.storage.pixels import read_pixels


@task(name="score-darkness", cache_policy=NO_CACHE)
def score_darkness_task(config: LineConfig, rows: list[ManifestRow]) -> Detections:
    """Mean-darkness detections of `rows`."""
    return DarknessDetector(config.image_size).score([read_pixels(r.source) for r in rows])
