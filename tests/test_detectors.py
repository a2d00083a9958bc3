"""Every registered detector through the same tests (fit, bundle round trip, export graph, refusal of a
missing one), and a toy detector added as ARCHITECTURE.md says (its module, a registry entry, a settings
section) that a whole rebuild fits, scores, packages and registers with nothing else changed."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
import yaml
from prefect.client.orchestration import get_client

from patchline.models.config import EvaluationConfig, LineConfig, MvtecSource, OeSdnConfig, PatchCoreConfig
from patchline.models.darkness import DarknessDetector
from patchline.models.detector_spec import Detector
from patchline.models.detectors import DETECTORS, fitting_order
from patchline.models.line_detector import LineDetector
from patchline.models.patchcore.coreset import coreset_size, greedy_coreset
from patchline.models.patchcore.detector import PatchCoreDetector
from patchline.models.patchcore.memory_bank import MemoryBank
from patchline.models.patchcore.patch_features import PatchFeatureExtractor
from patchline.models.scoring.calibration import fit_calibration
from patchline.storage.line_config import load_line
from patchline.storage.model_bundle import load_bundle, save_bundle
from patchline.storage.registry import registered_model_name
from tests import toy_detector
from tests.conftest import textured, write_mvtec_line

IMAGES = [textured(i, 40) for i in range(8)]


def small_config(root, detectors: tuple[str, ...]) -> LineConfig:
    return LineConfig(name="widget", source=MvtecSource(root=root), image_size=64,
                      patchcore=PatchCoreConfig(coreset_ratio=0.2, batch_size=4),
                      oesdn=OeSdnConfig(image_size=32, epochs=2, sdn_epochs=2, batch_size=4, ae_base_width=8,
                                        sdn_base_width=8, smoothing_sigma=1.0),
                      evaluation=EvaluationConfig(detectors=detectors))


def fit(name: str, config: LineConfig, fitted: dict[str, Detector]) -> Detector:
    """`name` fitted on IMAGES; PatchCore (fitted from the feature store in a rebuild) from its features here."""
    spec = DETECTORS[name]
    if spec.fit is not None:
        return spec.fit(config, IMAGES, {k: v for k, v in fitted.items() if k in spec.after}).detector
    features = np.concatenate(list(PatchFeatureExtractor(config.patchcore, config.image_size).extract_images(IMAGES)))
    patches = features.reshape(-1, features.shape[-1])
    chosen = greedy_coreset(patches, coreset_size(len(patches), config.patchcore.coreset_ratio)).indices
    return PatchCoreDetector(MemoryBank(patches[chosen], config.patchcore, config.image_size))


@pytest.fixture(params=[*DETECTORS, "toy"])
def detector_name(request, monkeypatch) -> str:
    toy_detector.register(monkeypatch)
    return request.param


def test_every_registered_detector_fits_saves_loads_and_exports_as_it_scores(detector_name, tmp_path):
    torch.manual_seed(0)
    config = small_config(tmp_path, tuple(fitting_order(DETECTORS[detector_name].after + (detector_name,))))
    fitted: dict[str, Detector] = {}
    for name in config.evaluation.detectors:
        fitted[name] = fit(name, config, fitted)
    line = LineDetector(config, fitted)
    calibration = fit_calibration(line.score(IMAGES), 99.0, detector_name)
    loaded = load_bundle(save_bundle(tmp_path / "bundle", config, calibration, fitted), torch.device("cpu"))
    before, after = LineDetector(config, fitted, calibration).score(IMAGES[:3]), loaded.score(IMAGES[:3])
    assert set(after) == set(before)
    for name in after:
        np.testing.assert_allclose(after[name].scores, before[name].scores, rtol=1e-6)
        assert after[name].maps.shape == (3, 64, 64)
    # The export graph (models/export_graph.py) of each detector scores an image as `score` does.
    graph = loaded.detectors[detector_name].graph().eval()
    pixels = torch.from_numpy(np.repeat(IMAGES[0][None, None], 3, axis=1)).float() / 255.0
    with torch.inference_mode():
        score, heat = graph(pixels)
    np.testing.assert_allclose(score.numpy(), before[detector_name].scores[:1], rtol=1e-3, atol=1e-5)
    assert tuple(heat.shape) == (1, 64, 64)


def test_names_outside_the_registry_are_refused_naming_the_registered_ones(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"'toy' is not a registered detector; use one of patchcore, oesdn, ae, dark"):
        EvaluationConfig(detectors=("patchcore", "toy"))
    with pytest.raises(ValueError, match=r"detector_settings names 'toy'"):
        LineConfig(name="widget", source=MvtecSource(root=tmp_path), detector_settings={"toy": {"size": 8}})
    toy_detector.register(monkeypatch)
    config = LineConfig(name="widget", source=MvtecSource(root=tmp_path), detector_settings={"toy": {"size": 8}},
                        evaluation=EvaluationConfig(detectors=("toy",), decision_detector="toy"))
    assert config.settings_of("toy").size == 8
    with pytest.raises(ValueError, match=r"Extra inputs are not permitted"):
        LineConfig(name="widget", source=MvtecSource(root=tmp_path), detector_settings={"toy": {"sise": 8}})


def test_oesdn_is_fitted_after_the_ae_baseline_whose_autoencoder_it_reuses(tmp_path):
    assert fitting_order(["darkness", "oesdn", "ae"]) == ["ae", "oesdn", "darkness"]
    config = small_config(tmp_path, ("oesdn", "ae"))
    ae = fit("ae", config, {})
    assert fit("oesdn", config, {"ae": ae}).autoencoder is ae.autoencoder


def test_a_bundle_missing_an_enabled_detector_is_refused(tmp_path):
    config = LineConfig(name="widget", source=MvtecSource(root=tmp_path),
                        evaluation=EvaluationConfig(detectors=("patchcore", "darkness")))
    with pytest.raises(ValueError, match=r"enables \['patchcore'\]"):
        save_bundle(tmp_path / "bundle", config, None, {"darkness": DarknessDetector(256)})
    with pytest.raises(ValueError, match=r"enables \['patchcore'\] but no fitted detector"):
        LineDetector(config, {"darkness": DarknessDetector(256)})


def test_a_line_rebuilds_with_a_toy_detector_added_in_one_module(home, tmp_path, monkeypatch):
    from patchline.flows.rebuild import rebuild_product_line

    toy_detector.register(monkeypatch)
    root = write_mvtec_line(tmp_path / "line", train=8)
    path = tmp_path / "toy-line.yaml"
    path.write_text(yaml.safe_dump({
        "name": "toy-line", "source": {"kind": "mvtec", "root": str(root)}, "image_size": 64,
        "detector_settings": {"toy": {"size": 8}},
        "evaluation": {"calibration_fraction": 0.25, "detectors": ["toy", "darkness"], "decision_detector": "toy"}}))
    result = rebuild_product_line(load_line(path))
    assert result.promoted and result.decision_detector == "toy" and "toy" in result.image_auroc
    # The Prefect UI shows the toy detector's own steps, named by the generic tasks.
    with get_client(sync_client=True) as client:
        names = {run.name for run in client.read_task_runs()}
    assert {"fit-toy", "score-toy", "fit-darkness", "score-darkness"} <= names, sorted(names)
    model = mlflow.pyfunc.load_model(f"models:/{registered_model_name('toy-line')}/1")
    detector = model.unwrap_python_model().detector
    assert detector.config.settings_of("toy").size == 8 and detector.detectors["toy"].mean.shape == (8, 8)
    scored = model.predict([textured(100, 40)])
    expected = detector.detectors["toy"].score([textured(100, 40)]).scores
    np.testing.assert_allclose(scored["score"], expected, rtol=1e-6)
