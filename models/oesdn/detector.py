"""OE-SDN and its autoencoder baseline as line detectors; maps come at the line's image size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from patchline.models.config import LineConfig, OeSdnConfig
from patchline.models.detector_spec import Detector, Fitted
from patchline.models.oesdn.autoencoder import ConvAutoencoder
from patchline.models.oesdn.checkpoint import load_autoencoder, load_sdn, save_network
from patchline.models.oesdn.graph import ReconstructionGraph
from patchline.models.oesdn.scoring import score_autoencoder, score_oesdn
from patchline.models.oesdn.sdn import StyleDistillationNetwork
from patchline.models.oesdn.training import train_autoencoder, train_sdn
from patchline.models.scoring.calibration import resize_maps
from patchline.models.scoring.detection import Detections

AE, SDN = "autoencoder.safetensors", "sdn.safetensors"


class AutoencoderDetector:
    """The AE baseline: |x − AE(x)|."""

    def __init__(self, autoencoder: ConvAutoencoder, config: OeSdnConfig, map_size: int) -> None:
        self.autoencoder, self.config, self.map_size = autoencoder, config, map_size

    def score(self, images: Sequence[np.ndarray], progress: bool = False) -> Detections:
        return resize_maps(score_autoencoder(self.autoencoder, images, self.config), self.map_size)

    def graph(self) -> ReconstructionGraph:
        return ReconstructionGraph(self.autoencoder, None, self.config, self.map_size)

    def save(self, folder: Path) -> None:
        save_network(self.autoencoder, folder / AE)

    @classmethod
    def load(cls, folder: Path, config: LineConfig, device: torch.device | None = None) -> AutoencoderDetector:
        return cls(load_autoencoder(folder / AE, device), config.oesdn, config.image_size)


class OeSdnDetector:
    """OE-SDN: |SDN(x) − AE(x)|, the AE's blur against the SDN's sharper copy of it."""

    def __init__(self, autoencoder: ConvAutoencoder, sdn: StyleDistillationNetwork, config: OeSdnConfig,
                 map_size: int) -> None:
        self.autoencoder, self.sdn, self.config, self.map_size = autoencoder, sdn, config, map_size

    def score(self, images: Sequence[np.ndarray], progress: bool = False) -> Detections:
        return resize_maps(score_oesdn(self.autoencoder, self.sdn, images, self.config), self.map_size)

    def graph(self) -> ReconstructionGraph:
        return ReconstructionGraph(self.autoencoder, self.sdn, self.config, self.map_size)

    def save(self, folder: Path) -> None:
        save_network(self.autoencoder, folder / AE)
        save_network(self.sdn, folder / SDN)

    @classmethod
    def load(cls, folder: Path, config: LineConfig, device: torch.device | None = None) -> OeSdnDetector:
        return cls(load_autoencoder(folder / AE, device), load_sdn(folder / SDN, device), config.oesdn,
                   config.image_size)


def fit_autoencoder(config: LineConfig, images: Sequence[np.ndarray], fitted: Mapping[str, Detector]) -> Fitted:
    """The AE baseline trained on `images`."""
    network, history = train_autoencoder(images, config.oesdn)
    return Fitted(AutoencoderDetector(network, config.oesdn, config.image_size), {"autoencoder": history})


def fit_oesdn(config: LineConfig, images: Sequence[np.ndarray], fitted: Mapping[str, Detector]) -> Fitted:
    """The SDN trained against the AE: the AE baseline's when the line fitted one (`fitted["ae"]`), else
    one trained here."""
    histories = {}
    if "ae" in fitted:
        autoencoder = fitted["ae"].autoencoder
    else:
        autoencoder, histories["autoencoder"] = train_autoencoder(images, config.oesdn)
    sdn, histories["sdn"] = train_sdn(images, autoencoder, config.oesdn)
    return Fitted(OeSdnDetector(autoencoder, sdn, config.oesdn, config.image_size), histories)
