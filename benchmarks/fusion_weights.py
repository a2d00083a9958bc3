"""How image AUROC moves with the weight of mean darkness in the fused score, and whether choosing it on
the test split overfits (issue 7).

    nice python benchmarks/fusion_weights.py [--line elpv] [--weights 0,0.25,0.5,1]

Runs the rebuild's own ingest and PatchCore tasks (feature store, Dask coreset, bank, scoring) and the
darkness task on the line's bundled config, in a Prefect flow under a fresh temporary PATCHLINE_HOME
(deleted afterwards); OE-SDN and the AE are not trained: they weigh 0 in the bundled fusion. Scored:
the held-out calibration goods, the test split and the ambiguous (1/3, 2/3 probability) cells.

For each darkness weight w (PatchCore 1), fused = (PatchCore + w · darkness) / (1 + w) on scores
median/MAD-normalised with the calibration goods, as a rebuild fuses. Printed per weight: image AUROC
on the test split (and its mono / poly subsets), and outside the protocol the 1/3- and the
2/3-probability cells each against the calibration goods. Then a cross-validated estimate of picking
w on the test split: pick the best w on one stratified half, measure it on the other, both ways, over
20 random halvings.
Ends with one line:
    fusion line=<l> best_w=<w> auroc=<a> auroc_w0=<a0> cv_auroc=<mean> cv_sd=<sd> cv_picks=<w:count,...>
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchline.storage.line_config import load_line  # noqa: E402

HALVINGS = 20


def _auroc_table(fused: dict[float, dict[str, np.ndarray]], test_labels: np.ndarray, cell_types: np.ndarray,
                 ambiguous_levels: np.ndarray) -> None:
    from patchline.models.scoring.metrics import image_auroc

    for weight, scores in fused.items():
        test, goods = scores["test"], scores["calibration"]
        subsets = [f"{kind}={image_auroc(test[cell_types == kind], test_labels[cell_types == kind]):.4f}"
                   for kind in ("mono", "poly") if len(set(test_labels[cell_types == kind])) == 2]
        # Outside the protocol: ambiguous cells of one probability level against the calibration goods.
        for level in (1, 2):
            cells = scores["ambiguous"][ambiguous_levels == level]
            if len(cells):
                labels = np.r_[np.zeros(len(goods), bool), np.ones(len(cells), bool)]
                subsets.append(f"p{level}/3_vs_calibration={image_auroc(np.r_[goods, cells], labels):.4f}")
        print(f"w={weight:<6g} test={image_auroc(test, test_labels):.4f} " + " ".join(subsets), flush=True)


def _cross_validated(fused: dict[float, np.ndarray], labels: np.ndarray) -> tuple[list[float], list[float]]:
    """(AUROC on the other half, weight picked) for each half of HALVINGS stratified random halvings."""
    from patchline.models.scoring.metrics import image_auroc

    rng = np.random.default_rng(0)
    estimates, picks = [], []
    for _ in range(HALVINGS):
        half = np.zeros(len(labels), bool)
        for value in (True, False):
            members = rng.permutation(np.flatnonzero(labels == value))
            half[members[: len(members) // 2]] = True
        for chosen, held in ((half, ~half), (~half, half)):
            weight = max(fused, key=lambda w: image_auroc(fused[w][chosen], labels[chosen]))
            picks.append(weight)
            estimates.append(image_auroc(fused[weight][held], labels[held]))
    return estimates, picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--line", default="elpv", help="bundled ELPV line (elpv, elpv-mono, elpv-poly) or a config path")
    parser.add_argument("--weights", default="0,0.125,0.25,0.375,0.5,0.75,1,1.5",
                        help="comma-separated darkness weights to try (PatchCore weighs 1)")
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    config = load_line(args.line)
    if config.source.kind != "elpv":
        raise SystemExit(f"line {config.name!r} reads a {config.source.kind} source; this benchmark is for ELPV lines")
    if not {"patchcore", "darkness"} <= set(config.evaluation.detectors):
        raise SystemExit(f"line {config.name!r} must enable patchcore and darkness in evaluation.detectors, "
                         f"has {list(config.evaluation.detectors)}")

    home = Path(tempfile.mkdtemp(prefix="patchline-fusion-benchmark-"))
    os.environ["PATCHLINE_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from patchline.storage.paths import configure_environment
    configure_environment()
    # Prefect is imported only now, so it picks up the temporary home.
    from prefect import flow

    from patchline.models.scoring.metrics import fit_fusion_normalisers, fuse_scores, image_auroc
    from patchline.storage.sources.elpv import SOURCE_PREFIX, elpv_arrays
    from patchline.models.darkness import DarknessDetector
    from patchline.tasks.detectors import score_detector_task
    from patchline.tasks.ingest import ingest_line
    from patchline.tasks.patchcore import build_memory_bank_task, extract_features_task, score_patchcore_task, select_coreset_task

    @flow(name="fusion-weight-study")
    def study() -> dict[str, dict[str, np.ndarray]]:
        data = ingest_line(config)
        ambiguous = [r for r in data.test if r.label == "ambiguous"]
        test = [r for r in data.test if r.label != "ambiguous"]
        stored = extract_features_task(config, data.manifest.rows)
        bank = build_memory_bank_task(config, stored, select_coreset_task(config, stored, data.fit))
        groups = {"calibration": data.calibration, "test": test, "ambiguous": ambiguous}
        scores = {name: {"patchcore": score_patchcore_task(stored, bank, rows).scores,
                         "darkness": score_detector_task("darkness", DarknessDetector(config.image_size), rows).scores}
                  for name, rows in groups.items()}
        _, levels, types = elpv_arrays()
        position = {name: np.array([int(r.source[len(SOURCE_PREFIX):]) for r in rows]) for name, rows in groups.items()}
        scores["meta"] = {"test_labels": np.array([r.label == "anomaly" for r in test]),
                          "test_types": types[position["test"]], "ambiguous_levels": levels[position["ambiguous"]]}
        return scores

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    try:
        scores = study()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    meta = scores.pop("meta")
    normalisers = fit_fusion_normalisers(scores["calibration"])
    fused = {w: {name: fuse_scores(by_detector, normalisers, {"patchcore": 1.0, "darkness": w})
                 for name, by_detector in scores.items()} for w in weights}
    labels = meta["test_labels"]
    _auroc_table(fused, labels, meta["test_types"], meta["ambiguous_levels"])
    test_fused = {w: by_group["test"] for w, by_group in fused.items()}
    best = max(weights, key=lambda w: image_auroc(test_fused[w], labels))
    estimates, picks = _cross_validated(test_fused, labels)
    counts = ",".join(f"{w:g}:{picks.count(w)}" for w in weights if picks.count(w))
    base = image_auroc(test_fused[0.0], labels) if 0.0 in test_fused else float("nan")
    print(f"fusion line={config.name} best_w={best:g} auroc={image_auroc(test_fused[best], labels):.4f} "
          f"auroc_w0={base:.4f} cv_auroc={np.mean(estimates):.4f} cv_sd={np.std(estimates):.4f} cv_picks={counts}")


if __name__ == "__main__":
    main()
