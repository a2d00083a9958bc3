"""`patchline export` (issue 24): a rebuilt line of real ELPV cells exported to ONNX, scored by
`patchline.runtime` in a process without PyTorch, against the registered version's own scoring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from typer.testing import CliRunner

from patchline.cli import app
from patchline.models.config import EvaluationConfig, LineConfig, MvtecSource, OeSdnConfig, PatchCoreConfig
from patchline.storage.line_config import save_line
from patchline.storage.registry import registered_model_name
from tests.conftest import write_elpv_line

LINE = "cells-export"
runner = CliRunner()


@pytest.fixture(scope="module")
def rebuilt(home, tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """(The line's config file, real cells it never saw: good and cracked, grey, one as RGB) after one rebuild."""
    from patchline.flows.rebuild import rebuild_product_line

    root = tmp_path_factory.mktemp("cells")
    images, good, bad = write_elpv_line(root, train=12, test_good=4, test_cracked=4)
    # Every detector, brightness normalisation and a weighted fusion: each part of the graph is checked.
    config = LineConfig(
        name=LINE, source=MvtecSource(root=root), image_size=64,
        patchcore=PatchCoreConfig(coreset_ratio=0.1, normalise_brightness=True),
        oesdn=OeSdnConfig(image_size=32, epochs=2, sdn_epochs=2, batch_size=4, ae_base_width=8, sdn_base_width=8),
        evaluation=EvaluationConfig(calibration_fraction=0.25, detectors=("patchcore", "oesdn", "ae", "darkness"),
                                    fusion_weights={"patchcore": 1.0, "darkness": 0.5}),
        export_onnx=True)
    path = save_line(config, root.parent / f"{LINE}.yaml")
    rebuild_product_line(config)
    unseen = [images[i] for i in [*good[16:20], *bad[4:8]]]
    unseen.append(np.dstack([unseen[-1]] * 3))
    return path, unseen


def test_the_export_scores_as_the_registered_version_in_a_process_without_torch(rebuilt, tmp_path):
    config_path, images = rebuilt
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(config_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "exported cells-export version 1" in result.output
    metadata = json.loads((out / "line.json").read_text())
    assert metadata["version"] == "1" and metadata["parity"]["max_rel_score_diff"] <= 1e-4

    np.savez(tmp_path / "images.npz", *images)
    script = (
        "import sys, json, numpy as np\n"
        "from patchline.runtime import ExportedLine\n"
        f"data = np.load({str(tmp_path / 'images.npz')!r})\n"
        f"result = ExportedLine({str(out)!r}, threads=2).score([data[k] for k in data.files])\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'mlflow', 'prefect', 'zarr'))]\n"
        f"np.savez({str(tmp_path / 'exported.npz')!r}, **result)\n")
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    exported = dict(np.load(tmp_path / "exported.npz"))

    model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(LINE)}/1")
    expected = model.predict(images)
    assert set(exported) == set(expected)
    for key in [k for k in expected if k.startswith("score")]:
        # Raw scores relative to their size; the fused z-score, which crosses 0, and the 0..1 scores, which
        # saturate in the tails, absolutely.
        tolerance = ({"rtol": 0, "atol": 1e-5} if key.startswith("score_unit") else
                     {"rtol": 0, "atol": 1e-4} if key == "score_fused" else {"rtol": 1e-4, "atol": 0})
        np.testing.assert_allclose(exported[key], expected[key], err_msg=key, **tolerance)
    np.testing.assert_array_equal(exported["decision"], expected["decision"])
    scale = max(1.0, np.abs(expected["anomaly_map"]).max())
    assert np.abs(exported["anomaly_map"] - expected["anomaly_map"]).max() <= 1e-3 * scale
    # The 0..1 scores follow the raw scores' order (ties where the logistic saturates).
    assert np.all(np.diff(exported["score_unit"][np.argsort(exported["score"])]) >= 0)


def test_export_names_what_it_cannot_do(rebuilt, tmp_path):
    config_path, _ = rebuilt
    result = runner.invoke(app, ["export", str(config_path), "--out", str(tmp_path / "x"), "--version", "7"])
    assert result.exit_code == 2 and "line 'cells-export' has no model version '7'" in result.output
    result = runner.invoke(app, ["export", str(config_path), "--out", str(tmp_path / "x"), "--format", "openvino"])
    assert result.exit_code == 2 and "only onnx is supported" in result.output
    assert not (tmp_path / "x" / "model.onnx").exists()


def test_a_line_that_asks_for_it_logs_its_export_with_each_rebuild(rebuilt, tmp_path):
    from patchline.runtime import ExportedLine

    _, images = rebuilt
    version = mlflow.MlflowClient().get_model_version(registered_model_name(LINE), "1")
    logged = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="export",
                                                      dst_path=str(tmp_path)))
    assert sorted(path.name for path in logged.iterdir()) == ["line.json", "model.onnx"]
    assert json.loads((logged / "line.json").read_text())["parity"]["max_rel_score_diff"] <= 1e-4
    expected = mlflow.pyfunc.load_model(f"models:/{registered_model_name(LINE)}/1").predict(images)
    np.testing.assert_allclose(ExportedLine(logged).score(images)["score"], expected["score"], rtol=1e-4)
