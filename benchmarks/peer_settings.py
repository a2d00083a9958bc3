"""patchline's PatchCore on the work the public implementations were measured on (issue 10).

    nice python benchmarks/peer_settings.py --line {elpv-mono,elpv,elpv-poly} [--coreset 0.01] [--check-radius]

The same functions the nightly rebuild runs (tasks/patchcore.py: Zarr feature store, Dask coreset on a
local cluster of one thread per core, memory bank), with the peers' settings forced onto the line's
config: EfficientNet-Lite0 at 256 px, `_blocks` 4 and 10 (152 dims), coreset ratio `--coreset`, no
dimension reduction. Train = every good train image of the line (no calibration hold-out, as the
peers); test = test goods and anomalies (ambiguous cells dropped). torch uses 2 threads, as the peers.

- fit_s: images → ready scorer: extraction + store writes (extract_s), Dask cluster start + coreset
  (coreset_s), reading the bank rows back and building the scorer.
- predict_s: every test image from its pixels: backbone load, extraction, scores and 256 px anomaly maps.
- peak_rss_mb: summed RSS of this process and all its descendants during fit and predict.
- radius_ratio (--check-radius, outside the timings): the coreset's coverage radius ÷ that of an exact
  greedy of the same size on the same projected rows (same seeded projection), both in that space.

The feature store lives in a fresh temporary folder (under $PATCHLINE_HOME when set, else the system
temp dir), deleted at the end, so every run extracts from scratch. The last line printed is the result.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchline.storage.paths import configure_environment  # noqa: E402

# Before Prefect is imported (by tasks.patchcore): telemetry off, Prefect's home in the data dir.
configure_environment()

from prefect.logging import disable_run_logger  # noqa: E402

from benchmarks.rss import PeakRss  # noqa: E402
from patchline.models.config import LineConfig  # noqa: E402
from patchline.models.patchcore.coreset import greedy_coreset  # noqa: E402
from patchline.models.patchcore.detector import PatchCoreDetector  # noqa: E402
from patchline.models.scoring.metrics import image_auroc  # noqa: E402
from patchline.storage.ingest import build_manifest  # noqa: E402
from patchline.storage.line_config import load_line
from patchline.storage.manifest import ManifestRow  # noqa: E402
from patchline.storage.pixels import read_pixels  # noqa: E402
from patchline.tasks.patchcore import (SelectedCoreset, StoredFeatures, build_memory_bank_task,  # noqa: E402
                             extract_features_task, select_coreset_task)

log = logging.getLogger("peer_settings")

# (train goods, test goods + anomalies) of the split; another count means other work.
PEER_SPLITS = {"elpv": (1131, 377 + 715), "elpv-mono": (441, 147 + 313), "elpv-poly": (690, 230 + 402)}


def peer_config(line: str, coreset_ratio: float) -> LineConfig:
    """The line's config from deployments/lines/ with the peers' PatchCore settings forced onto it."""
    config = load_line(line).model_dump()
    config["image_size"] = 256
    config["patchcore"].update(backbone="efficientnet-lite0", weights_path=None, layers=(4, 10),
                               coreset_ratio=coreset_ratio, target_dim=None)
    config["evaluation"]["detectors"] = ("patchcore",)
    return LineConfig.model_validate(config)


def peer_split(config: LineConfig) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """(every good train row, test goods and anomalies), checked against the issue's counts."""
    manifest = build_manifest(config)
    train = manifest.select("train", "good")
    test = [row for row in manifest.select("test") if row.label != "ambiguous"]
    expected = PEER_SPLITS.get(config.name)
    if expected is not None and (len(train), len(test)) != expected:
        raise ValueError(f"line {config.name}: split is {len(train)} train / {len(test)} test, but the peers "
                         f"ran {expected[0]} / {expected[1]}; check the line's source settings")
    return train, test


def exact_radius_ratio(config: LineConfig, stored: StoredFeatures, train: list[ManifestRow],
                       selected: SelectedCoreset) -> float:
    """Coverage radius of the chosen coreset ÷ that of an exact greedy of the same size, both measured in
    the projected space the selection ran in (`greedy_coreset_dask`'s default seed 0, as the task uses)."""
    features = stored.open().read([row.id for row in train])
    rows = features.reshape(-1, features.shape[2])
    started = time.perf_counter()
    exact = greedy_coreset(rows, len(selected.coreset.indices), projection_dim=config.patchcore.projection_dim,
                           seed=0, device=torch.device("cpu"))
    log.info("exact greedy: radius %.4f in %.1f s (dask coreset radius %.4f)",
             exact.radius, time.perf_counter() - started, selected.coreset.radius)
    return selected.coreset.radius / exact.radius


def tree_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the Dask workers, once the cluster closes)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def load_average() -> str:
    return Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--line", required=True, choices=sorted(PEER_SPLITS))
    parser.add_argument("--coreset", type=float, default=0.01, help="coreset ratio (default 0.01, as the peers)")
    parser.add_argument("--check-radius", action="store_true",
                        help="also run an exact greedy (untimed) and print radius_ratio")
    args = parser.parse_args()
    # Prefect configures logging on import; force ours so this script's and the coreset's progress show.
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    config = peer_config(args.line, args.coreset)
    train, test = peer_split(config)
    log.info("line %s: %d train, %d test; load average %s", config.name, len(train), len(test), load_average())

    home = os.environ.get("PATCHLINE_HOME")
    root = tempfile.mkdtemp(prefix="peer-settings-", dir=home)
    try:
        with PeakRss() as memory, disable_run_logger():
            started, cpu_started = time.perf_counter(), tree_cpu_s()
            stored = extract_features_task.fn(config, train, root)
            extract_cpu_s = tree_cpu_s() - cpu_started
            log.info("extracted %d images in %.1f s (%.1f CPU s)", stored.written, stored.seconds, extract_cpu_s)
            selected = select_coreset_task.fn(config, stored, train)
            log.info("coreset of %d rows in %.1f s (%.1f CPU s, Dask workers included)", len(selected.coreset.indices),
                     selected.seconds, tree_cpu_s() - cpu_started - extract_cpu_s)
            bank = build_memory_bank_task.fn(config, stored, selected)
            detector = PatchCoreDetector(bank, device=torch.device("cpu"))
            detector.scorer  # the bank on the device, as a fitted model holds it
            fit_s, fit_cpu_s = time.perf_counter() - started, tree_cpu_s() - cpu_started

            started, cpu_started = time.perf_counter(), tree_cpu_s()
            detections = detector.score([read_pixels(row.source) for row in test])
            predict_s, predict_cpu_s = time.perf_counter() - started, tree_cpu_s() - cpu_started
        # The cores are shared with other jobs: CPU seconds depend on them far less than wall seconds do.
        log.info("fit %.1f s (%.1f CPU s), predict %.1f s (%.1f CPU s), peak RSS %.0f MB; load average %s",
                 fit_s, fit_cpu_s, predict_s, predict_cpu_s, memory.peak_mb, load_average())
        auroc = image_auroc(detections.scores, [row.label == "anomaly" for row in test])
        ratio = f"{exact_radius_ratio(config, stored, train, selected):.4f}" if args.check_radius else "na"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows, dim = bank.features.shape
    print(f"peer_settings line={config.name} coreset={args.coreset} train_n={len(train)} test_n={len(test)} "
          f"auroc={auroc:.4f} fit_s={fit_s:.1f} extract_s={stored.seconds:.1f} coreset_s={selected.seconds:.1f} "
          f"predict_s={predict_s:.1f} peak_rss_mb={memory.peak_mb:.0f} bank={rows}x{dim} radius_ratio={ratio}")


if __name__ == "__main__":
    main()
