"""A line's fitted detectors as one folder of plain files: what the MLflow model carries.

    config.yaml              the line config the detectors were built with
    calibration.json         normalisers, thresholds and the deciding detector
    digests.json             the SHA-256 of every other file, checked on every load
    <detector files>         whatever each detector's `save` writes (models/detectors.py): PatchCore's
                             memory_bank.safetensors and backbone.pth, OE-SDN's autoencoder/sdn.safetensors

No file is a pickle of patchline objects: weights are safetensors or a weights-only state_dict.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import get_args

import torch

from patchline.models.config import LineConfig, PatchCoreConfig
from patchline.models.detector_spec import Detector
from patchline.models.detectors import load_detectors
from patchline.models.line_detector import LineDetector
from patchline.models.scoring.calibration import Calibration
from patchline.runtime import file_digest
from patchline.storage.line_config import load_line, save_line

CONFIG, CALIBRATION, DIGESTS = "config.yaml", "calibration.json", "digests.json"
# Names PatchCore's nearest-row search for every bundle loaded in this process, over the line's
# `patchcore.search`: "exact" scores with the reference search.
SEARCH_VARIABLE = "PATCHLINE_SEARCH"
SEARCHES = get_args(PatchCoreConfig.model_fields["search"].annotation)
log = logging.getLogger(__name__)


class BundleDamagedError(ValueError):
    """A bundle file whose bytes differ from those recorded when it was packaged; the message names it."""


def save_bundle(folder: Path, config: LineConfig, calibration: Calibration, detectors: Mapping[str, Detector]) -> Path:
    """Write a line's fitted detectors into `folder`, which `load_bundle` turns back into a `LineDetector`."""
    missing = [name for name in config.evaluation.detectors if name not in detectors]
    if missing:
        raise ValueError(f"line {config.name} enables {missing}, but they are not among the detectors to save")
    folder.mkdir(parents=True, exist_ok=True)
    save_line(config, folder / CONFIG)
    (folder / CALIBRATION).write_text(calibration.to_json())
    for name in config.evaluation.detectors:
        detectors[name].save(folder)
    (folder / DIGESTS).write_text(json.dumps(_digests(folder), indent=2, sort_keys=True))
    return folder


def load_bundle(folder: Path, device: torch.device | None = None, search: str | None = None) -> LineDetector:
    """The `LineDetector` saved by `save_bundle`, ready to score; PatchCore with the nearest-row `search`
    given, else the one `PATCHLINE_SEARCH` names, else the line's."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise ValueError(f"{folder}: not a patchline model bundle (no {CONFIG})")
    check_bundle(folder)
    config = load_line(folder / CONFIG)
    search = search or os.environ.get(SEARCH_VARIABLE)
    if search:
        if search not in SEARCHES:
            raise ValueError(f"{SEARCH_VARIABLE}={search}: the nearest-row search is one of {', '.join(SEARCHES)}")
        config = config.model_copy(update={"patchcore": config.patchcore.model_copy(update={"search": search})})
    calibration = Calibration.from_json((folder / CALIBRATION).read_text()) if (folder / CALIBRATION).is_file() else None
    return LineDetector(config, load_detectors(folder, config, device), calibration)


def check_bundle(folder: Path) -> None:
    """`BundleDamagedError` naming the first file that is missing or whose SHA-256 differs from the one
    recorded at packaging. Bundles packaged before digests were recorded load with a warning."""
    recorded_path = folder / DIGESTS
    if not recorded_path.is_file():
        log.warning("%s: no %s (packaged before bundles recorded digests); its files are not checked", folder, DIGESTS)
        return
    try:
        recorded = json.loads(recorded_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BundleDamagedError(f"{recorded_path}: damaged or changed since it was logged ({error})") from None
    actual = _digests(folder)
    for name, digest in sorted(recorded.items()):
        if name not in actual:
            raise BundleDamagedError(f"{folder / name}: missing from the model bundle")
        if actual[name] != digest:
            raise BundleDamagedError(f"{folder / name}: damaged or changed since it was logged (SHA-256 "
                                     f"{actual[name][:16]}…, logged {digest[:16]}…)")


def _digests(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): file_digest(path) for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != DIGESTS}
