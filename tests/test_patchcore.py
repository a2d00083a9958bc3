"""PatchCore scoring: eq. 7, exact and indexed kNN, memory bank files, and planted defects on real ELPV cells."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from scipy.ndimage import gaussian_filter

from patchline.models.config import PatchCoreConfig
from patchline.models.patchcore.memory_bank import MemoryBank, PatchCoreScorer
from patchline.models.patchcore.nearest import reweighted_scores
from patchline.models.patchcore.nearest_index import CellIndex, exact_maxima
from patchline.models.patchcore.patch_features import PatchFeatureExtractor
from patchline.models.scoring.detection import Detections, gather_detections
from patchline.storage.nearest_cache import KEEP, NearestCache, bank_digest
from patchline.storage.sources.elpv import elpv_arrays

CPU = torch.device("cpu")


def _scorer(bank: np.ndarray, **settings: float) -> PatchCoreScorer:
    return PatchCoreScorer(MemoryBank(np.asarray(bank, np.float32), PatchCoreConfig(**settings), 16), CPU)


def test_eq7_reweights_the_max_patch_distance_by_its_bank_neighbourhood() -> None:
    # A dense corner around the origin and one isolated row at (20, 0).
    bank = [[0, 0], [1, 0], [0, 1], [1, 1], [20, 0]]
    scorer = _scorer(bank, reweight_neighbours=3, smoothing_sigma=0)
    # Each image's worst patch is 3 from its nearest row: (0, -3) → (0, 0); (20, -3) → (20, 0).
    dense = [[0, 0], [1, 0.5], [0, -3], [0.5, 1]]
    isolated = [[0, 0], [1, 0.5], [20, -3], [0.5, 1]]
    detections = scorer.score(np.array([dense, isolated], np.float32), (2, 2), 16)

    # N_3((0, 0)) = {(0, 0), (1, 0), (0, 1)}; N_3((20, 0)) = {(20, 0), (1, 1), (1, 0)}.
    def eq7(nearest: float, support: list[float]) -> float:
        return (1 - math.exp(nearest) / sum(math.exp(d) for d in support)) * nearest

    expected_dense = eq7(3, [3, math.hypot(1, 3), 4])
    expected_isolated = eq7(3, [3, math.hypot(19, 4), math.hypot(19, 3)])
    assert detections.scores == pytest.approx([expected_dense, expected_isolated], rel=1e-5)
    # Same raw distance, but a match in a sparse part of the bank is trusted less: higher score.
    assert detections.scores[1] > detections.scores[0]


def test_maps_are_patch_distances_upsampled_bilinearly_then_gaussian_smoothed() -> None:
    rng = np.random.default_rng(2)
    features = rng.standard_normal((2, 6 * 5, 3)).astype(np.float32)
    scorer = _scorer(rng.standard_normal((7, 3)), smoothing_sigma=4)
    distances = scorer.patch_distances(torch.from_numpy(features.reshape(-1, 3))).view(2, 1, 6, 5)
    upsampled = F.interpolate(distances, size=(40, 40), mode="bilinear", align_corners=False)[:, 0].numpy()
    expected = np.stack([gaussian_filter(m, sigma=4, mode="nearest", truncate=4.0) for m in upsampled])
    maps = scorer.score(features, (6, 5), 40).maps
    assert maps.shape == (2, 40, 40)
    assert np.allclose(maps, expected, atol=1e-5)
    unsmoothed = _scorer(scorer.bank.numpy(), smoothing_sigma=0).score(features, (6, 5), 40).maps
    assert np.allclose(unsmoothed, upsampled, atol=1e-5)


def test_nearest_search_and_eq7_equal_brute_force() -> None:
    rng = np.random.default_rng(0)
    # More rows and queries than one 1,024 x 1,024 tile, so the tiling is exercised.
    bank = rng.standard_normal((2500, 152)).astype(np.float32)
    queries = torch.from_numpy(rng.standard_normal((2100, 152)).astype(np.float32))
    scorer = _scorer(bank)
    brute = torch.cdist(queries.double(), torch.from_numpy(bank).double())
    expected, order = brute.sort(dim=1)
    assert np.allclose(scorer.patch_distances(queries).numpy(), expected[:, 0].numpy(), rtol=1e-4)
    # Eq. 7 on the shared search: each query's nearest row m*, and the 5 bank rows nearest to m*.
    rows = torch.from_numpy(bank).double()
    support = torch.cdist(rows[order[:, 0]], rows).argsort(1)[:, :5]
    support_distances = torch.linalg.vector_norm(rows[support] - queries.double()[:, None], dim=2)
    nearest = expected[:, 0]
    eq7 = (1 - torch.exp(nearest) / torch.exp(support_distances).sum(1)) * nearest
    found = reweighted_scores(queries, scorer.bank, scorer.bank_sq_norms, 5)
    assert np.allclose(found.numpy(), eq7.numpy(), rtol=1e-4)


@pytest.mark.parametrize("search", ["exact", "indexed"])
def test_a_grown_bank_scores_like_a_fresh_search_from_its_kept_distances(tmp_path: Path, search: str) -> None:
    """Distances kept for the champion's bank (the grown bank's first rows) plus a search of the added rows
    give the scores of a search of the whole grown bank (and its maps, when exact); the kept distances go
    through the cache's files."""
    rng = np.random.default_rng(4)
    bank = rng.standard_normal((2300, 24)).astype(np.float32)
    features = rng.standard_normal((3, 8 * 8, 24)).astype(np.float32) * 1.3
    champion, grown = _scorer(bank[:1800], search=search), _scorer(bank, search=search)
    cache = NearestCache(tmp_path / "nearest")
    kept = champion.distances(champion.checked(features, (8, 8))).numpy()
    cache.save(bank_digest(bank[:1800]), {f"image{i}": row for i, row in enumerate(kept)})
    loaded = cache.load(bank_digest(bank[:1800]))
    prior = (np.stack([loaded[f"image{i}"] for i in range(3)]), 1800)
    patches = grown.checked(features, (8, 8))
    updated = grown.detections(patches, grown.distances(patches, prior), (8, 8), 16)
    fresh = grown.score(features, (8, 8), 16)
    np.testing.assert_allclose(updated.scores, fresh.scores, rtol=1e-6)
    exact = _scorer(bank, search="exact").score(features, (8, 8), 16)
    np.testing.assert_allclose(updated.scores, exact.scores, rtol=1e-6)
    if search == "exact":
        np.testing.assert_allclose(updated.maps, fresh.maps, rtol=1e-5, atol=1e-6)
    else:  # from upper bounds: never below the exact map
        assert (updated.maps >= exact.maps - 1e-4).all()
    assert not np.allclose(champion.score(features, (8, 8), 16).scores, fresh.scores), "the added rows matter here"


def test_the_nearest_cache_merges_prunes_and_ignores_broken_files(tmp_path: Path) -> None:
    cache = NearestCache(tmp_path)
    assert cache.load("nothing") == {}
    cache.save("bank0", {"a": np.zeros(4, np.float32)})
    cache.save("bank0", {"b": np.ones(4, np.float32)})
    assert sorted(cache.load("bank0")) == ["a", "b"]
    # Well-formed but changed on disk (issue 35's probe): not used, so the distances are measured again.
    raw = bytearray((tmp_path / "bank0.safetensors").read_bytes())
    raw[-4:] = bytes(b ^ 0xFF for b in raw[-4:])
    (tmp_path / "damaged.safetensors").write_bytes(bytes(raw))
    assert cache.load("damaged") == {}
    (tmp_path / "damaged.safetensors").unlink()
    (tmp_path / "broken.safetensors").write_bytes(b"not a file of distances")
    assert cache.load("broken") == {}
    (tmp_path / ".writing-killed.safetensors").write_bytes(b"half")
    for i in range(1, KEEP + 2):
        cache.save(f"bank{i}", {"a": np.full(4, i, np.float32)})
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(f"bank{i}.safetensors" for i in range(2, KEEP + 2)), left
    assert bank_digest(np.ones((2, 3), np.float32)) != bank_digest(np.ones((3, 2), np.float32))


def test_memory_bank_round_trip_gives_identical_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    config = PatchCoreConfig(backbone="efficientnet-lite2", layers=(6, 14), reweight_neighbours=4)
    bank = MemoryBank(rng.standard_normal((300, 24)).astype(np.float32), config, 64)
    path = bank.save(tmp_path / "bank" / "memory_bank.safetensors")
    loaded = MemoryBank.load(path)
    assert loaded.config == config and loaded.image_size == 64
    assert np.array_equal(loaded.features, bank.features)
    features = rng.standard_normal((3, 64, 24)).astype(np.float32)
    before = PatchCoreScorer(bank, CPU).score(features, (8, 8), 64)
    after = PatchCoreScorer(loaded, CPU).score(features, (8, 8), 64)
    assert np.array_equal(before.scores, after.scores) and np.array_equal(before.maps, after.maps)


def test_the_bank_file_carries_its_index_and_a_bank_without_one_builds_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    bank = MemoryBank(rng.standard_normal((500, 12)).astype(np.float32), PatchCoreConfig(), 32)
    loaded = MemoryBank.load(bank.save(tmp_path / "bank.safetensors"))
    for name in ("centroids", "order", "offsets"):
        assert np.array_equal(getattr(loaded.index, name), getattr(bank.index, name))
    rebuilt = CellIndex.build(bank.features)
    assert np.array_equal(rebuilt.order, bank.index.order), "the index is a function of the rows"
    assert 10 <= len(bank.index.centroids) <= 23 and np.all(np.diff(bank.index.offsets) > 0)
    # A bank file written before the index: the index is built from its rows.
    save_file({"features": bank.features}, tmp_path / "old.safetensors", metadata={
        "format": "patchline-memory-bank/1", "config": bank.config.model_dump_json(), "image_size": "32"})
    assert np.array_equal(MemoryBank.load(tmp_path / "old.safetensors").index.order, bank.index.order)
    # An index whose cells do not partition the rows is refused, naming the file.
    save_file({"features": bank.features, "cell_centroids": bank.index.centroids,
               "cell_order": np.zeros(500, np.int64), "cell_offsets": bank.index.offsets},
              tmp_path / "bad.safetensors", metadata={
        "format": "patchline-memory-bank/1", "config": bank.config.model_dump_json(), "image_size": "32"})
    with pytest.raises(ValueError, match=r"bad.safetensors: the nearest-row index is inconsistent"):
        MemoryBank.load(tmp_path / "bad.safetensors")


def test_bad_bank_files_and_features_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        MemoryBank.load(tmp_path / "nothing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read memory bank"):
        MemoryBank.load(garbage)
    with pytest.raises(ValueError, match="non-empty float32"):
        MemoryBank(np.zeros((4, 2)), PatchCoreConfig(), 16)
    with pytest.raises(ValueError, match=r"expected features \(N ≥ 1, 4, 2\)"):
        _scorer([[0, 0]]).score(np.zeros((1, 9, 2), np.float32), (2, 2), 16)


SIZE = 128
# A dark blob between the busbars, in 300 px cell coordinates (row, column, radius).
BLOB = (100, 195, 20)


def _plant_blob(cell: np.ndarray) -> np.ndarray:
    rows, cols = np.ogrid[:cell.shape[0], :cell.shape[1]]
    inside = (rows - BLOB[0]) ** 2 + (cols - BLOB[1]) ** 2 <= BLOB[2] ** 2
    planted = cell.copy()
    planted[inside] = (planted[inside] * 0.3).astype(np.uint8)
    return planted


def test_planted_defects_on_real_cells_outscore_held_out_good_cells() -> None:
    images, levels, types = elpv_arrays()
    good = np.flatnonzero((types == "mono") & (levels == 0))
    train, held_out = images[good[:10]], images[good[10:16]]
    extractor = PatchFeatureExtractor(PatchCoreConfig(), SIZE, CPU)
    bank = np.concatenate(list(extractor.extract_images(train))).reshape(-1, extractor.dim)
    scorer = PatchCoreScorer(MemoryBank(bank, extractor.config, SIZE), CPU)

    test = np.concatenate([held_out, [_plant_blob(cell) for cell in held_out]])
    features = np.concatenate(list(extractor.extract_images(test)))
    detections = scorer.score(features, extractor.grid, SIZE)
    good_scores, planted_scores = detections.scores[:6], detections.scores[6:]
    assert planted_scores.min() > good_scores.max(), (good_scores, planted_scores)

    scale = SIZE / images.shape[1]
    for heat in detections.maps[6:]:
        row, col = np.unravel_index(heat.argmax(), heat.shape)
        assert math.hypot(row - BLOB[0] * scale, col - BLOB[1] * scale) <= BLOB[2] * scale + 8, (row, col)


def test_the_indexed_search_scores_real_cells_as_the_exact_one_after_a_few_rechecks() -> None:
    """Issue 36: each patch is searched in a few cells of the bank only, which gives an upper bound of its
    nearest distance; each image's most distant patches are re-checked against the whole bank until no
    bound is left above the largest exact distance. Image scores equal the exact search's; few patches
    are re-checked; maps (drawn from the bounds) are never below the exact ones and close to them."""
    images, levels, types = elpv_arrays()
    good = np.flatnonzero((types == "mono") & (levels == 0))
    defective = np.flatnonzero((types == "mono") & (levels == 3))
    extractor = PatchFeatureExtractor(PatchCoreConfig(), SIZE, CPU)
    bank = np.concatenate(list(extractor.extract_images(images[good[:12]]))).reshape(-1, extractor.dim)
    test = np.concatenate([images[good[12:18]], images[defective[:6]],
                           [_plant_blob(cell) for cell in images[good[12:16]]]])
    features = np.concatenate(list(extractor.extract_images(test)))
    indexed = PatchCoreScorer(MemoryBank(bank, extractor.config, SIZE), CPU)
    exact = PatchCoreScorer(MemoryBank(bank, extractor.config.model_copy(update={"search": "exact"}), SIZE), CPU)
    found, expected = indexed.score(features, extractor.grid, SIZE), exact.score(features, extractor.grid, SIZE)
    np.testing.assert_allclose(found.scores, expected.scores, rtol=1e-6)

    patches = torch.from_numpy(features)
    with torch.inference_mode():
        bounds = indexed._indexed.upper_bounds(patches.reshape(-1, extractor.dim))
        exact_distances = exact.patch_distances(patches.reshape(-1, extractor.dim))
        _, rechecked = exact_maxima(patches, bounds.view(len(test), -1), exact.patch_distances)
    assert (bounds >= exact_distances * (1 - 1e-5)).all(), "a bound below the exact distance"
    total = features.shape[0] * features.shape[1]
    assert rechecked <= 0.1 * total, f"{rechecked} of {total} patches re-checked"
    assert (found.maps >= expected.maps - 1e-4).all()
    assert np.abs(found.maps - expected.maps).max() <= 0.05 * expected.maps.max()


def test_gathered_batches_keep_their_order_and_the_announced_count_is_checked() -> None:
    batches = [Detections(np.array([1.0, 2.0], dtype=np.float32), np.full((2, 4, 4), 1.0, dtype=np.float32)),
               Detections(np.array([3.0], dtype=np.float32), np.full((1, 4, 4), 3.0, dtype=np.float32))]
    gathered = gather_detections(iter(batches), 3)
    assert gathered.scores.tolist() == [1.0, 2.0, 3.0]
    assert gathered.maps.shape == (3, 4, 4) and gathered.maps[2].min() == 3.0 and gathered.maps[1].max() == 1.0
    with pytest.raises(ValueError, match="held 3 images, 4 were announced"):
        gather_detections(iter(batches), 4)
    with pytest.raises(ValueError, match="more than the 2 images announced"):
        gather_detections(iter(batches), 2)
