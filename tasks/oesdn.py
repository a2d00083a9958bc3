"""OE-SDN steps: train the autoencoder, then the style-distillation network against it."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from torch import nn

from models.detection import Detections
from models.line_detector import reconstruction_detections
from models.oesdn_training import train_autoencoder, train_sdn
from models.config import LineConfig
from storage.manifest import ManifestRow
from storage.pixels import read_pixels
from tasks.timing import stopwatch


@dataclass(frozen=True)
class TrainedNetwork:
    network: nn.Module
    history: dict[str, list[float]]
    seconds: float


@task(name="train-autoencoder", cache_policy=NO_CACHE)
def train_autoencoder_task(config: LineConfig, rows: list[ManifestRow]) -> TrainedNetwork:
    """The AE on the line's good fit images."""
    with stopwatch() as elapsed:
        network, history = train_autoencoder([read_pixels(r.source) for r in rows], config.oesdn)
    _log_training("autoencoder", history, elapsed[0])
    return TrainedNetwork(network, history, elapsed[0])


@task(name="train-sdn", cache_policy=NO_CACHE)
def train_sdn_task(config: LineConfig, rows: list[ManifestRow], autoencoder: TrainedNetwork) -> TrainedNetwork:
    """The OE-SDN (KD on the AE's output + outlier exposure on rotated images) on the same images."""
    with stopwatch() as elapsed:
        network, history = train_sdn([read_pixels(r.source) for r in rows], autoencoder.network, config.oesdn)
    _log_training("oe-sdn", history, elapsed[0])
    return TrainedNetwork(network, history, elapsed[0])


def _log_training(label: str, history: dict[str, list[float]], seconds: float) -> None:
    best_val = min(history["val_loss"]) if history.get("val_loss") else float("nan")
    get_run_logger().info("%s: %d epochs in %.0f s, last train loss %.4g, best val loss %.4g", label,
                          len(history["train_loss"]), seconds, history["train_loss"][-1], best_val)


@task(name="score-oesdn", cache_policy=NO_CACHE)
def score_reconstruction_task(config: LineConfig, autoencoder: TrainedNetwork, sdn: TrainedNetwork | None,
                              rows: list[ManifestRow]) -> dict[str, Detections]:
    """OE-SDN and AE-baseline detections of `rows`."""
    return reconstruction_detections(config, autoencoder.network, sdn.network if sdn else None,
                                     [read_pixels(r.source) for r in rows])
