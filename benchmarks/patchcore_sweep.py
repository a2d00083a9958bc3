"""PatchCore image AUROC for one backbone / image size / layer set and several coreset ratios (issue 7 sweep).

    nice python benchmarks/patchcore_sweep.py --line elpv-poly --backbone efficientnet-lite2 [--size 256]
        [--layers 6,14] [--ratios 0.01,0.1]

The work of benchmarks/peer_settings.py (every good train image of the line in the fit, test goods and
anomalies, image AUROC from the raw image scores) with the PatchCore settings given here: the
features of train and test images are extracted once (patchline.models.patchcore.patch_features),
then for each ratio the Dask coreset (patchline.models.patchcore.coreset.greedy_coreset_dask, the
nightly's) builds a bank that scores the test features (patchline.models.patchcore.memory_bank).
Features stay in memory: this is for comparing settings, not for timing the pipeline. One line per ratio:
    sweep line=<l> backbone=<b> size=<s> layers=<l> ratio=<r> dim=<d> auroc=<a> extract_s=<s> fit_score_s=<s>
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchline.storage.paths import configure_environment  # noqa: E402

configure_environment()

from benchmarks.peer_settings import PEER_SPLITS, peer_config, peer_split  # noqa: E402
from patchline.models.config import LineConfig  # noqa: E402
from patchline.models.patchcore.backbones import DEFAULT_LAYERS  # noqa: E402
from patchline.models.patchcore.coreset import coreset_size, greedy_coreset_dask  # noqa: E402
from patchline.models.patchcore.memory_bank import MemoryBank, PatchCoreScorer  # noqa: E402
from patchline.models.patchcore.patch_features import PatchFeatureExtractor  # noqa: E402
from patchline.models.scoring.metrics import image_auroc  # noqa: E402
from patchline.storage.dask_cluster import dask_client  # noqa: E402
from patchline.storage.pixels import read_pixels  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--line", required=True, choices=sorted(PEER_SPLITS))
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--size", type=int, default=256, help="image size in px (multiple of 32)")
    parser.add_argument("--layers", default=None, help="comma-separated stage indices (default: the backbone's)")
    parser.add_argument("--ratios", default="0.01", help="comma-separated coreset ratios")
    args = parser.parse_args()
    torch.set_num_threads(2)
    values = peer_config(args.line, 0.01).model_dump()
    values["image_size"] = args.size
    values["patchcore"].update(backbone=args.backbone,
                               layers=None if args.layers is None else [int(x) for x in args.layers.split(",")])
    config = LineConfig.model_validate(values)
    train, test = peer_split(config)
    labels = [row.label == "anomaly" for row in test]
    layers = ",".join(map(str, config.patchcore.layers or DEFAULT_LAYERS[config.patchcore.backbone]))
    extractor = PatchFeatureExtractor(config.patchcore, config.image_size, device=torch.device("cpu"))
    started = time.perf_counter()
    train_features = np.concatenate(list(extractor.extract_images([read_pixels(r.source) for r in train])))
    test_features = np.concatenate(list(extractor.extract_images([read_pixels(r.source) for r in test])))
    extract_s = time.perf_counter() - started
    rows = train_features.reshape(-1, extractor.dim)
    with dask_client():
        for ratio in (float(r) for r in args.ratios.split(",")):
            started = time.perf_counter()
            coreset = greedy_coreset_dask(da.from_array(rows, chunks=(1 << 16, rows.shape[1])),
                                          coreset_size(len(rows), ratio), projection_dim=config.patchcore.projection_dim)
            bank = MemoryBank(rows[np.sort(coreset.indices)], config.patchcore, config.image_size)
            detections = PatchCoreScorer(bank, device=torch.device("cpu")).score(test_features, extractor.grid,
                                                                                  config.image_size)
            print(f"sweep line={config.name} backbone={args.backbone} size={args.size} layers={layers} ratio={ratio} "
                  f"dim={extractor.dim} auroc={image_auroc(detections.scores, labels):.4f} extract_s={extract_s:.0f} "
                  f"fit_score_s={time.perf_counter() - started:.0f}", flush=True)


if __name__ == "__main__":
    main()
