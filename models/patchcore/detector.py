"""PatchCore as a line detector: backbone features of the images scored against the memory bank."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from patchline.models.config import LineConfig
from patchline.models.patchcore.backbones import backbone_weights_file
from patchline.models.patchcore.graph import PatchCoreGraph
from patchline.models.patchcore.memory_bank import MemoryBank, PatchCoreScorer
from patchline.models.patchcore.patch_features import PatchFeatureExtractor
from patchline.models.scoring.detection import Detections, gather_detections

BANK, BACKBONE = "memory_bank.safetensors", "backbone.pth"


class PatchCoreDetector:
    """A memory bank with the backbone that made its features; maps come at the line's image size."""

    def __init__(self, bank: MemoryBank, device: torch.device | None = None) -> None:
        self.bank, self.device = bank, device

    # Built on first use: saving a freshly fitted bank needs neither the backbone nor the bank on the device.
    @cached_property
    def extractor(self) -> PatchFeatureExtractor:
        return PatchFeatureExtractor(self.bank.config, self.bank.image_size, self.device)

    @cached_property
    def scorer(self) -> PatchCoreScorer:
        return PatchCoreScorer(self.bank, self.device)

    def score_features(self, features: np.ndarray) -> Detections:
        """PatchCore on already extracted (N, H*W, D) features, e.g. read from the feature store."""
        return self.scorer.score(features, self.extractor.grid, self.bank.image_size)

    def score(self, images: Sequence[np.ndarray], progress: bool = False) -> Detections:
        batches = self.extractor.extract_images(images, progress)
        return gather_detections(map(self.score_features, batches), len(images))

    def graph(self) -> PatchCoreGraph:
        return PatchCoreGraph(self.extractor, self.scorer)

    def save(self, folder: Path) -> None:
        """The bank and the backbone's weights file, so scoring needs no weight package installed."""
        self.bank.save(folder / BANK)
        shutil.copyfile(backbone_weights_file(self.bank.config.backbone, self.bank.config.weights_path),
                        folder / BACKBONE)

    @classmethod
    def load(cls, folder: Path, config: LineConfig, device: torch.device | None = None) -> PatchCoreDetector:
        bank = MemoryBank.load(folder / BANK)
        # The search is a scoring choice: the line's (or the scoring call's, storage/model_bundle.py).
        patchcore = bank.config.model_copy(update={"weights_path": folder / BACKBONE,
                                                   "search": config.patchcore.search})
        return cls(MemoryBank(bank.features, patchcore, bank.image_size, bank.index), device)
