"""`patchline export` (issue 24): a rebuilt line of real ELPV cells exported to ONNX and to OpenVINO's IR,
scored by `patchline.runtime` on ONNX Runtime and OpenVINO in a process without PyTorch, against the
registered version's own scoring; the MLflow model and `patchline score` on the fastest runtime."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from patchline.cli import app
from patchline.models.config import EvaluationConfig, LineConfig, MvtecSource, OeSdnConfig, PatchCoreConfig
from patchline.models.scoring.unit_scale import scored_detectors
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


def _score_without_torch(folder: Path, runtime: str, images: list[np.ndarray], scratch: Path) -> dict[str, np.ndarray]:
    """`ExportedLine(folder, runtime=runtime).score(images)` in a fresh process that must not import torch."""
    np.savez(scratch / "images.npz", *images)
    script = (
        "import sys, json, numpy as np\n"
        "from patchline.runtime import ExportedLine\n"
        f"data = np.load({str(scratch / 'images.npz')!r})\n"
        f"line = ExportedLine({str(folder)!r}, threads=2, runtime={runtime!r})\n"
        "result = line.score([data[k] for k in data.files])\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'mlflow', 'prefect', 'zarr'))]\n"
        f"np.savez({str(scratch / 'exported.npz')!r}, **result)\n")
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return dict(np.load(scratch / "exported.npz"))


def _assert_scores_as(found: dict[str, np.ndarray], expected: dict[str, np.ndarray], metadata: dict) -> None:
    """The parity of issue 24: scores within 1e-4 relative, maps within 1e-3 of their range, decisions equal."""
    from patchline.storage.export import score_differences

    assert set(found) == set(expected)
    names = scored_detectors(expected)
    differences = score_differences({name: found[f"score_{name}"] for name in names},
                                    {name: expected[f"score_{name}"] for name in names},
                                    metadata["normalisers"], metadata["fusion_weights"])
    assert max(differences.values()) <= 1e-4, differences
    np.testing.assert_allclose(found["score"], expected["score"], rtol=1e-4, atol=0)
    # The 0..1 scores, which saturate in the tails, absolutely: well below what a screen shows of them.
    for key in [k for k in expected if k.startswith("score_unit")]:
        np.testing.assert_allclose(found[key], expected[key], err_msg=key, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(found["decision"], expected["decision"])
    scale = max(1.0, np.abs(expected["anomaly_map"]).max())
    assert np.abs(found["anomaly_map"] - expected["anomaly_map"]).max() <= 1e-3 * scale
    # The 0..1 scores follow the raw scores' order (ties where the logistic saturates).
    assert np.all(np.diff(found["score_unit"][np.argsort(found["score"])]) >= 0)


@pytest.mark.parametrize(("model_format", "runtimes"), [("onnx", ["onnxruntime", "openvino"]),
                                                        ("openvino", ["openvino"])])
def test_the_export_scores_as_the_registered_version_in_a_process_without_torch(rebuilt, tmp_path, model_format,
                                                                                runtimes):
    config_path, images = rebuilt
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(config_path), "--out", str(out), "--format", model_format])
    assert result.exit_code == 0, result.output
    assert "exported cells-export version 1" in result.output
    metadata = json.loads((out / "line.json").read_text())
    assert metadata["version"] == "1" and metadata["model_format"] == model_format
    assert sorted(metadata["runtimes"]) == sorted(runtimes)
    assert all(found["passed"] and found["max_rel_score_diff"] <= 1e-4 for found in metadata["runtimes"].values())
    fastest = max(runtimes, key=lambda name: metadata["runtimes"][name]["img_s"])
    assert f"the runtime scorer will use {fastest}" in result.output

    expected = mlflow.pyfunc.load_model(f"models:/{registered_model_name(LINE)}/1").predict(
        images, params={"maps": True, "all_detectors": True})
    for runtime in runtimes:
        _assert_scores_as(_score_without_torch(out, runtime, images, tmp_path), expected, metadata)


def test_export_names_what_it_cannot_do(rebuilt, tmp_path):
    from patchline.runtime import ExportedLine

    config_path, _ = rebuilt
    result = runner.invoke(app, ["export", str(config_path), "--out", str(tmp_path / "x"), "--version", "7"])
    assert result.exit_code == 2 and "line 'cells-export' has no model version '7'" in result.output
    result = runner.invoke(app, ["export", str(config_path), "--out", str(tmp_path / "x"), "--format", "tflite"])
    assert result.exit_code == 2 and "unknown export format 'tflite'; one of onnx, openvino" in result.output
    assert not (tmp_path / "x" / "model.onnx").exists()
    result = runner.invoke(app, ["export", str(config_path), "--out", str(tmp_path / "ir"), "--format", "openvino"])
    assert result.exit_code == 0, result.output
    with pytest.raises(ValueError, match="the openvino export runs on openvino, not 'onnxruntime'"):
        ExportedLine(tmp_path / "ir", runtime="onnxruntime")
    # Edited after the export (issue 35's probe): a threshold ×10 would decide every image good.
    metadata_path = tmp_path / "ir" / "line.json"
    original = metadata_path.read_text()
    edited = json.loads(original)
    edited["thresholds"] = {name: 10 * value for name, value in edited["thresholds"].items()}
    metadata_path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=r"line.json: changed since it was exported"):
        ExportedLine(tmp_path / "ir")
    metadata_path.write_text(original)
    weights = tmp_path / "ir" / "model.bin"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(b ^ 0xFF for b in raw[len(raw) // 2:len(raw) // 2 + 64])
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"model.bin: damaged or changed since it was exported"):
        ExportedLine(tmp_path / "ir")
    (tmp_path / "ir" / "model.bin").unlink()
    with pytest.raises(ValueError, match="the openvino export lacks model.bin"):
        ExportedLine(tmp_path / "ir")


def test_a_line_that_asks_for_it_scores_on_its_fastest_runtime(rebuilt, tmp_path, monkeypatch):
    """The rebuild of an `export_onnx` line carries its checked export in the MLflow model, which then scores
    on the fastest runtime that passed (or PyTorch where that was faster), and `patchline score` says which."""
    from patchline.storage.pyfunc_model import RUNTIME_VARIABLE

    config_path, images = rebuilt
    uri = f"models:/{registered_model_name(LINE)}/1"
    logged = Path(mlflow.artifacts.download_artifacts(f"{uri}", dst_path=str(tmp_path))) / "artifacts" / "export"
    metadata = json.loads((logged / "line.json").read_text())
    assert metadata["version"] is None and metadata["model_format"] == "onnx"
    passed = {name: found["img_s"] for name, found in metadata["runtimes"].items() if found["passed"]}
    assert set(passed) == {"onnxruntime", "openvino"}
    fastest = max({**passed, "torch": metadata["torch_img_s"]}.items(), key=lambda item: item[1])[0]

    model = mlflow.pyfunc.load_model(uri)
    assert model.unwrap_python_model().runtime == fastest
    monkeypatch.setenv(RUNTIME_VARIABLE, "torch")
    every = {"maps": True, "all_detectors": True}
    expected = mlflow.pyfunc.load_model(uri).predict(images, params=every)
    for runtime in passed:
        monkeypatch.setenv(RUNTIME_VARIABLE, runtime)
        on_runtime = mlflow.pyfunc.load_model(uri)
        assert on_runtime.unwrap_python_model().runtime == runtime
        _assert_scores_as(on_runtime.predict(images, params=every), expected, metadata)
    monkeypatch.setenv(RUNTIME_VARIABLE, "tensorrt")
    with pytest.raises(ValueError, match="PATCHLINE_RUNTIME=tensorrt: this model runs on torch, "):
        mlflow.pyfunc.load_model(uri)

    monkeypatch.delenv(RUNTIME_VARIABLE)
    folder = tmp_path / "cells"
    folder.mkdir()
    Image.fromarray(images[0]).save(folder / "cell.png")
    result = runner.invoke(app, ["score", str(config_path), str(folder), "--out", str(tmp_path / "scores")])
    assert result.exit_code == 0, result.output
    with (tmp_path / "scores" / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["runtime"] for row in rows] == [fastest]
    assert float(rows[0]["score"]) == pytest.approx(float(expected["score"][0]), rel=1e-4)


@pytest.mark.parametrize(("height", "width", "size"), [(300, 300, 256), (256, 256, 256), (200, 240, 256),
                                                       (256, 256, 64), (1000, 37, 64), (2, 5, 32)])
def test_the_graphs_resize_is_pytorchs_antialiased_bilinear(height, width, size):
    import torch
    import torch.nn.functional as F

    from patchline.models.images import resize_exportable

    pixels = torch.rand((1, 3, height, width), generator=torch.Generator().manual_seed(height * width))
    expected = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(resize_exportable(pixels, size), expected, rtol=0, atol=1e-6)


def test_the_graphs_median_is_pytorchs_lower_median():
    import torch

    from patchline.models.patchcore.patch_features import lower_median_by_bisection

    generator = torch.Generator().manual_seed(0)
    rows = [torch.rand((3, 196608), generator=generator),  # one image's values at 256 px
            torch.randint(0, 256, (2, 5001), generator=generator).float() / 255,  # ties
            torch.rand((2, 8), generator=generator) * 1e-3,  # below the 1/255 floor
            torch.zeros((1, 9)), torch.tensor([[0.0, 0.0, 1.0, 1.0]])]
    for values in rows:
        assert torch.equal(lower_median_by_bisection(values), values.median(dim=1).values)


def test_the_scoring_benchmark_runs_on_a_rebuilt_line(rebuilt, home, tmp_path):
    """`python -m benchmarks.scoring` as benchmarks/README.md shows it, on the tiny line's champion."""
    config_path, _ = rebuilt
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    ran = subprocess.run([sys.executable, "-m", "benchmarks.scoring", "--line", str(config_path), "--home", str(home)],
                         cwd=Path(__file__).resolve().parent.parent, env={**env, "TMPDIR": str(tmp_path)},
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0, ran.stderr[-3000:]
    summary = ran.stdout.strip().splitlines()[-1].split()
    assert summary[:3] == ["scoring", f"line={LINE}", "images=8"]
    values = dict(field.split("=") for field in summary[3:])
    assert list(values) == ["exact_img_s", "indexed_img_s", "speedup", "max_image_score_rel_diff", "auroc_exact",
                            "auroc_indexed", "onnx_img_s", "openvino_img_s"]
    assert all(float(values[key]) > 0 for key in ("exact_img_s", "indexed_img_s", "onnx_img_s", "openvino_img_s"))
    assert float(values["max_image_score_rel_diff"]) <= 1e-6 and values["auroc_exact"] == values["auroc_indexed"]


def test_a_truncated_line_json_is_named_not_a_bare_json_error(tmp_path):
    from patchline.runtime import METADATA, ExportedLine

    (tmp_path / METADATA).write_text('{"format": "patchline-exp')
    with pytest.raises(ValueError, match=r"line.json: not valid JSON .*the export is damaged"):
        ExportedLine(tmp_path)
    (tmp_path / METADATA).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"line.json: format 'list', expected"):
        ExportedLine(tmp_path)
