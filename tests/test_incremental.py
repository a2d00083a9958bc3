"""Incremental rebuilds (issue 23) on a real Prefect API, MLflow store, Dask cluster and Zarr store: a line of
real ELPV cells in the MVTec layout gains good images night by night."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from patchline.models.config import (
    EvaluationConfig, LineConfig, MvtecSource, OeSdnConfig, PatchCoreConfig, PromotionConfig)
from patchline.models.patchcore.coreset import coreset_size, coverage_radius
from patchline.storage.feature_store import FeatureStore
from patchline.storage.image_files import decode_image
from patchline.storage.ingest import build_manifest
from patchline.storage.manifest import content_hash, hold_out_calibration
from patchline.storage.nearest_cache import NearestCache, bank_key
from patchline.storage.registry import accept_images, registered_model_name
from patchline.storage.tag_names import REUSE_TAG
from patchline.storage.tracking import configure_mlflow
from patchline.tasks.patchcore import feature_key, feature_root

from tests.conftest import write_elpv_line, write_image

LINE = "cells-grow"


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> tuple[Path, LineConfig, list[np.ndarray]]:
    """(The line's folder with 16 good training cells and a test split, its config, 4 more good cells)."""
    root = tmp_path_factory.mktemp("cells")
    images, good, _ = write_elpv_line(root, train=16, test_good=10, test_cracked=10)
    config = LineConfig(
        name=LINE, source=MvtecSource(root=root), image_size=64,
        patchcore=PatchCoreConfig(coreset_ratio=0.1),
        oesdn=OeSdnConfig(image_size=32, epochs=3, sdn_epochs=3, batch_size=4, ae_base_width=8, sdn_base_width=16),
        evaluation=EvaluationConfig(calibration_fraction=0.2, detectors=("patchcore", "oesdn", "ae")),
        # Every version is promoted, so each rebuild starts from the one before.
        promotion=PromotionConfig(min_test_images=0, tolerance=1.0, max_detector_drop=1.0, max_miss_rate_increase=1.0,
                                  max_fpr_increase=1.0, max_threshold_rise=1e6))
    return root, config, [images[i] for i in good[26:30]]


def bank_of(version: str) -> np.ndarray:
    model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(LINE)}/{version}")
    return model.unwrap_python_model().detector.detectors["patchcore"].bank.features


def fit_ids(config: LineConfig) -> list[str]:
    rows = build_manifest(config).select("train", "good")
    return [row.id for row in hold_out_calibration(rows, config.evaluation.calibration_fraction)[0]]


def fit_patches(config: LineConfig) -> np.ndarray:
    store = FeatureStore.open(feature_root(), config.name, feature_key(config), read_only=True)
    stored = store.read(fit_ids(config))
    return stored.reshape(-1, stored.shape[2])


def accept(paths: list[Path], reason: str) -> None:
    """A reviewer passes images the champion's screen would quarantine (tasks/screening.py)."""
    ids = {content_hash(decode_image(path)): str(path) for path in paths}
    accept_images(configure_mlflow(), LINE, ids, reason)


def test_new_good_images_grow_the_champion_and_drift_falls_back(home, line) -> None:
    from patchline.flows.rebuild import rebuild_product_line

    root, config, more = line
    client = configure_mlflow()
    first = rebuild_product_line(config)
    assert first.reuse["rebuild"] == "full rebuild: no champion to start from"
    assert first.reuse["patchcore"] == "full coreset"

    old_fit = fit_ids(config)
    added = [write_image(root / "train" / "good" / f"new{i}.png", cell) for i, cell in enumerate(more)]
    # v1 saw 13 cells from one stretch of the set and flags these from the next: a reviewer passes them.
    accept(added, "good cells of a later batch")
    new_fit = set(fit_ids(config)) - set(old_fit)
    assert new_fit, "some of the four new cells are fit images (the others are held out for calibration)"
    grown = rebuild_product_line(config)
    assert grown.version == "2" and grown.promoted
    tags = client.get_run(grown.run_id).data.tags
    assert tags[REUSE_TAG].startswith("incremental from champion v1 (run ")
    assert tags[REUSE_TAG].endswith(f"{len(new_fit)} new fit images beside its {len(old_fit)}")
    assert tags[f"{REUSE_TAG}.patchcore"].startswith("grown from champion v1: its ")
    # The networks are not updated but trained on every fit image, old and new, as a full rebuild trains them.
    for detector in ("ae", "oesdn"):
        assert tags[f"{REUSE_TAG}.{detector}"] == f"trained from scratch on {len(old_fit) + len(new_fit)} fit images"
    # The champion's bank is kept whole, grown to the line's ratio of every fit patch now, and covers all
    # of them (old and new) within the radius the run reports.
    old_bank, new_bank, patches = bank_of("1"), bank_of("2"), fit_patches(config)
    np.testing.assert_array_equal(new_bank[:len(old_bank)], old_bank)
    assert len(new_bank) == coreset_size(len(patches), 0.1) > len(old_bank)
    radius = client.get_run(grown.run_id).data.metrics["coreset_radius"]
    centres = np.arange(len(patches), len(patches) + len(new_bank))
    assert coverage_radius(np.concatenate([patches, new_bank]), centres) <= radius * (1 + 1e-5)
    # Every scored image's patch distances to both banks are kept, for the next bank grown from them.
    test = {row.id for row in build_manifest(config).select(split="test")}
    scored = {row.id for row in build_manifest(config).rows} - set(fit_ids(config))
    cache = NearestCache(Path(feature_root()) / LINE / "nearest")
    assert test <= set(cache.load(bank_key(old_bank, "indexed")))
    assert scored <= set(cache.load(bank_key(new_bank, "indexed")))

    # Random black and white squares look like nothing the bank holds, and few of their patches alike: the
    # bank's share of picks cannot cover them as tightly as the champion covered its cells.
    # The screen quarantines them; only images a reviewer passed can reach the drift fallback.
    odd = []
    for i in range(3):
        squares = np.random.default_rng(i).integers(0, 2, (10, 10)).astype(np.uint8) * 255
        odd.append(write_image(root / "train" / "good" / f"odd{i}.png", np.kron(squares, np.ones((30, 30), np.uint8))))
    quarantined = rebuild_product_line(config)
    assert quarantined.skipped and {item.path for item in quarantined.screening.quarantined} == set(map(str, odd))
    accept(odd, "a new product variant")
    drifted = rebuild_product_line(config)
    tags = client.get_run(drifted.run_id).data.tags
    assert tags[REUSE_TAG].startswith("incremental from champion v2")
    assert tags[f"{REUSE_TAG}.patchcore"].startswith("full coreset: drift: the new images' patches lie up to ")
    assert "more than 1.1 x the champion's radius" in tags[f"{REUSE_TAG}.patchcore"]

    # Nothing new: a forced rebuild has nothing to add to its champion, so it starts from nothing.
    forced = rebuild_product_line(config, force=True)
    assert forced.reuse["rebuild"] == "full rebuild: no new good training images since champion v3"
    assert client.get_run(forced.run_id).data.tags[f"{REUSE_TAG}.ae"].startswith("trained from scratch")
