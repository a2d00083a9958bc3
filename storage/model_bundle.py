"""A line's trained detectors as one folder of plain files: what the MLflow model carries.

    config.yaml              the line config the detectors were built with
    backbone.pth             the backbone's ImageNet weights (a state_dict), so scoring needs no package data
    memory_bank.safetensors  PatchCore's coreset
    autoencoder.safetensors, sdn.safetensors   OE-SDN's networks
    calibration.json         normalisers, thresholds and the deciding detector

No file is a pickle of patchline objects: weights are safetensors or a weights-only state_dict.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from models.line_detector import Calibration, LineDetector
from models.oesdn_checkpoint import load_autoencoder, load_sdn, save_network
from models.patch_features import PatchFeatureExtractor
from models.patchcore import MemoryBank, PatchCoreScorer
from models.config import LineConfig
from storage.line_config import load_line, save_line

CONFIG, BACKBONE, BANK, AE, SDN, CALIBRATION = (
    "config.yaml", "backbone.pth", "memory_bank.safetensors", "autoencoder.safetensors", "sdn.safetensors",
    "calibration.json")


def save_bundle(folder: Path, config: LineConfig, calibration: Calibration, *, bank: MemoryBank | None = None,
                backbone_weights: Path | None = None, autoencoder: nn.Module | None = None,
                sdn: nn.Module | None = None) -> Path:
    """Write a line's trained parts into `folder`, which `load_bundle` turns back into a `LineDetector`."""
    if bank is not None and backbone_weights is None:
        raise ValueError("a bundle with a PatchCore memory bank needs the backbone weights file too")
    folder.mkdir(parents=True, exist_ok=True)
    save_line(config, folder / CONFIG)
    (folder / CALIBRATION).write_text(calibration.to_json())
    if bank is not None:
        bank.save(folder / BANK)
        shutil.copyfile(backbone_weights, folder / BACKBONE)
    if autoencoder is not None:
        save_network(autoencoder, folder / AE)
    if sdn is not None:
        save_network(sdn, folder / SDN)
    return folder


def load_bundle(folder: Path, device: torch.device | None = None) -> LineDetector:
    """The `LineDetector` saved by `save_bundle`, ready to score."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise ValueError(f"{folder}: not a patchline model bundle (no {CONFIG})")
    config = load_line(folder / CONFIG)
    extractor = scorer = None
    if (folder / BANK).is_file():
        patchcore = config.patchcore.model_copy(update={"weights_path": folder / BACKBONE})
        extractor = PatchFeatureExtractor(patchcore, config.image_size, device)
        scorer = PatchCoreScorer(MemoryBank.load(folder / BANK), device)
    autoencoder = load_autoencoder(folder / AE, device) if (folder / AE).is_file() else None
    sdn = load_sdn(folder / SDN, device) if (folder / SDN).is_file() else None
    calibration = Calibration.from_json((folder / CALIBRATION).read_text()) if (folder / CALIBRATION).is_file() else None
    return LineDetector(config, extractor, scorer, autoencoder, sdn, calibration)
