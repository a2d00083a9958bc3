"""PatchCore throughput at the default settings (EfficientNet-Lite0, 256 px) on real ELPV cells.

extract_img_s: uint8 images → patch features (resize, backbone, aggregation), per image.
score_img_s: patch features → eq. 7 image scores and smoothed 256 px anomaly maps, per image.

The memory bank is a seeded uniform random sample of `--bank-rows` real patch features from
`--train` train images: the size a 1 % coreset of the 1,131 elpv train images gives (11,581 rows),
without depending on the coreset module. Scoring cost depends only on the bank's size and dim.

`--compare-knn` also times exact k = 1 search on the test images' patches with faiss IndexFlatL2
against the chunked torch GEMM the scorer uses (and torch.cdist), for 4,515- and 11,581-row banks.

    python benchmarks/throughput.py [--train 128] [--test 64] [--bank-rows 11581] [--compare-knn]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchline.models.config import ElpvSource, LineConfig, PatchCoreConfig  # noqa: E402
from patchline.models.images import pick_device  # noqa: E402
from patchline.models.patchcore.memory_bank import MemoryBank, PatchCoreScorer  # noqa: E402
from patchline.models.patchcore.patch_features import PatchFeatureExtractor  # noqa: E402
from patchline.storage.sources.elpv import SOURCE_PREFIX, elpv_arrays, elpv_rows  # noqa: E402

T = TypeVar("T")


def elpv_split(train_count: int, test_count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `train_count` train normals and a seeded mix of `test_count` test cells (elpv protocol)."""
    rows = elpv_rows(ElpvSource())
    index = {split: [int(r.source.removeprefix(SOURCE_PREFIX)) for r in rows
                     if r.split == "test" and r.label == split] for split in ("good", "anomaly")}
    train = [int(r.source.removeprefix(SOURCE_PREFIX)) for r in rows if r.split == "train"]
    test = np.random.default_rng(0).permutation(index["good"] + index["anomaly"])
    return np.asarray(train[:train_count]), test[:test_count]


def extract_all(extractor: PatchFeatureExtractor, images: np.ndarray) -> np.ndarray:
    return np.concatenate(list(extractor.extract_images(images, progress=False)))


def timed(run: Callable[[], T]) -> tuple[T, float, float]:
    """run()'s result, wall seconds and CPU seconds of this process (all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def compare_knn(queries: np.ndarray, patches: np.ndarray, sizes: tuple[int, ...]) -> None:
    """Time exact k = 1 search: faiss, the scorer's tiled GEMM, one GEMM per query chunk, torch.cdist."""
    import faiss

    rng = np.random.default_rng(1)
    query_tensor = torch.from_numpy(queries)
    print(f"knn: {len(queries):,} queries x D={queries.shape[1]}, torch threads {torch.get_num_threads()}, "
          f"faiss threads {faiss.omp_get_max_threads()}")
    for rows in sizes:
        bank = patches[rng.choice(len(patches), rows, replace=False)]
        scorer = PatchCoreScorer(MemoryBank(bank, PatchCoreConfig(), 256), torch.device("cpu"))
        bank_tensor = torch.from_numpy(bank)

        def faiss_flat() -> np.ndarray:
            index = faiss.IndexFlatL2(bank.shape[1])
            index.add(bank)
            return np.sqrt(np.maximum(index.search(queries, 1)[0][:, 0], 0))

        def gemm_per_chunk() -> np.ndarray:
            sq_norms = (bank_tensor * bank_tensor).sum(1)
            with torch.inference_mode():
                partial = [torch.addmm(sq_norms, q, bank_tensor.T, alpha=-2.0).amin(1) + (q * q).sum(1)
                           for q in query_tensor.split(1024)]
            return torch.cat(partial).clamp_min_(0).sqrt_().numpy()

        def cdist() -> np.ndarray:
            with torch.inference_mode():
                return torch.cat([torch.cdist(q, bank_tensor).amin(1) for q in query_tensor.split(1024)]).numpy()

        methods = {"faiss IndexFlatL2": faiss_flat, "torch tiled GEMM (scorer)": lambda: scorer.patch_distances(
            query_tensor).numpy(), "torch GEMM 1024 x bank": gemm_per_chunk, "torch cdist 1024 x bank": cdist}
        reference = None
        for name, method in methods.items():
            distances, seconds, cpu_seconds = timed(method)
            reference = distances if reference is None else reference
            print(f"knn bank={rows} {name}: {seconds:.2f} s ({cpu_seconds:.2f} CPU s) = "
                  f"{len(queries) / seconds:,.0f} queries/s, max |d - faiss| {np.abs(distances - reference).max():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=128, help="train images whose patches the bank samples")
    parser.add_argument("--test", type=int, default=64, help="test images timed")
    parser.add_argument("--bank-rows", type=int, default=11581)
    parser.add_argument("--compare-knn", action="store_true")
    args = parser.parse_args()

    config = LineConfig(name="throughput", source={"kind": "elpv"})
    images = elpv_arrays()[0]
    train, test = elpv_split(args.train, args.test)
    device = pick_device()
    extractor = PatchFeatureExtractor(config.patchcore, config.image_size, device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {config.patchcore.batch_size}, "
          f"grid {extractor.grid}, dim {extractor.dim}")

    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    extract_all(extractor, images[test[: config.patchcore.batch_size]])  # warm-up
    test_features, extract_s, extract_cpu_s = timed(lambda: extract_all(extractor, images[test]))

    train_patches = extract_all(extractor, images[train]).reshape(-1, extractor.dim)
    rng = np.random.default_rng(0)
    bank = train_patches[rng.choice(len(train_patches), args.bank_rows, replace=False)]
    print(f"bank: {args.bank_rows} x {extractor.dim} random real patches of {len(train_patches):,} "
          f"from {len(train)} train images")
    scorer = PatchCoreScorer(MemoryBank(bank, config.patchcore, config.image_size), device)
    scorer.score(test_features[:2], extractor.grid, config.image_size)  # warm-up
    batch = config.patchcore.batch_size
    _, score_s, score_cpu_s = timed(lambda: [scorer.score(test_features[first:first + batch], extractor.grid,
                                                          config.image_size)
                                             for first in range(0, len(test_features), batch)])

    if args.compare_knn:
        compare_knn(test_features.reshape(-1, extractor.dim), train_patches, (4515, args.bank_rows))
    # CPU seconds separate this work's cost from other processes' load on a shared machine: images per
    # CPU-second times the cores bounds the rate an otherwise idle machine reaches.
    print(f"load average after: {os.getloadavg()[0]:.2f}; extract {len(test)} images in {extract_s:.2f} s "
          f"({extract_cpu_s:.2f} CPU s), score in {score_s:.2f} s ({score_cpu_s:.2f} CPU s)")
    print(f"throughput device={device.type} extract_img_s={len(test) / extract_s:.2f} "
          f"score_img_s={len(test) / score_s:.2f}")


if __name__ == "__main__":
    main()
