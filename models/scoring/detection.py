"""The result shape every detector returns, so evaluation treats PatchCore, OE-SDN and the AE alike."""

from __future__ import annotations

from collections.abc import Iterable
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


def gather_detections(batches: Iterable[Detections], count: int) -> Detections:
    """Detections of `count` images arriving in batches, written into arrays sized for all of them:
    concatenating the batches at the end would hold every anomaly map twice, the largest allocation
    of a scoring run."""
    scores: np.ndarray | None = None
    maps: np.ndarray | None = None
    start = 0
    for batch in batches:
        if maps is None:
            scores = np.empty(count, dtype=batch.scores.dtype)
            maps = np.empty((count, *batch.maps.shape[1:]), dtype=batch.maps.dtype)
        if start + len(batch.scores) > count:
            raise ValueError(f"batches hold more than the {count} images announced")
        scores[start:start + len(batch.scores)], maps[start:start + len(batch.scores)] = batch.scores, batch.maps
        start += len(batch.scores)
    if maps is None or start != count:
        raise ValueError(f"batches held {start} images, {count} were announced")
    return Detections(scores, maps)
