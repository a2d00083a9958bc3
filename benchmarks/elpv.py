"""The full nightly rebuild of an ELPV line on the published protocol, and its image AUROC per detector (issue 7).

    nice python benchmarks/elpv.py [--line elpv] [--detectors patchcore,oesdn,ae] [--set FIELD=VALUE ...]

Runs `patchline.flows.rebuild.rebuild_product_line` (the flow `patchline rebuild` and the nightly run: ingest,
Zarr feature store, Dask coreset, AE/SDN training, evaluation, MLflow logging, registry gate) on the
line's bundled config, under a fresh temporary PATCHLINE_HOME that is deleted afterwards, so the
user's registry and champions are never touched and every run starts from nothing.

Protocol (storage/elpv.py): normal = defect probability 0, anomaly = probability 1, normals split 3:1
with seed 42 (elpv: 1,131 train, 377 good + 715 defective test); 10 % of the train goods are held
out of the fit for calibration (thresholds, fusion). AUROC is image-level on the test split.

`--set` overrides a field of the line config, dotted into sections, e.g.
`--set patchcore.backbone=efficientnet-lite2 --set image_size=320`: the sweep in benchmarks/README.md.
Ends with one line:
    <line> auroc_patchcore=<a> auroc_oesdn=<b> auroc_ae=<c> auroc_fused=<d> best=<name>
(`na` for a detector that was not run).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.overrides import apply_settings  # noqa: E402
from patchline.models.config import LineConfig  # noqa: E402
from patchline.storage.line_config import load_line  # noqa: E402

log = logging.getLogger("benchmarks.elpv")
REPORTED = ("patchcore", "oesdn", "ae", "fused")


def benchmark_config(line: str, detectors: str | None, settings: list[str]) -> LineConfig:
    """The bundled line config with `--detectors` and `--set` applied and validated."""
    values = load_line(line).model_dump()
    if detectors:
        values["evaluation"]["detectors"] = tuple(name.strip() for name in detectors.split(","))
    config = LineConfig.model_validate(apply_settings(values, settings))
    if config.source.kind != "elpv":
        raise ValueError(f"line {config.name!r} reads a {config.source.kind} source; this benchmark is for ELPV lines")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--line", default="elpv", help="bundled ELPV line (elpv, elpv-mono, elpv-poly) or a config path")
    parser.add_argument("--detectors", help="comma-separated subset of patchcore,oesdn,ae (default: the line's)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a line-config field (YAML value), e.g. --set patchcore.layers=[3,5]")
    parser.add_argument("--keep", action="store_true", help="keep the temporary PATCHLINE_HOME and print its path")
    args = parser.parse_args()
    config = benchmark_config(args.line, args.detectors, args.set)

    home = Path(tempfile.mkdtemp(prefix="patchline-elpv-benchmark-"))
    os.environ["PATCHLINE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from patchline.storage.paths import configure_environment
    configure_environment()
    # Prefect and the flow are imported only now, so they pick up the temporary home.
    from patchline.flows.rebuild import rebuild_product_line

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    log.info("line %s, overrides %s, PATCHLINE_HOME %s", config.name, args.set or "none", home)
    started = time.perf_counter()
    try:
        result = rebuild_product_line(config)
    finally:
        if args.keep:
            log.info("kept %s", home)
        else:
            shutil.rmtree(home, ignore_errors=True)
    aurocs = result.image_auroc
    best = max(aurocs, key=aurocs.get)
    log.info("rebuild of %s took %.1f s; AUROC %s", config.name, time.perf_counter() - started, aurocs)
    print(f"{config.name} " + " ".join(f"auroc_{name}={aurocs[name]:.4f}" if name in aurocs else f"auroc_{name}=na"
                                       for name in REPORTED) + f" best={best}")


if __name__ == "__main__":
    main()
