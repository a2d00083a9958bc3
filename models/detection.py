"""The result shape every detector returns, so evaluation treats PatchCore, OE-SDN and the AE alike."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Image scores (N,) and anomaly maps (N, S, S) at the input resolution; higher = more anomalous."""

    scores: np.ndarray
    maps: np.ndarray

    def __post_init__(self) -> None:
        if self.scores.ndim != 1 or self.maps.ndim != 3 or len(self.scores) != len(self.maps):
            raise ValueError(
                f"expected scores (N,) and maps (N, H, W), got {self.scores.shape} and {self.maps.shape}")
