"""The GPU paths on one ELPV line: do they agree with the CPU, and how fast are they. Needs a CUDA device.

    python benchmarks/gpu_check.py [--line elpv-mono] [--parity-images 16]

The models of a rebuild, without Prefect, MLflow or the Zarr store, on the line's bundled config and
the rebuild's split (train goods minus the held-out calibration goods fit the models; AUROC on the test
split, as benchmarks/elpv.py):
1. parity: the first `--parity-images` fit cells through the PatchCore extractor on the CPU (float32)
   and on CUDA (bf16 autocast); the exact greedy coreset of the CPU features on both devices.
2. PatchCore on CUDA: features of the fit and test cells, the coreset at the line's ratio by the
   nightly's Dask selection (CPU threads) and by the exact greedy on the GPU; each bank scores the
   test cells on the GPU.
3. AE and OE-SDN trained and scored on CUDA with the line's settings.
Ends with one line:
    cuda line=<l> gpu=<name> feature_cos_min=<c> feature_rel_err=<e> coreset_agree=<f>
        auroc_patchcore=<a> auroc_patchcore_exact=<a> auroc_oesdn=<a> auroc_ae=<a> extract_img_s=<x>
        coreset_dask_s=<s> coreset_exact_s=<s> score_img_s=<x> oesdn_train_s=<s>
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

from benchmarks.throughput import extract_all  # noqa: E402
from patchline.models.config import ElpvSource, LineConfig  # noqa: E402
from patchline.models.oesdn.scoring import score_autoencoder, score_oesdn  # noqa: E402
from patchline.models.oesdn.training import train_autoencoder, train_sdn  # noqa: E402
from patchline.models.patchcore.coreset import coreset_size, greedy_coreset, greedy_coreset_dask  # noqa: E402
from patchline.models.patchcore.memory_bank import MemoryBank, PatchCoreScorer  # noqa: E402
from patchline.models.patchcore.patch_features import PatchFeatureExtractor  # noqa: E402
from patchline.models.scoring.metrics import image_auroc  # noqa: E402
from patchline.storage.line_config import load_line  # noqa: E402
from patchline.storage.manifest import hold_out_calibration  # noqa: E402
from patchline.storage.sources.elpv import SOURCE_PREFIX, elpv_arrays, elpv_rows  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def line_split(config: LineConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit images, test images, test labels 1 = anomaly) as a rebuild of the line splits them."""
    if not isinstance(config.source, ElpvSource):
        raise ValueError(f"line {config.name!r} reads a {config.source.kind} source; this benchmark is for ELPV lines")
    images = elpv_arrays()[0]
    rows = elpv_rows(config.source)
    fit, _ = hold_out_calibration([r for r in rows if r.split == "train"], config.evaluation.calibration_fraction)
    test = [r for r in rows if r.split == "test" and r.label in ("good", "anomaly")]

    def pixels(chosen: list) -> np.ndarray:
        return images[[int(r.source.removeprefix(SOURCE_PREFIX)) for r in chosen]]

    return pixels(fit), pixels(test), np.array([r.label == "anomaly" for r in test], dtype=int)


def timed(run):
    """run()'s result and its wall seconds, with the GPU's queued work finished inside the timing."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = run()
    torch.cuda.synchronize()
    return result, time.perf_counter() - started


def parity(config: LineConfig, images: np.ndarray) -> tuple[float, float, float]:
    """(lowest cosine of CPU vs CUDA patch features, largest |Δ| / largest |feature|, share of equal coreset picks)."""
    on_cpu, on_cuda = (extract_all(PatchFeatureExtractor(config.patchcore, config.image_size, device), images)
                       for device in (CPU, CUDA))
    on_cpu, on_cuda = on_cpu.reshape(-1, on_cpu.shape[-1]), on_cuda.reshape(-1, on_cuda.shape[-1])
    cosine = (on_cpu * on_cuda).sum(1) / (np.linalg.norm(on_cpu, axis=1) * np.linalg.norm(on_cuda, axis=1) + 1e-12)
    relative = float(np.abs(on_cpu - on_cuda).max() / np.abs(on_cpu).max())
    size = coreset_size(len(on_cpu), config.patchcore.coreset_ratio)
    picks = [greedy_coreset(on_cpu, size, projection_dim=config.patchcore.projection_dim, device=device).indices
             for device in (CPU, CUDA)]
    return float(cosine.min()), relative, float(np.mean(picks[0] == picks[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--line", default="elpv-mono", help="bundled ELPV line or a config path")
    parser.add_argument("--parity-images", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_check.py needs a CUDA device; torch sees none")
    config = load_line(args.line)
    fit, test, labels = line_split(config)
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    print(f"{config.name}: {len(fit)} fit, {int((labels == 0).sum())} good + {int(labels.sum())} anomalous test "
          f"cells on {gpu}; torch {torch.__version__}")

    cos_min, rel_err, agree = parity(config, fit[:args.parity_images])
    print(f"parity on {args.parity_images} cells: cosine min {cos_min:.5f}, max |Δ| {rel_err:.2e} of the largest "
          f"feature, coreset picks equal {agree:.3f}")

    extractor = PatchFeatureExtractor(config.patchcore, config.image_size, CUDA)
    extract_all(extractor, fit[:config.patchcore.batch_size])  # warm-up: cuDNN picks its kernels
    (fit_features, test_features), extract_s = timed(lambda: (extract_all(extractor, fit), extract_all(extractor, test)))
    patches = fit_features.reshape(-1, extractor.dim)
    size = coreset_size(len(patches), config.patchcore.coreset_ratio)
    chunks = (max(1, len(patches) // 16), -1)
    dask_coreset, dask_s = timed(lambda: greedy_coreset_dask(
        da.from_array(patches, chunks=chunks), size, projection_dim=config.patchcore.projection_dim))
    exact_coreset, exact_s = timed(lambda: greedy_coreset(
        patches, size, projection_dim=config.patchcore.projection_dim, device=CUDA))
    print(f"coreset {size} of {len(patches):,} patches: dask {dask_s:.1f} s radius {dask_coreset.radius:.4f}, "
          f"exact on GPU {exact_s:.1f} s radius {exact_coreset.radius:.4f}")
    auroc = {}
    for name, coreset in (("dask", dask_coreset), ("exact", exact_coreset)):
        scorer = PatchCoreScorer(MemoryBank(patches[np.sort(coreset.indices)], config.patchcore, config.image_size),
                                 CUDA)
        found, score_s = timed(lambda: scorer.score(test_features, extractor.grid, config.image_size))
        auroc[name] = image_auroc(found.scores, labels)

    (autoencoder, _), ae_s = timed(lambda: train_autoencoder(fit, config.oesdn, CUDA))
    (sdn, _), sdn_s = timed(lambda: train_sdn(fit, autoencoder, config.oesdn, device=CUDA))
    auroc_ae = image_auroc(score_autoencoder(autoencoder, test, config.oesdn).scores, labels)
    auroc_oesdn = image_auroc(score_oesdn(autoencoder, sdn, test, config.oesdn).scores, labels)
    print(f"cuda line={config.name} gpu={gpu} feature_cos_min={cos_min:.5f} feature_rel_err={rel_err:.2e} "
          f"coreset_agree={agree:.3f} auroc_patchcore={auroc['dask']:.4f} auroc_patchcore_exact={auroc['exact']:.4f} "
          f"auroc_oesdn={auroc_oesdn:.4f} auroc_ae={auroc_ae:.4f} "
          f"extract_img_s={(len(fit) + len(test)) / extract_s:.1f} coreset_dask_s={dask_s:.1f} "
          f"coreset_exact_s={exact_s:.1f} score_img_s={len(test) / score_s:.1f} oesdn_train_s={ae_s + sdn_s:.1f}")


if __name__ == "__main__":
    main()
