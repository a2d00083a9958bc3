"""PatchCore's bank size against accuracy and scoring cost, from a line's good training images only (issue 36).

    python -m benchmarks.bank_size --line elpv-mono [--ratios 0.01,0.025,0.05,0.1] [--limit N] [--strength 0.35]

The line's good training images are split as a rebuild splits them (`hold_out_calibration`); the fit
images' patch features (the line's PatchCore settings, `--set` overrides them) are reduced to one greedy
coreset at the largest ratio, whose first picks are the coreset of each smaller ratio (greedy k-center
picks in order). The held-out calibration goods are scored as they are and with one painted defect each
(a blob or a scratch, `benchmarks/oesdn_protocols.paint_defect` on the grey image, blended in at
`--strength`: faint defects are where a smaller bank loses), and each bank's image AUROC of good against
painted is reported with the milliseconds per image of the exact and the indexed nearest-row search
(features already extracted, 2 threads) and the largest relative difference of their image scores. The
test split is never read: a line's owner can choose the ratio from this. One line per ratio:
    bank_size line=<l> ratio=<r> rows=<m> auroc=<a> exact_ms=<e> indexed_ms=<i> max_rel_diff=<d>
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchline.storage.paths import configure_environment  # noqa: E402

configure_environment()

import torch  # noqa: E402

from benchmarks.oesdn_protocols import paint_defect  # noqa: E402
from benchmarks.overrides import apply_settings  # noqa: E402
from patchline.models.config import LineConfig  # noqa: E402
from patchline.models.patchcore.coreset import coreset_size, greedy_coreset  # noqa: E402
from patchline.models.patchcore.memory_bank import MemoryBank, PatchCoreScorer  # noqa: E402
from patchline.models.patchcore.patch_features import PatchFeatureExtractor  # noqa: E402
from patchline.models.scoring.metrics import image_auroc  # noqa: E402
from patchline.storage.ingest import build_manifest  # noqa: E402
from patchline.storage.line_config import load_line  # noqa: E402
from patchline.storage.manifest import hold_out_calibration  # noqa: E402
from patchline.storage.pixels import read_pixels  # noqa: E402

THREADS = 2
KINDS = ("blob", "scratch")


def grey(image: np.ndarray) -> np.ndarray:
    """The image as one uint8 channel (the mean of its channels), cut to a square from its top left."""
    image = image if image.ndim == 2 else image.mean(axis=2).round().astype(np.uint8)
    side = min(image.shape)
    return np.ascontiguousarray(image[:side, :side])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--line", default="elpv-mono", help="a bundled line or a line config path")
    parser.add_argument("--ratios", default="0.01,0.025,0.05,0.1", help="coreset ratios, comma-separated")
    parser.add_argument("--limit", type=int, help="use at most this many good training images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the painted defects")
    parser.add_argument("--strength", type=float, default=0.35,
                        help="share of the painted defect blended into the image (0..1)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a line setting, e.g. --set patchcore.backbone=efficientnet-lite0")
    args = parser.parse_args()
    ratios = sorted(float(ratio) for ratio in args.ratios.split(","))
    config = LineConfig.model_validate(apply_settings(load_line(args.line).model_dump(), args.set))
    torch.set_num_threads(THREADS)

    train = build_manifest(config).select("train", "good")[:args.limit]
    fit, held_out = hold_out_calibration(train, config.evaluation.calibration_fraction)
    rng = np.random.default_rng(args.seed)
    goods = [grey(read_pixels(row.source)) for row in held_out]
    painted = []
    for i, image in enumerate(goods):
        defective = paint_defect(image, KINDS[i % len(KINDS)], rng)[0].astype(np.float32)
        painted.append(np.round((1 - args.strength) * image + args.strength * defective).astype(np.uint8))
    print(f"{len(fit)} fit images, {len(goods)} held-out goods, each also with a painted defect", file=sys.stderr)

    extractor = PatchFeatureExtractor(config.patchcore, config.image_size, torch.device("cpu"))
    rows = np.concatenate(list(extractor.extract_images([read_pixels(row.source) for row in fit])))
    rows = rows.reshape(-1, rows.shape[-1])
    queries = np.concatenate(list(extractor.extract_images(goods + painted)))
    labels = np.array([False] * len(goods) + [True] * len(painted))
    picks = greedy_coreset(rows, coreset_size(len(rows), ratios[-1]),
                           projection_dim=config.patchcore.projection_dim, device=torch.device("cpu")).indices
    for ratio in ratios:
        bank = rows[np.sort(picks[:coreset_size(len(rows), ratio)])]
        scores, seconds = {}, {}
        index = MemoryBank(bank, config.patchcore, config.image_size).index
        for search in ("exact", "indexed"):
            settings = config.patchcore.model_copy(update={"search": search})
            scorer = PatchCoreScorer(MemoryBank(bank, settings, config.image_size, index), torch.device("cpu"))
            started = time.perf_counter()
            scores[search] = scorer.score(queries, extractor.grid, config.image_size).scores
            seconds[search] = time.perf_counter() - started
        per_image = {search: 1000 * value / len(queries) for search, value in seconds.items()}
        print(f"bank_size line={config.name} ratio={ratio:g} rows={len(bank)} "
              f"auroc={image_auroc(scores['exact'], labels):.4f} exact_ms={per_image['exact']:.1f} "
              f"indexed_ms={per_image['indexed']:.1f} "
              f"max_rel_diff={np.max(np.abs(scores['indexed'] - scores['exact']) / scores['exact']):.2e}")


if __name__ == "__main__":
    main()
