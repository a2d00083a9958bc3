"""Train AE, SDN (no outlier exposure) and OE-SDN on a line's good training images and compare image AUROC.

    nice python benchmarks/oesdn.py --line elpv [--epochs E] [--size S] [--set FIELD=VALUE ...] [--threads N]

Ends with one line:
    oesdn line=<line> auroc_ae=<x> auroc_sdn=<y> auroc_oesdn=<z> train_s=<t> device=<cpu|cuda>
auroc_ae is the AE-L2 residual |x − AE(x)|; AE-SSIM and top-k-mean scores are logged above it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.overrides import apply_settings  # noqa: E402
from models.detection import Detections  # noqa: E402
from models.images import pick_device  # noqa: E402
from models.oesdn_scoring import image_scores, score_autoencoder, score_oesdn  # noqa: E402
from models.oesdn_training import train_autoencoder, train_sdn  # noqa: E402
from storage.elpv import SOURCE_PREFIX, elpv_arrays, elpv_rows  # noqa: E402
from models.config import ElpvSource, OeSdnConfig  # noqa: E402
from storage.line_config import load_line  # noqa: E402

logger = logging.getLogger("benchmarks.oesdn")


def elpv_split(source: ElpvSource) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(train good images, test images, test labels 1 = anomaly) under the line's ELPV protocol."""
    images, _, _ = elpv_arrays()
    rows = elpv_rows(source)
    train = [images[int(row.source.removeprefix(SOURCE_PREFIX))] for row in rows if row.split == "train"]
    test_rows = [row for row in rows if row.split == "test" and row.label in ("good", "anomaly")]
    test = [images[int(row.source.removeprefix(SOURCE_PREFIX))] for row in test_rows]
    return train, test, np.array([row.label == "anomaly" for row in test_rows], dtype=int)


def benchmark_config(base: OeSdnConfig, epochs: int | None, size: int | None, settings: list[str]) -> OeSdnConfig:
    """The line's OE-SDN config with the command-line overrides applied and validated."""
    values = base.model_dump()
    if epochs is not None:
        values.update(epochs=epochs, sdn_epochs=epochs)
    if size is not None:
        values["image_size"] = size
    return OeSdnConfig.model_validate(apply_settings(values, settings))


def auroc(labels: np.ndarray, detections: Detections, top_k: int | None = None) -> float:
    scores = detections.scores if top_k is None else image_scores(detections.maps, top_k)
    return float(roc_auc_score(labels, scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--line", default="elpv")
    parser.add_argument("--epochs", type=int, help="epochs for the AE and for each SDN (overrides the line config)")
    parser.add_argument("--size", type=int, help="image size (overrides the line config)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override an OeSdnConfig field (YAML value), e.g. --set sdn_base_width=32 --set oe_quarter_turns=[1,3]")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads; 1 is far faster than oversubscribing cores other jobs are using")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    line = load_line(args.line)
    if not isinstance(line.source, ElpvSource):
        raise ValueError(f"line {line.name!r}: this benchmark reads the bundled ELPV set, got a {line.source.kind} source")
    config = benchmark_config(line.oesdn, args.epochs, args.size, args.set)
    device = pick_device()
    logger.info("config: %s", config.model_dump())
    train, test, labels = elpv_split(line.source)
    logger.info("%d train good, %d test good, %d test anomalies", len(train), int((labels == 0).sum()), int(labels.sum()))

    started = time.perf_counter()
    autoencoder, ae_history = train_autoencoder(train, config, device)
    logger.info("AE: %d epochs, %.0f s, best val %.4f", len(ae_history["train_loss"]),
                time.perf_counter() - started, min(ae_history.get("val_loss", [float("nan")])))
    networks = {}
    for name, oe_lambda in (("sdn", 0.0), ("oesdn", config.oe_lambda)):
        stage_started = time.perf_counter()
        networks[name], history = train_sdn(train, autoencoder, config, oe_lambda=oe_lambda, device=device)
        logger.info("%s: %d epochs, %.0f s, best val %.4f", name, len(history["train_loss"]),
                    time.perf_counter() - stage_started, min(history.get("val_loss", [float("nan")])))
    train_s = time.perf_counter() - started

    detections = {
        "ae": score_autoencoder(autoencoder, test, config, "l2"),
        "ae_ssim": score_autoencoder(autoencoder, test, config, "ssim"),
        "sdn": score_oesdn(autoencoder, networks["sdn"], test, config),
        "oesdn": score_oesdn(autoencoder, networks["oesdn"], test, config),
    }
    top_k = max(1, config.image_size**2 // 100)
    for name, found in detections.items():
        logger.info("%-8s auroc %.4f (config score), top-%d mean %.4f, max %.4f", name, auroc(labels, found),
                    top_k, auroc(labels, found, top_k), float(roc_auc_score(labels, image_scores(found.maps))))
    print(f"oesdn line={line.name} auroc_ae={auroc(labels, detections['ae']):.4f} "
          f"auroc_sdn={auroc(labels, detections['sdn']):.4f} auroc_oesdn={auroc(labels, detections['oesdn']):.4f} "
          f"train_s={train_s:.0f} device={device.type}")


if __name__ == "__main__":
    main()
