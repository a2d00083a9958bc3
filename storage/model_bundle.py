"""A line's fitted detectors as one folder of plain files: what the MLflow model carries.

    config.yaml              the line config the detectors were built with
    calibration.json         normalisers, thresholds and the deciding detector
    <detector files>         whatever each detector's `save` writes (models/detectors.py): PatchCore's
                             memory_bank.safetensors and backbone.pth, OE-SDN's autoencoder/sdn.safetensors

No file is a pickle of patchline objects: weights are safetensors or a weights-only state_dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from patchline.models.config import LineConfig
from patchline.models.detectors import Detector, load_detectors
from patchline.models.line_detector import LineDetector
from patchline.models.scoring.calibration import Calibration
from patchline.storage.line_config import load_line, save_line

CONFIG, CALIBRATION = "config.yaml", "calibration.json"


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
    return folder


def load_bundle(folder: Path, device: torch.device | None = None) -> LineDetector:
    """The `LineDetector` saved by `save_bundle`, ready to score."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise ValueError(f"{folder}: not a patchline model bundle (no {CONFIG})")
    config = load_line(folder / CONFIG)
    calibration = Calibration.from_json((folder / CALIBRATION).read_text()) if (folder / CALIBRATION).is_file() else None
    return LineDetector(config, load_detectors(folder, config, device), calibration)
