"""A feature store larger than RAM, written through the real writer, and the Dask coreset run on it (issue 7).

    nice python benchmarks/out_of_core.py --gb 32 [--dim 1536] [--ratio 0.01] [--threads N] [--root DIR]

1. Writes `--gb` GB (10^9 bytes, uncompressed float32) of synthetic patch features through
   `patchline.storage.feature_store.FeatureStore.write_batch`: images of 28 x 28 patches of `--dim` dims (the
   shape of wide_resnet50_2 layers 2+3 at 224 px), each patch a centre of one of 4,096 Gaussian
   clusters plus noise, with cluster sizes falling as 1/rank (a few common textures, many rare
   ones, as in real patch features). Blocks are generated on all cores.
2. Runs `patchline.models.patchcore.coreset.greedy_coreset_dask` straight from the store on the local Dask cluster the
   nightly uses (projection to the line config's default `projection_dim`, rows routed to partition
   files next to the store, partitioned greedy); `coreset_s` is its wall time.
3. `radius_ratio_vs_sample`: the coreset's coverage radius ÷ that of a uniform random sample of the
   same number of rows, both over every row of the store (`coverage_radius_dask`, a second pass
   over the store), in the projected space. Below 1 means the coreset covers the data better than
   sampling does.

`peak_rss_gb` is the peak summed RSS of this process and all its descendants (GB = 2^30 bytes) from
start to end, writing included. The store goes to a temporary folder (`--root` to choose where; it
must have room for the store) and is deleted at the end. The last line printed is the result:
    out_of_core store_gb=<x> peak_rss_gb=<y> coreset_s=<s> radius_ratio_vs_sample=<r>
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.rss import PeakRss  # noqa: E402
from patchline.models.config import PatchCoreConfig  # noqa: E402
from patchline.models.patchcore.coreset import coreset_size, coverage_radius_dask, greedy_coreset_dask  # noqa: E402
from patchline.storage.dask_cluster import dask_client, machine_cores  # noqa: E402
from patchline.storage.feature_store import FeatureStore  # noqa: E402

log = logging.getLogger("benchmarks.out_of_core")

PATCHES = 28 * 28
CLUSTERS = 4096
CLUSTER_CDF = np.cumsum(1.0 / np.arange(1, CLUSTERS + 1)) / np.sum(1.0 / np.arange(1, CLUSTERS + 1))


def synthetic_block(first_image: int, images: int, dim: int, centres: np.ndarray) -> np.ndarray:
    """(images, PATCHES, dim) float32: cluster centres plus noise, seeded by the first image."""
    rng = np.random.default_rng((7, first_image))
    labels = np.searchsorted(CLUSTER_CDF, rng.random(images * PATCHES), side="right").clip(max=CLUSTERS - 1)
    block = rng.standard_normal((images * PATCHES, dim), dtype=np.float32)
    block *= 0.25
    block += centres[labels]
    return block.reshape(images, PATCHES, dim)


def write_store(store: FeatureStore, images: int, dim: int, threads: int) -> float:
    """Write `images` synthetic images in whole blocks, generating ahead on `threads` threads; seconds taken."""
    centres = np.random.default_rng(0).standard_normal((CLUSTERS, dim), dtype=np.float32)
    started = time.perf_counter()
    # The store picks its block size (about 32 MB chunks) on its first write.
    store.write_batch(["image-000000"], synthetic_block(0, 1, dim, centres))
    block = store.block_images
    starts = list(range(1, images, block))

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        with ThreadPoolExecutor(threads) as pool:
            pending = []
            for first in starts:
                pending.append((first, pool.submit(synthetic_block, first, min(block, images - first), dim, centres)))
                if len(pending) > threads:
                    first_done, future = pending.pop(0)
                    yield first_done, future.result()
            for first_done, future in pending:
                yield first_done, future.result()

    reported = started
    for first, features in blocks():
        store.write_batch([f"image-{i:06d}" for i in range(first, first + len(features))], features)
        if time.perf_counter() - reported > 30:
            reported = time.perf_counter()
            log.info("written %d of %d images (%.0f s)", len(store), images, reported - started)
    return time.perf_counter() - started


def folder_gb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, required=True, help="store size in GB (uncompressed float32)")
    parser.add_argument("--dim", type=int, default=1536, help="feature dims per patch (default 1536)")
    parser.add_argument("--ratio", type=float, default=0.01, help="coreset ratio (default 0.01)")
    parser.add_argument("--threads", type=int, default=None, help="Dask worker threads (default: one per core)")
    parser.add_argument("--root", type=Path, default=None, help="folder for the temporary store")
    args = parser.parse_args()
    if args.gb <= 0 or args.dim < 1:
        parser.error("--gb and --dim must be positive")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    threads = args.threads or machine_cores()
    projection_dim = PatchCoreConfig().projection_dim
    images = max(2, round(args.gb * 1e9 / (PATCHES * args.dim * 4)))
    rows = images * PATCHES
    root = Path(tempfile.mkdtemp(prefix="out-of-core-", dir=args.root))
    try:
        with PeakRss() as memory:
            store = FeatureStore.open(root, "out-of-core", {"synthetic": "clusters", "dim": args.dim,
                                                            "patches": PATCHES, "clusters": CLUSTERS})
            write_s = write_store(store, images, args.dim, threads)
            store_gb = rows * args.dim * 4 / 1e9
            log.info("store: %d images, %d rows x %d dims = %.1f GB (%.1f GB on disk) written in %.0f s; "
                     "peak RSS so far %.0f MB", images, rows, args.dim, store_gb, folder_gb(root), write_s,
                     memory.peak_mb)
            size = coreset_size(rows, args.ratio)
            with dask_client(threads=threads):
                table = store.as_dask_array().reshape(-1, args.dim)
                started = time.perf_counter()
                coreset = greedy_coreset_dask(table, size, projection_dim=projection_dim, scratch=root)
                coreset_s = time.perf_counter() - started
                log.info("coreset: %d of %d rows in %.0f s, radius %.4f; peak RSS so far %.0f MB", size, rows,
                         coreset_s, coreset.radius, memory.peak_mb)
                started = time.perf_counter()
                sample = np.random.default_rng(1).choice(rows, size=size, replace=False)
                sample_radius = coverage_radius_dask(table, sample, projection_dim=projection_dim, scratch=root)
                log.info("random sample of %d rows: radius %.4f (measured in %.0f s)", size, sample_radius,
                         time.perf_counter() - started)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"out_of_core store_gb={store_gb:.1f} peak_rss_gb={memory.peak_mb / 1024:.2f} coreset_s={coreset_s:.1f} "
          f"radius_ratio_vs_sample={coreset.radius / sample_radius:.3f}")


if __name__ == "__main__":
    main()
