"""Building a line's manifest from its configured data source."""

from __future__ import annotations

import logging

from patchline.models.config import LineConfig
from patchline.storage.manifest import Manifest
from patchline.storage.sources import READERS

log = logging.getLogger(__name__)


class IngestError(ValueError):
    """Bad input files in a line that does not allow skipping; the message lists each file and why."""


def build_manifest(config: LineConfig) -> Manifest:
    """Discover, decode and validate every image of the line, and split it into train and test."""
    scan = READERS[config.source.kind](config.source)
    if scan.problems and config.on_bad_input == "fail":
        listed = "\n".join(f"  {item.path}: {item.reason}" for item in scan.problems)
        raise IngestError(f"line {config.name}: {len(scan.problems)} bad input file(s); fix them or set "
                          f"on_bad_input: skip in the line config\n{listed}")
    for item in scan.problems:
        log.warning("skipping %s: %s", item.path, item.reason)
    return Manifest(config.name, scan.rows, scan.problems)
