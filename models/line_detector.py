"""One product line's detectors together: PatchCore, OE-SDN, the AE baseline, mean darkness, and their fusion.

Raw scores of different detectors live on different scales, so each is normalised with statistics of
held-out good images (`Calibration`) before fusing; the same held-out scores give each detector its
decision threshold. Every map is brought to the line's `image_size` so evaluation and overlays treat
the detectors alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.autoencoder import ConvAutoencoder
from models.darkness import score_darkness
from models.detection import Detections, gather_detections
from models.metrics import fit_fusion_normalisers, fuse_scores, threshold_from_good_scores
from models.oesdn_scoring import score_autoencoder, score_oesdn
from models.patch_features import PatchFeatureExtractor
from models.patchcore import PatchCoreScorer
from models.sdn import StyleDistillationNetwork
from models.config import LineConfig

FUSED = "fused"


@dataclass(frozen=True)
class Calibration:
    """Fitted on held-out good images only: per-detector normalisers, thresholds, and the deciding detector."""

    normalisers: dict[str, dict[str, float]]
    thresholds: dict[str, float]
    decision_detector: str
    # Weights of the normalised scores in `fused` (None = alike); kept here so a deployed model fuses
    # exactly as the rebuild that set its fused threshold did.
    fusion_weights: dict[str, float] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        return cls(**json.loads(text))


def fit_calibration(good: dict[str, Detections], percentile: float, decision_detector: str,
                    fusion_weights: dict[str, float] | None = None) -> Calibration:
    """Normalisers and thresholds from the held-out good images' detections of each base detector."""
    normalisers = fit_fusion_normalisers({name: d.scores for name, d in good.items()})
    if fusion_weights is not None:
        fusion_weights = {name: weight for name, weight in fusion_weights.items() if name in good}
        if not any(fusion_weights.values()):
            raise ValueError(f"fusion_weights give every detector of this run ({sorted(good)}) weight 0")
    fused = fuse_scores({name: d.scores for name, d in good.items()}, normalisers, fusion_weights)
    thresholds = {name: threshold_from_good_scores(d.scores, percentile) for name, d in good.items()}
    thresholds[FUSED] = threshold_from_good_scores(fused, percentile)
    if decision_detector not in thresholds:
        raise ValueError(f"decision detector {decision_detector!r} is not one of {sorted(thresholds)}")
    return Calibration(normalisers, thresholds, decision_detector, fusion_weights)


def fuse(detections: dict[str, Detections], calibration: Calibration) -> Detections:
    """The fused detector: weighted mean of normalised scores, and of maps normalised with the same statistics."""
    weights = calibration.fusion_weights
    scores = fuse_scores({name: d.scores for name, d in detections.items()}, calibration.normalisers, weights)
    maps = fuse_scores({name: d.maps for name, d in detections.items()}, calibration.normalisers, weights)
    return Detections(scores.astype(np.float32), maps.astype(np.float32))


def resize_maps(detections: Detections, size: int) -> Detections:
    """The same detections with maps resized (bilinear) to `size` × `size`."""
    if detections.maps.shape[1:] == (size, size):
        return detections
    maps = F.interpolate(torch.from_numpy(detections.maps)[:, None], size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0].numpy()
    return Detections(detections.scores, maps)


def darkness_detections(config: LineConfig, images: Sequence[np.ndarray]) -> dict[str, Detections]:
    """Mean-darkness detections when the line enables that detector (it needs no fitting)."""
    if "darkness" not in config.evaluation.detectors:
        return {}
    return {"darkness": score_darkness(images, config.image_size)}


def reconstruction_detections(config: LineConfig, autoencoder: ConvAutoencoder | None,
                              sdn: StyleDistillationNetwork | None, images: Sequence[np.ndarray]) -> dict[str, Detections]:
    """OE-SDN and AE-baseline detections of the enabled ones among them, maps at the line's image size."""
    results = {}
    if "oesdn" in config.evaluation.detectors:
        results["oesdn"] = resize_maps(score_oesdn(autoencoder, sdn, images, config.oesdn), config.image_size)
    if "ae" in config.evaluation.detectors:
        results["ae"] = resize_maps(score_autoencoder(autoencoder, images, config.oesdn), config.image_size)
    return results


class LineDetector:
    """The trained detectors of one line; `score` turns uint8 images into detections per detector."""

    def __init__(self, config: LineConfig, extractor: PatchFeatureExtractor | None, scorer: PatchCoreScorer | None,
                 autoencoder: ConvAutoencoder | None, sdn: StyleDistillationNetwork | None,
                 calibration: Calibration | None = None) -> None:
        wanted = set(config.evaluation.detectors)
        if "patchcore" in wanted and (extractor is None or scorer is None):
            raise ValueError("patchcore is enabled but the extractor or memory bank is missing")
        if wanted & {"oesdn", "ae"} and autoencoder is None:
            raise ValueError("oesdn/ae are enabled but the autoencoder is missing")
        if "oesdn" in wanted and sdn is None:
            raise ValueError("oesdn is enabled but the style-distillation network is missing")
        self.config, self.extractor, self.scorer = config, extractor, scorer
        self.autoencoder, self.sdn, self.calibration = autoencoder, sdn, calibration

    def score_patch_features(self, features: np.ndarray) -> Detections:
        """PatchCore on already extracted (N, H*W, D) features, e.g. read from the feature store."""
        if self.extractor is None or self.scorer is None:
            raise ValueError("patchcore is not enabled for this line: no extractor or memory bank")
        return self.scorer.score(features, self.extractor.grid, self.config.image_size)

    def score(self, images: Sequence[np.ndarray], progress: bool = False) -> dict[str, Detections]:
        """Uint8 images → detections of every enabled detector (and `fused` once calibrated)."""
        results: dict[str, Detections] = {}
        if "patchcore" in self.config.evaluation.detectors:
            batches = self.extractor.extract_images(images, progress)
            results["patchcore"] = gather_detections(map(self.score_patch_features, batches), len(images))
        results.update(reconstruction_detections(self.config, self.autoencoder, self.sdn, images))
        results.update(darkness_detections(self.config, images))
        if self.calibration is not None and len(results) > 1:
            results[FUSED] = fuse(results, self.calibration)
        return results

    def decide(self, detections: dict[str, Detections]) -> tuple[Detections, np.ndarray, float]:
        """The deciding detector's detections, its per-image decisions (True = anomalous) and threshold."""
        if self.calibration is None:
            raise ValueError("this detector is not calibrated: no threshold to decide with")
        name = self.calibration.decision_detector
        threshold = self.calibration.thresholds[name]
        chosen = detections[name]
        return chosen, chosen.scores >= threshold, threshold
