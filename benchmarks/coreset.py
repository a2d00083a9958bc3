"""Exact greedy k-center vs the Dask-partitioned greedy, on data written through the real feature store.

    python benchmarks/coreset.py --n 200000 --dim 1024 --ratio 0.1 --data clustered
    python benchmarks/coreset.py --n 200000 --ratio 0.1 --data elpv

`clustered`: a seeded Gaussian mixture of n/500 clusters with log-normal sizes, each a random
4..32-dimensional subspace with its own spread (20x range) plus isotropic noise, rows shuffled.
`elpv`: real patch features (EfficientNet-Lite0 blocks 4 + 10, 256 px, dim 152) of the first
elpv train normals, 1,024 patches per image, truncated to n rows.

Both selections read the rows back from the store: exact_s = read into memory + exact greedy;
dask_s = the Dask coreset straight from the store on a local cluster, one thread per core
(cluster start-up excluded, as a nightly run reuses one). radius_ratio and random_radius_ratio are
coverage radii in the full (unprojected) space, measured exactly, relative to the exact greedy's.
The last line printed is the result.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchline.models.patchcore.coreset import coreset_size, coverage_radius, greedy_coreset, greedy_coreset_dask  # noqa: E402
from patchline.storage.dask_cluster import dask_client  # noqa: E402
from patchline.storage.feature_store import FeatureStore  # noqa: E402

ELPV_PATCHES = 1024


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 rows of a seeded mixture of low-rank Gaussian clusters of varied size and spread."""
    rng = np.random.default_rng(seed)
    clusters = max(8, n // 500)
    weights = rng.lognormal(0.0, 1.0, clusters)
    sizes = rng.multinomial(n, weights / weights.sum())
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    spreads = np.exp(rng.uniform(np.log(0.05), np.log(1.0), clusters)).astype(np.float32)
    rows = np.empty((n, dim), dtype=np.float32)
    start = 0
    for centre, spread, size in zip(centres, spreads, sizes):
        rank = int(rng.integers(4, 33))
        basis = rng.standard_normal((rank, dim), dtype=np.float32) / np.sqrt(rank)
        latent = rng.standard_normal((size, rank), dtype=np.float32)
        noise = rng.standard_normal((size, dim), dtype=np.float32)
        rows[start:start + size] = centre + spread * (latent @ basis + 0.2 * noise)
        start += size
    return rows[rng.permutation(n)]


def elpv_features(n: int) -> np.ndarray:
    """(n, 152) real patch features of the first ceil(n / 1024) elpv train normals."""
    from patchline.models.patchcore.patch_features import PatchFeatureExtractor
    from patchline.storage.sources.elpv import SOURCE_PREFIX, elpv_arrays, elpv_rows
    from patchline.models.config import ElpvSource, PatchCoreConfig

    images, _, _ = elpv_arrays()
    train = [int(row.source.removeprefix(SOURCE_PREFIX)) for row in elpv_rows(ElpvSource()) if row.split == "train"]
    count = -(-n // ELPV_PATCHES)
    if count > len(train):
        raise SystemExit(f"--n {n} needs {count} elpv train images, only {len(train)} exist")
    extractor = PatchFeatureExtractor(PatchCoreConfig(), image_size=256, device=torch.device("cpu"))
    features = np.concatenate(list(extractor.extract_images(images[train[:count]])))
    return features.reshape(-1, features.shape[-1])[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1024, help="clustered data only; elpv is 152")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--data", choices=("clustered", "elpv"), default="clustered")
    parser.add_argument("--partitions", type=int, default=None, help="default: patchline.models.patchcore.coreset.default_partitions")
    parser.add_argument("--patches", type=int, default=1000, help="rows per stored 'image' (clustered)")
    parser.add_argument("--threads", type=int, default=None, help="Dask worker threads (default: one per core)")
    parser.add_argument("--store", type=Path, default=None, help="store root (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    start = time.perf_counter()
    if args.data == "clustered":
        if args.n % args.patches:
            raise SystemExit(f"--n {args.n} must be a multiple of --patches {args.patches}")
        rows, patches = clustered(args.n, args.dim), args.patches
    else:
        rows, patches = elpv_features(args.n), ELPV_PATCHES
    n, dim = rows.shape
    print(f"data: {args.data} {n} x {dim} in {time.perf_counter() - start:.1f} s")

    root = args.store or Path(tempfile.mkdtemp(prefix="coreset-bench-"))
    try:
        images = -(-n // patches)
        padded = np.zeros((images * patches, dim), dtype=np.float32)
        padded[:n] = rows
        ids = [f"{args.data}-{i:06d}" for i in range(images)]
        store = FeatureStore.open(root, "bench", {"data": args.data, "n": n, "dim": dim})
        start = time.perf_counter()
        written = 0
        while written < images:
            # The store picks its block size on the first write; after that, write whole blocks.
            stop = min(images, written + (store.block_images or 1))
            store.write_batch(ids[written:stop], padded[written * patches:stop * patches].reshape(-1, patches, dim))
            written = stop
        print(f"store: {images} images x {patches} patches, {store.block_images} per block, "
              f"written in {time.perf_counter() - start:.1f} s")
        del padded
        size = coreset_size(n, args.ratio)

        start = time.perf_counter()
        in_memory = store.read(ids).reshape(-1, dim)[:n]
        exact = greedy_coreset(in_memory, size, device=torch.device("cpu"))
        exact_s = time.perf_counter() - start
        print(f"exact: {size} picks in {exact_s:.1f} s, projected radius {exact.radius:.4f}")

        with dask_client(threads=args.threads) as client:
            threads = sum(client.nthreads().values())
            start = time.perf_counter()
            table = store.as_dask_array().reshape(-1, dim)[:n]
            parallel = greedy_coreset_dask(table, size, partitions=args.partitions)
            dask_s = time.perf_counter() - start
        print(f"dask: {threads} threads, {len(parallel.indices)} picks in {dask_s:.1f} s, "
              f"projected radius {parallel.radius:.4f}")

        random = np.random.default_rng(0).choice(n, size=size, replace=False)
        start = time.perf_counter()
        radii = {name: coverage_radius(in_memory, picks, device=torch.device("cpu"))
                 for name, picks in (("exact", exact.indices), ("dask", parallel.indices), ("random", random))}
        print("full-space radii: " + ", ".join(f"{k} {v:.4f}" for k, v in radii.items())
              + f" (measured in {time.perf_counter() - start:.1f} s)")
    finally:
        if args.store is None:
            shutil.rmtree(root, ignore_errors=True)

    print(f"coreset data={args.data} n={n} dim={dim} ratio={args.ratio} exact_s={exact_s:.1f} dask_s={dask_s:.1f} "
          f"speedup={exact_s / dask_s:.2f} radius_ratio={radii['dask'] / radii['exact']:.3f} "
          f"random_radius_ratio={radii['random'] / radii['exact']:.3f}")


if __name__ == "__main__":
    main()
