"""An ELPV line gaining good images: incremental rebuild against a full one, and a nightly on unchanged data (issue 23).

    nice python -m benchmarks.incremental [--line elpv] [--new-share 0.1] [--keep]

Under a fresh temporary PATCHLINE_HOME (deleted afterwards), with the line's bundled config:
1. the line is rebuilt with `--new-share` of its train normals held back (`source.train_share`): v1;
2. the held-back images are added and the line rebuilt as the nightly does: the champion's bank grown by
   the new images' patches, the networks trained on all the fit images (`incremental_s`);
3. the same data is rebuilt from nothing (`--force --full`: `full_s`); the new images' features are
   already in the store by then, so `full_s` leaves out their extraction, which `incremental_s` includes;
4. the line is rebuilt once more on unchanged data, which the nightly skips (`skip_s`).
Then, untimed: the coverage radius of each bank over every fit patch (in the projected space the
coreset selects in), and their ratio `radius_ratio` = incremental ÷ full. AUROCs are image AUROC on the
line's test split, for PatchCore (`auroc_*`) and, on the lines before it, every detector; the networks of
the two rebuilds are compared by their bundle digests (`networks=identical` or `networks=differ`).

Ends with one line:
    incremental line=<l> full_s=<s> incremental_s=<s> radius_ratio=<r> auroc_full=<a> auroc_incremental=<b> skip_s=<s>
        networks=<identical|differ>
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchline.models.config import LineConfig  # noqa: E402
from patchline.storage.line_config import load_line  # noqa: E402

def with_train_share(config: LineConfig, share: float) -> LineConfig:
    if config.source.kind != "elpv":
        raise ValueError(f"line {config.name!r} reads a {config.source.kind} source; this benchmark is for ELPV lines")
    return config.model_copy(update={"source": config.source.model_copy(update={"train_share": share})})


def bank_radius(config: LineConfig, version: str) -> float:
    """Coverage radius of version `version`'s bank over every fit patch of `config`, as the coreset measures it."""
    import dask.array as da
    import mlflow
    import numpy as np

    from patchline.models.patchcore.coreset import coverage_radius_dask
    from patchline.storage.dask_cluster import dask_client
    from patchline.storage.feature_store import FeatureStore
    from patchline.storage.ingest import build_manifest
    from patchline.storage.manifest import hold_out_calibration
    from patchline.storage.registry import registered_model_name
    from patchline.tasks.patchcore import feature_key, feature_root

    model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(config.name)}/{version}")
    bank = model.unwrap_python_model().detector.detectors["patchcore"].bank.features
    goods = build_manifest(config).select("train", "good")
    fit, _ = hold_out_calibration(goods, config.evaluation.calibration_fraction)
    stored = FeatureStore.open(feature_root(), config.name, feature_key(config), read_only=True).as_dask_array(
        [row.id for row in fit])
    patches = stored.reshape(-1, stored.shape[2])
    rows = da.concatenate([patches, da.from_array(bank, chunks=(65536, bank.shape[1]))])
    with dask_client(config.dask_address):
        return coverage_radius_dask(rows, np.arange(patches.shape[0], rows.shape[0]),
                                    projection_dim=config.patchcore.projection_dim)


def same_networks(config: LineConfig, versions: tuple[str, str]) -> bool:
    """Whether two versions' networks (every enabled AE and SDN) hold equal weights."""
    import mlflow
    import torch

    from patchline.storage.registry import registered_model_name

    networks = []
    for version in versions:
        detectors = mlflow.pyfunc.load_model(f"models:/{registered_model_name(config.name)}/{version}"
                                             ).unwrap_python_model().detector.detectors
        networks.append([module.state_dict() for name in ("ae", "oesdn") if name in detectors
                         for module in (getattr(detectors[name], "autoencoder", None), getattr(detectors[name], "sdn", None))
                         if module is not None])
    return all(a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a) for a, b in zip(*networks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--line", default="elpv", help="bundled ELPV line (elpv, elpv-mono, elpv-poly) or a config path")
    parser.add_argument("--new-share", type=float, default=0.1,
                        help="share of the train normals held back, then added (default 0.1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary PATCHLINE_HOME and print its path")
    args = parser.parse_args()
    if not 0 < args.new_share < 1:
        parser.error(f"--new-share must lie in (0, 1), got {args.new_share}")
    config = load_line(args.line)
    before, after = with_train_share(config, 1 - args.new_share), with_train_share(config, 1.0)

    home = Path(tempfile.mkdtemp(prefix="patchline-incremental-benchmark-"))
    os.environ["PATCHLINE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from patchline.storage.paths import configure_environment
    configure_environment()
    # Prefect and the flow are imported only now, so they pick up the temporary home.
    from patchline.flows.rebuild import rebuild_product_line
    from patchline.tasks.outcome import RebuildResult

    # Prefect has configured logging by now, so progress goes to stderr as plain lines.
    print(f"line {config.name}, {100 * args.new_share:.0f}% of its train normals added after v1, "
          f"PATCHLINE_HOME {home}", file=sys.stderr)

    def timed(label: str, **options) -> tuple[RebuildResult, float]:
        started = time.perf_counter()
        result = rebuild_product_line(before if label == "v1" else after, **options)
        seconds = time.perf_counter() - started
        print(f"{label}: {seconds:.1f} s, version {result.version}, reuse {result.reuse}", file=sys.stderr)
        return result, seconds

    try:
        timed("v1")
        incremental, incremental_s = timed("incremental")
        full, full_s = timed("full", force=True, full=True)
        skipped, skip_s = timed("skip")
        if not skipped.skipped or not incremental.reuse["rebuild"].startswith("incremental"):
            raise RuntimeError(f"expected an incremental rebuild and a skip, got {incremental.reuse} and "
                               f"{skipped.reason}")
        radii = {name: bank_radius(after, result.version) for name, result in (("incremental", incremental),
                                                                                     ("full", full))}
        identical = same_networks(after, (incremental.version, full.version))
    finally:
        if args.keep:
            print(f"kept {home}", file=sys.stderr)
        else:
            shutil.rmtree(home, ignore_errors=True)
    for name, result in (("full", full), ("incremental", incremental)):
        print(f"{name}: radius {radii[name]:.4f}, image AUROC " + ", ".join(
            f"{detector} {value:.4f}" for detector, value in result.image_auroc.items()))
    print(f"incremental line={config.name} full_s={full_s:.1f} incremental_s={incremental_s:.1f} "
          f"radius_ratio={radii['incremental'] / radii['full']:.4f} "
          f"auroc_full={full.image_auroc['patchcore']:.4f} "
          f"auroc_incremental={incremental.image_auroc['patchcore']:.4f} skip_s={skip_s:.1f} "
          f"networks={'identical' if identical else 'differ'}")


if __name__ == "__main__":
    main()
