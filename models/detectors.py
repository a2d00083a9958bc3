"""The one registry of the detectors a line can enable (`evaluation.detectors`).

Adding a detector means its module (a class with `score`, `save`, `graph` and a `load`, and a fit
function: models/detector_spec.py), its entry here, and its settings section; the rebuild fits, scores,
packages and exports every registered detector alike (tasks/detectors.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from patchline.models.config import LineConfig
from patchline.models.darkness import DarknessDetector, fit_darkness
from patchline.models.detector_spec import Detector, DetectorSpec
from patchline.models.oesdn.detector import AutoencoderDetector, OeSdnDetector, fit_autoencoder, fit_oesdn
from patchline.models.patchcore.detector import PatchCoreDetector

DETECTORS: dict[str, DetectorSpec] = {
    "patchcore": DetectorSpec(load=PatchCoreDetector.load, fit=None),
    "oesdn": DetectorSpec(load=OeSdnDetector.load, fit=fit_oesdn, after=("ae",), self_checked=True),
    "ae": DetectorSpec(load=AutoencoderDetector.load, fit=fit_autoencoder, self_checked=True),
    "darkness": DetectorSpec(load=DarknessDetector.load, fit=fit_darkness),
}


def fitting_order(names: Iterable[str]) -> list[str]:
    """`names` with each detector after the enabled ones its `after` names (registry order otherwise)."""
    enabled, ordered = set(names), []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise ValueError(f"detectors {' → '.join((*path, name))} each wait for the next to be fitted first")
        if name not in ordered:
            for earlier in DETECTORS[name].after:
                if earlier in enabled:
                    visit(earlier, (*path, name))
            ordered.append(name)

    for name in DETECTORS:
        if name in enabled:
            visit(name, ())
    return ordered


def load_detectors(folder: Path, config: LineConfig, device: torch.device | None = None) -> dict[str, Detector]:
    """The line's enabled detectors, read from a bundle folder that their `save` wrote."""
    return {name: DETECTORS[name].load(folder, config, device) for name in config.evaluation.detectors}
