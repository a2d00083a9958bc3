"""The detector registry and the model bundle: every configurable detector is registered, and a bundle
written by the detectors' `save` loads back into a line detector that scores the same."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch

from patchline.models.config import Detector, EvaluationConfig, LineConfig, MvtecSource, OeSdnConfig
from patchline.models.darkness import DarknessDetector
from patchline.models.detectors import DETECTORS
from patchline.models.line_detector import LineDetector
from patchline.models.oesdn.autoencoder import ConvAutoencoder
from patchline.models.oesdn.detector import AutoencoderDetector, OeSdnDetector
from patchline.models.oesdn.sdn import StyleDistillationNetwork
from patchline.models.scoring.calibration import fit_calibration
from patchline.storage.model_bundle import load_bundle, save_bundle


def test_every_detector_a_config_can_name_is_registered():
    assert set(DETECTORS) == set(get_args(Detector))


def test_bundle_round_trip_scores_the_same(tmp_path):
    torch.manual_seed(0)
    oesdn = OeSdnConfig(image_size=32, ae_base_width=8, sdn_base_width=8, smoothing_sigma=1.0)
    config = LineConfig(name="widget", source=MvtecSource(root=tmp_path), image_size=64, oesdn=oesdn,
                        evaluation=EvaluationConfig(detectors=("oesdn", "ae", "darkness")))
    autoencoder = ConvAutoencoder(1, 8, oesdn.ae_latent_dim, 32).eval()
    sdn = StyleDistillationNetwork(1, 8, 32, oesdn.sdn_depth).eval()
    detectors = {"oesdn": OeSdnDetector(autoencoder, sdn, oesdn, 64), "ae": AutoencoderDetector(autoencoder, oesdn, 64),
                 "darkness": DarknessDetector(64)}
    images = [np.random.default_rng(i).integers(0, 256, (40, 40), dtype=np.uint8) for i in range(6)]
    fitted = LineDetector(config, detectors)
    calibration = fit_calibration(fitted.score(images), 99.0, "oesdn")
    loaded = load_bundle(save_bundle(tmp_path / "bundle", config, calibration, detectors), torch.device("cpu"))
    before, after = LineDetector(config, detectors, calibration).score(images), loaded.score(images)
    assert set(after) == {"oesdn", "ae", "darkness", "fused"}
    for name in after:
        np.testing.assert_allclose(after[name].scores, before[name].scores, rtol=1e-6)
        assert after[name].maps.shape == (6, 64, 64)


def test_a_bundle_missing_an_enabled_detector_is_refused(tmp_path):
    config = LineConfig(name="widget", source=MvtecSource(root=tmp_path),
                        evaluation=EvaluationConfig(detectors=("patchcore", "darkness")))
    with pytest.raises(ValueError, match=r"enables \['patchcore'\]"):
        save_bundle(tmp_path / "bundle", config, None, {"darkness": DarknessDetector(256)})
    with pytest.raises(ValueError, match=r"enables \['patchcore'\] but no fitted detector"):
        LineDetector(config, {"darkness": DarknessDetector(256)})
