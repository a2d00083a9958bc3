"""Scoring a line's test split end to end: PyTorch as before issue 36 and as now, and the ONNX export
(issue 24), in one run with the same threads.

    python -m benchmarks.scoring [--line elpv-mono] [--home DIR]

Without `--home`, the line is rebuilt first under a temporary PATCHLINE_HOME (deleted afterwards); with
it, that home's champion of the line is used (rebuilt there when it has none). The champion is exported
with `patchline export`'s code, then the test images, decoded once, are scored with 2 threads, from uint8
pixels to scores, decisions and the deciding detector's 256 px map: by the MLflow model on PyTorch with
the exact nearest-row search and every detector (`exact_img_s`: the path before issue 36), with the
indexed search and only the detectors the decision reads (`indexed_img_s`: the default now), and with
the two mixes of those (stderr); and by the export on ONNX Runtime and on OpenVINO (whose graph runs
every detector and searches the whole bank). `max_image_score_rel_diff` is the largest relative
difference of a detector's image score between the first two (`score_differences`); AUROCs are the
deciding score's image AUROC. Ends with one line:
    scoring line=<l> images=<n> exact_img_s=<a> indexed_img_s=<b> speedup=<b/a> max_image_score_rel_diff=<d> auroc_exact=<x> auroc_indexed=<y> onnx_img_s=<o> openvino_img_s=<v>
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchline.storage.line_config import load_line  # noqa: E402

THREADS = 2
# (search, every detector) of the PyTorch runs: the path before issue 36 (exact, every detector), the
# default one (indexed, the detectors the decision reads), and the two steps between them.
PATHS = [("exact", True), ("indexed", False), ("exact", False), ("indexed", True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--line", default="elpv-mono", help="a bundled line or a line config path")
    parser.add_argument("--home", type=Path, help="a PATCHLINE_HOME whose champion of the line to use (kept)")
    args = parser.parse_args()
    config = load_line(args.line)
    home = args.home or Path(tempfile.mkdtemp(prefix="patchline-scoring-benchmark-"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["PATCHLINE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from patchline.storage.paths import configure_environment
    configure_environment()
    # Prefect, MLflow and torch are imported only now, so they pick up the home.
    import mlflow
    import torch

    from patchline.deployments.services import local_prefect_api
    from patchline.flows.rebuild import rebuild_product_line
    from patchline.models.scoring.metrics import image_auroc
    from patchline.models.scoring.unit_scale import scored_detectors
    from patchline.runtime import ExportedLine
    from patchline.storage.export import export_version, score_differences
    from patchline.storage.ingest import build_manifest
    from patchline.storage.model_bundle import SEARCH_VARIABLE
    from patchline.storage.pixels import read_pixels
    from patchline.storage.pyfunc_model import ALL_DETECTORS_PARAM, RUNTIME_VARIABLE
    from patchline.storage.registry import champion_version, registered_model_name
    from patchline.storage.tracking import configure_mlflow

    try:
        client = configure_mlflow()
        if champion_version(client, config.name) is None:
            print(f"rebuilding {config.name} under {home}", file=sys.stderr)
            with local_prefect_api():
                rebuild_product_line(config)
        out = home / "export" / config.name
        exported = export_version(client, config.name, out)
        print(f"exported version {exported.version} to {out}", file=sys.stderr)
        calibration = ExportedLine(out).metadata  # read now: without --home the folder is gone below
        # The protocol's test images: ELPV's ambiguous cells (defect probability 1/3, 2/3) are left out.
        test = [row for row in build_manifest(config).rows if row.split == "test" and row.label != "ambiguous"]
        images = [read_pixels(row.source) for row in test]
        is_anomaly = np.array([row.label != "good" for row in test])

        torch.set_num_threads(THREADS)
        os.environ[RUNTIME_VARIABLE] = "torch"
        expected, seconds = {}, {}
        for search, every in PATHS:
            os.environ[SEARCH_VARIABLE] = search
            model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(config.name)}/{exported.version}")
            params = {ALL_DETECTORS_PARAM: every}
            model.predict(images[:2], params=params)
            started = time.perf_counter()
            expected[search, every] = model.predict(images, params=params)
            seconds[search, every] = time.perf_counter() - started
            del model
        exports = {}
        for name in ("onnxruntime", "openvino"):
            runtime = ExportedLine(out, threads=THREADS, runtime=name)
            runtime.score(images[:2])
            started = time.perf_counter()
            exports[name] = runtime.score(images)
            seconds[name] = time.perf_counter() - started
    finally:
        if args.home is None:
            shutil.rmtree(home, ignore_errors=True)
    exact, indexed = expected["exact", True], expected["indexed", False]
    detectors = scored_detectors(indexed)
    max_rel = max(score_differences({name: indexed[f"score_{name}"] for name in detectors},
                                    {name: exact[f"score_{name}"] for name in detectors},
                                    calibration["normalisers"], calibration["fusion_weights"]).values())
    rate = {key: len(images) / value for key, value in seconds.items()}
    for search, every in PATHS:
        print(f"torch, {search} search, {'every detector' if every else 'the detectors the decision reads'}: "
              f"{rate[search, every]:.2f} images/s", file=sys.stderr)
    for name, result in exports.items():
        print(f"{name}: {len(images)} test images in {seconds[name]:.1f} s; decisions equal to the exact search's: "
              f"{bool(np.array_equal(result['decision'], exact['decision']))}", file=sys.stderr)
    print(f"scoring line={config.name} images={len(images)} exact_img_s={rate['exact', True]:.2f} "
          f"indexed_img_s={rate['indexed', False]:.2f} speedup={rate['indexed', False] / rate['exact', True]:.2f} "
          f"max_image_score_rel_diff={max_rel:.2e} auroc_exact={image_auroc(exact['score'], is_anomaly):.4f} "
          f"auroc_indexed={image_auroc(indexed['score'], is_anomaly):.4f} onnx_img_s={rate['onnxruntime']:.2f} "
          f"openvino_img_s={rate['openvino']:.2f}")


if __name__ == "__main__":
    main()
