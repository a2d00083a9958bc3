"""Building a line's manifest from its configured data source, and checking that a rebuild can use it."""

from __future__ import annotations

import logging

from patchline.models.config import MASK_METRICS, LineConfig
from patchline.storage.manifest import MIN_GOOD_TRAIN_IMAGES, Manifest
from patchline.storage.sources import READERS

log = logging.getLogger(__name__)


class IngestError(ValueError):
    """Input a rebuild cannot use: bad files in a line that does not allow skipping, or data that lacks
    what the rebuild needs; the message lists each file or says what is missing."""


def build_manifest(config: LineConfig) -> Manifest:
    """Discover, decode and validate every image of the line, and split it into train and test."""
    scan = READERS[config.source.kind](config.source)
    if scan.problems and config.on_bad_input == "fail":
        listed = "\n".join(f"  {item.path}: {item.reason}" for item in scan.problems)
        raise IngestError(f"line {config.name}: {len(scan.problems)} bad input file(s); fix them or set "
                          f"on_bad_input: skip in the line config\n{listed}")
    for item in scan.problems:
        log.warning("skipping %s: %s", item.path, item.reason)
    for item in scan.ignored:
        log.info("ignoring %s: %s", item.path, item.reason)
    for item in scan.linked:
        log.warning("%s: %s", item.path, item.reason)
    manifest = Manifest(config.name, scan.rows, scan.problems, scan.ignored, linked=scan.linked)
    missing = requirements_missing(config, manifest)
    if missing:
        skipped = [f"  skipped {item.path}: {item.reason}" for item in scan.problems]
        raise IngestError("\n".join([f"line {config.name}: the data cannot be rebuilt from; nothing was trained",
                                     *(f"  {line}" for line in missing), *skipped]))
    return manifest


def requirements_missing(config: LineConfig, manifest: Manifest) -> list[str]:
    """What the rebuild will need and this manifest lacks, found before any training starts."""
    missing = []
    goods = len(manifest.select("train", "good"))
    if goods < MIN_GOOD_TRAIN_IMAGES:
        missing.append(f"{goods} usable good training image(s); at least {MIN_GOOD_TRAIN_IMAGES} are needed (some "
                       "train the detectors, at least two are held out to set thresholds)")
    test = [row for row in manifest.select(split="test") if row.label != "ambiguous"]
    for label, what in (("good", "good parts (test/good/)"), ("anomaly", "defective parts (test/<defect>/)")):
        if not any(row.label == label for row in test):
            missing.append(f"the test split has no {what}: detectors are measured, and promotion gated, on a "
                           "test set of both good and defective parts")
    if config.promotion.metric in MASK_METRICS and not any(row.mask for row in test):
        missing.append(f"promotion.metric {config.promotion.metric} is a pixel metric, but no test image has a "
                       "ground-truth mask (ground_truth/<defect>/<name>_mask.png)")
    return missing
