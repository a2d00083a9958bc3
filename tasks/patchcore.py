"""PatchCore steps: extract patch features into the Zarr store, select the coreset with Dask, build the
memory bank, and score images against it."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from patchline.models.config import LineConfig
from patchline.models.incremental import DRIFT_LIMIT, bank_growth, drifted
from patchline.models.patchcore.coreset import (SCRATCH_PREFIX, Coreset, coreset_size, extend_coreset,
                                                greedy_coreset_dask)
from patchline.models.patchcore.detector import PatchCoreDetector
from patchline.models.patchcore.memory_bank import MemoryBank
from patchline.models.patchcore.patch_features import PatchFeatureExtractor
from patchline.models.scoring.detection import Detections, gather_detections
from patchline.models.process import release_free_memory, stopwatch
from patchline.storage.dask_cluster import dask_client
from patchline.storage.feature_store import FeatureStore, FeatureStoreDamagedError
from patchline.storage.manifest import ManifestRow
from patchline.storage.nearest_cache import NearestCache, bank_key
from patchline.storage.paths import patchline_home
from patchline.storage.pixels import read_pixels
from patchline.tasks.incremental import Reuse

# About this many bytes of features per Zarr chunk: big enough for fast reads, small enough to buffer.
_CHUNK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class StoredFeatures:
    """Where a line's patch features live and their shape; the store is the cache across nights."""

    root: str
    line: str
    key: dict
    grid: tuple[int, int]
    written: int
    seconds: float

    def open(self) -> FeatureStore:
        return FeatureStore.open(self.root, self.line, self.key, read_only=True)


@dataclass(frozen=True)
class SelectedCoreset:
    """The coreset: `coreset.indices` count the patches of `rows` (image by image), `kept` are rows of the
    champion's bank kept as they are (an incremental rebuild), and `note` says how it was chosen."""

    coreset: Coreset
    rows: list[ManifestRow]
    candidates: int
    seconds: float
    note: str
    kept: np.ndarray | None = None


def feature_key(config: LineConfig) -> dict:
    """Everything that changes a patch feature: another key means another store."""
    patchcore = config.patchcore
    # "pooling" names the neighbourhood averaging; stores written before it (border-normalised means)
    # hold other features and must not be reused.
    return {"backbone": patchcore.backbone, "weights": str(patchcore.weights_path or "package"),
            "pooling": "mean-zero-padded",
            "layers": list(patchcore.layers or []), "neighbourhood": patchcore.neighbourhood,
            "normalise_brightness": patchcore.normalise_brightness,
            "target_dim": patchcore.target_dim, "image_size": config.image_size}


def remove_orphaned_scratch(folder: Path) -> list[Path]:
    """Delete the coreset scratch folders under `folder` whose process is gone (killed mid-coreset)."""
    removed = []
    for path in folder.glob(f"{SCRATCH_PREFIX}*-*"):
        pid = path.name.removeprefix(SCRATCH_PREFIX).split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            get_run_logger().warning("removed %s: coreset scratch of process %s, which is gone", path, pid)
    return removed


def feature_root() -> str:
    return str(patchline_home() / "features")


# No Prefect cache: the store itself skips every image it already holds (by content hash), which
# stays right even when the store is moved or pruned, where a cached task result would not.
@task(name="extract-features", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def extract_features_task(config: LineConfig, rows: list[ManifestRow], root: str | None = None) -> StoredFeatures:
    """Patch features of every row not yet in the line's store, written block by block as they come."""
    root = root or feature_root()
    with stopwatch() as elapsed:
        extractor = PatchFeatureExtractor(config.patchcore, config.image_size)
        per_image = extractor.grid[0] * extractor.grid[1] * extractor.dim * 4
        store = FeatureStore.open(root, config.name, feature_key(config),
                                  block_images=max(1, _CHUNK_BYTES // per_image))
        missing = set(store.missing(row.id for row in rows))
        pending = [row for row in rows if row.id in missing]
        block = store.block_images or max(1, _CHUNK_BYTES // per_image)
        for start in range(0, len(pending), block):
            chunk = pending[start:start + block]
            features = np.concatenate(list(extractor.extract_images([read_pixels(r.source) for r in chunk])))
            store.write_batch([r.id for r in chunk], features)
        _repair_damaged_chunks(store, extractor, rows)
        release_free_memory()
    get_run_logger().info("features: %d new of %d images (%s) in %.1f s, store holds %d", len(pending), len(rows),
                          config.patchcore.backbone, elapsed[0], len(store))
    return StoredFeatures(root, config.name, feature_key(config), extractor.grid, len(pending), elapsed[0])


def _repair_damaged_chunks(store: FeatureStore, extractor: PatchFeatureExtractor, rows: list[ManifestRow]) -> None:
    """Every stored chunk that `rows` use is checked; one that fails its checksum is extracted again from
    its images and rewritten (logged), or, when it holds images the line no longer has, the rebuild
    stops naming it."""
    by_id = {row.id: row for row in rows}
    for block, ids in store.damaged(by_id).items():
        gone = [image_id for image_id in ids if image_id not in by_id]
        if gone:
            raise FeatureStoreDamagedError(
                f"feature store {store.path}: a chunk of {len(ids)} stored images failed its checksum (damaged on "
                f"disk), and {len(gone)} of them (e.g. id {gone[0]!r}) are no longer images of this line, so "
                "their features cannot be extracted again. Delete that folder; the next rebuild extracts all again")
        features = np.concatenate(list(extractor.extract_images([read_pixels(by_id[i].source) for i in ids])))
        store.rewrite_block(block, ids, features)
        get_run_logger().warning("features: the stored chunk of %d images (e.g. %s) failed its checksum, damaged on "
                                 "disk; extracted again from the images and rewritten", len(ids), by_id[ids[0]].source)


@task(name="select-coreset", cache_policy=NO_CACHE)
def select_coreset_task(config: LineConfig, features: StoredFeatures, fit_rows: list[ManifestRow],
                        reuse: Reuse | None = None) -> SelectedCoreset:
    """Greedy k-center coreset of the fit images' patches, in parallel on Dask (local or remote cluster):
    the champion's bank grown by the new images' patches when `reuse` allows it and no drift shows,
    else over every fit patch."""
    grown, drift = None, None
    with stopwatch() as elapsed:
        if reuse is not None and reuse.incremental and "patchcore" in reuse.detector.detectors:
            grown, drift = _grow_champion_bank(config, features, fit_rows, reuse)
        if grown is None:
            stored = features.open().as_dask_array([row.id for row in fit_rows])
            patches = stored.reshape(-1, stored.shape[2])
            size = coreset_size(patches.shape[0], config.patchcore.coreset_ratio)
            scratch = _scratch(features)
            with dask_client(config.dask_address):
                coreset = greedy_coreset_dask(patches, size, projection_dim=config.patchcore.projection_dim,
                                              scratch=scratch)
        release_free_memory()
    if grown is not None:
        get_run_logger().info("coreset: %s, in %.1f s", grown.note, elapsed[0])
        return dataclasses.replace(grown, seconds=elapsed[0])
    get_run_logger().info("coreset: %d of %d patches in %.1f s, coverage radius %.4f", size, patches.shape[0],
                          elapsed[0], coreset.radius)
    return SelectedCoreset(coreset, fit_rows, int(patches.shape[0]), elapsed[0],
                           "full coreset" + (f": {drift}" if drift else ""))


def _scratch(features: StoredFeatures) -> str | None:
    """The coreset's scratch folder, next to the store: a remote cluster's workers can read the store, so
    they share it; debris of killed coresets there is removed first."""
    if "://" in features.root:
        return None
    remove_orphaned_scratch(Path(features.root))
    return features.root


def _grow_champion_bank(config: LineConfig, features: StoredFeatures, fit_rows: list[ManifestRow],
                        reuse: Reuse) -> tuple[SelectedCoreset | None, str | None]:
    """Merge-reduce: the champion's bank kept whole, plus the new images' patches farthest from it, to the
    line's coreset ratio of all fit patches; or (None, why) when the new patches stay farther from the
    grown bank than `DRIFT_LIMIT` times the champion's radius."""
    bank = reuse.detector.detectors["patchcore"].bank.features
    new_rows = list(reuse.new_fit)
    stored = features.open().as_dask_array([row.id for row in new_rows])
    candidates = stored.reshape(-1, stored.shape[2])
    per_image = features.grid[0] * features.grid[1]
    picks = bank_growth(len(bank), candidates.shape[0], per_image * len(fit_rows), config.patchcore.coreset_ratio)
    scratch = _scratch(features)
    with dask_client(config.dask_address):
        grown = extend_coreset(bank, candidates, picks, projection_dim=config.patchcore.projection_dim,
                               scratch=scratch)
    old_radius = reuse.coreset_radius
    if drifted(grown.radius, old_radius):
        why = (f"drift: the new images' patches lie up to {grown.radius:.4f} from the grown bank, more than "
               f"{DRIFT_LIMIT:g} x the champion's radius {old_radius:.4f} over its own images" if old_radius
               else f"champion v{reuse.version} logged no coreset radius to compare with")
        get_run_logger().warning("coreset: not grown from champion v%s (%s); selecting over every fit patch",
                                 reuse.version, why)
        return None, why
    # The champion's rows stay, so every patch they covered is still within the champion's radius.
    coreset = Coreset(grown.indices, max(old_radius, grown.radius))
    note = (f"grown from champion v{reuse.version}: its {len(bank)} bank rows kept, {picks} picked from the "
            f"{candidates.shape[0]} patches of {len(new_rows)} new images, which lie within {grown.radius:.4f} "
            f"of the grown bank (the champion's radius over its own images: {old_radius:.4f})")
    return SelectedCoreset(coreset, new_rows, int(candidates.shape[0]), 0.0, note, kept=bank), None


@task(name="build-memory-bank", cache_policy=NO_CACHE)
def build_memory_bank_task(config: LineConfig, features: StoredFeatures,
                           selected: SelectedCoreset) -> PatchCoreDetector:
    """PatchCore fitted: the selected patch rows, read back from the store in full dimension (after the
    champion's rows kept), as its memory bank."""
    store = features.open()
    per_image = features.grid[0] * features.grid[1]
    indices = np.sort(selected.coreset.indices)
    images = indices // per_image
    unique = np.unique(images)
    rows = [] if selected.kept is None else [selected.kept]
    # A few hundred images per read: each store read decodes whole chunks, so one image at a time
    # would decode the same chunk again and again.
    for start in range(0, len(unique), 256):
        group = unique[start:start + 256]
        stored = store.read([selected.rows[int(i)].id for i in group])
        for position, image in enumerate(group):
            rows.append(stored[position][indices[images == image] % per_image])
    return PatchCoreDetector(MemoryBank(np.concatenate(rows).astype(np.float32), config.patchcore, config.image_size))


@task(name="score-patchcore", cache_policy=NO_CACHE)
def score_patchcore_task(features: StoredFeatures, detector: PatchCoreDetector, rows: list[ManifestRow],
                         kept_rows: int = 0, batch: int = 64) -> Detections:
    """PatchCore detections of `rows` from their stored features. Each image's patch distances are kept
    per bank (storage/nearest_cache.py); a bank whose first `kept_rows` rows are the champion's whole bank
    is searched past them only, for the images whose distances to the champion's bank were kept."""
    store = features.open()
    bank, scorer = detector.bank, detector.scorer
    cache = None if "://" in features.root else NearestCache(Path(features.root) / features.line / "nearest")
    known = cache.load(bank_key(bank.features[:kept_rows], scorer.search)) if cache is not None and kept_rows else {}
    measured: dict[str, np.ndarray] = {}

    def batches():
        for start in tqdm(range(0, len(rows), batch), desc="patchcore scoring", unit="batch", disable=None):
            ids = [row.id for row in rows[start:start + batch]]
            patches = scorer.checked(store.read(ids), features.grid)
            distances = torch.empty(patches.shape[:2], device=patches.device)
            seen = torch.tensor([i in known for i in ids], device=patches.device)
            if seen.any():
                prior = np.stack([known[i] for i in ids if i in known])
                distances[seen] = scorer.distances(patches[seen], (prior, kept_rows))
            if not seen.all():
                distances[~seen] = scorer.distances(patches[~seen])
            measured.update(zip(ids, distances.cpu().numpy()))
            yield scorer.detections(patches, distances, features.grid, bank.image_size)

    with stopwatch() as elapsed:
        detections = gather_detections(batches(), len(rows))
    if cache is not None:
        cache.save(bank_key(bank.features, scorer.search), measured)
    reused = sum(1 for row in rows if row.id in known)
    get_run_logger().info("patchcore scoring: %d images in %.1f s%s", len(rows), elapsed[0],
                          f", {reused} of them against the {len(bank.features) - kept_rows} rows added to the "
                          "champion's bank only" if reused else "")
    return detections
