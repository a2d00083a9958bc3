"""OE-SDN steps: train the autoencoder, then the style-distillation network against it."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from torch import nn

from patchline.models.config import LineConfig, OeSdnConfig
from patchline.models.detectors import Detector
from patchline.models.oesdn.detector import AutoencoderDetector, OeSdnDetector
from patchline.models.oesdn.training import train_autoencoder, train_sdn
from patchline.models.scoring.detection import Detections
from patchline.storage.manifest import ManifestRow
from patchline.storage.pixels import read_pixels
from patchline.tasks.incremental import Reuse
from patchline.tasks.timing import stopwatch


@dataclass(frozen=True)
class TrainedNetwork:
    network: nn.Module
    history: dict[str, list[float]]
    seconds: float
    note: str


@dataclass(frozen=True)
class _Start:
    """What one network trains on: the rows, its settings, the champion's network to start from (or None)
    and a note saying which."""

    rows: list[ManifestRow]
    settings: OeSdnConfig
    network: nn.Module | None
    note: str


def _start(config: LineConfig, reuse: Reuse | None, rows: list[ManifestRow], detector: str, part: str) -> _Start:
    fitted = reuse.detector.detectors.get(detector) if reuse is not None and reuse.incremental else None
    if fitted is None:
        return _Start(rows, config.oesdn, None, f"trained from scratch on {len(rows)} fit images")
    replayed = reuse.replayed(config.oesdn.seed)
    return _Start(replayed, config.oesdn, getattr(fitted, part),
                  f"warm-started from champion v{reuse.version} on its {len(reuse.new_fit)} new fit images and "
                  f"{len(replayed) - len(reuse.new_fit)} replayed old ones")


@task(name="train-autoencoder", cache_policy=NO_CACHE)
def train_autoencoder_task(config: LineConfig, rows: list[ManifestRow], reuse: Reuse | None = None) -> TrainedNetwork:
    """The AE on the line's good fit images, or warm-started from the champion's on new and replayed ones."""
    start = _start(config, reuse, rows, "ae" if "ae" in config.evaluation.detectors else "oesdn", "autoencoder")
    with stopwatch() as elapsed:
        network, history = train_autoencoder([read_pixels(r.source) for r in start.rows], start.settings,
                                             start=start.network)
    _log_training("autoencoder", history, elapsed[0], start.note)
    return TrainedNetwork(network, history, elapsed[0], start.note)


@task(name="train-sdn", cache_policy=NO_CACHE)
def train_sdn_task(config: LineConfig, rows: list[ManifestRow], autoencoder: TrainedNetwork,
                   reuse: Reuse | None = None) -> TrainedNetwork:
    """The OE-SDN (KD on the AE's output + outlier exposure on rotated images) on the same images as the AE."""
    start = _start(config, reuse, rows, "oesdn", "sdn")
    with stopwatch() as elapsed:
        network, history = train_sdn([read_pixels(r.source) for r in start.rows], autoencoder.network,
                                     start.settings, start=start.network)
    _log_training("oe-sdn", history, elapsed[0], start.note)
    return TrainedNetwork(network, history, elapsed[0], start.note)


def _log_training(label: str, history: dict[str, list[float]], seconds: float, note: str) -> None:
    best_val = min(history["val_loss"]) if history.get("val_loss") else float("nan")
    get_run_logger().info("%s: %d epochs in %.0f s, last train loss %.4g, best val loss %.4g (%s)", label,
                          len(history["train_loss"]), seconds, history["train_loss"][-1], best_val, note)


@task(name="score-oesdn", cache_policy=NO_CACHE)
def score_reconstruction_task(config: LineConfig, autoencoder: TrainedNetwork, sdn: TrainedNetwork | None,
                              rows: list[ManifestRow]) -> dict[str, Detections]:
    """OE-SDN and AE-baseline detections of `rows`, of the ones the line enables."""
    images = [read_pixels(r.source) for r in rows]
    return {name: detector.score(images) for name, detector in reconstruction_detectors(config, autoencoder, sdn).items()}


def reconstruction_detectors(config: LineConfig, autoencoder: TrainedNetwork,
                             sdn: TrainedNetwork | None) -> dict[str, Detector]:
    """The enabled ones of OE-SDN and the AE baseline, from the trained networks."""
    detectors: dict[str, Detector] = {}
    if "oesdn" in config.evaluation.detectors:
        detectors["oesdn"] = OeSdnDetector(autoencoder.network, sdn.network, config.oesdn, config.image_size)
    if "ae" in config.evaluation.detectors:
        detectors["ae"] = AutoencoderDetector(autoencoder.network, config.oesdn, config.image_size)
    return detectors
