"""Issue 32's two scenarios on real ELPV cells (a real Prefect API, MLflow store, Dask cluster and Zarr store):
defective cells dropped into `train/good/` are quarantined by the champion's screen, and a rebuild that
fits on them unscreened does not become champion."""

from __future__ import annotations

import csv
from pathlib import Path

import mlflow
import numpy as np
import pytest
from typer.testing import CliRunner

from patchline.models.config import EvaluationConfig, LineConfig, MvtecSource, PatchCoreConfig, PromotionConfig
from patchline.models.scoring.metrics import choose_decision_detector
from patchline.storage.line_config import save_line
from patchline.storage.registry import champion_version, registered_model_name
from patchline.storage.tag_names import DECISION_REASON_TAG
from patchline.storage.tracking import configure_mlflow
from tests.conftest import write_elpv_line, write_image


def cells_config(name: str, root: Path) -> LineConfig:
    """PatchCore fused with mean darkness at 64 px, as the ELPV lines are, small enough for CI."""
    return LineConfig(
        name=name, source=MvtecSource(root=root), image_size=64,
        patchcore=PatchCoreConfig(coreset_ratio=0.1, normalise_brightness=True),
        evaluation=EvaluationConfig(calibration_fraction=0.25, detectors=("patchcore", "darkness"),
                                    fusion_weights={"patchcore": 1.0, "darkness": 0.5}),
        promotion=PromotionConfig(min_test_images=20))


def champion_flags(line: str, images: list[np.ndarray]) -> np.ndarray:
    model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(line)}@champion")
    return np.asarray(model.predict(images)["decision"], bool)


def run_artifact_rows(run_id: str, path: str, folder: Path) -> list[dict]:
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(folder))
    with open(local, newline="") as handle:
        return list(csv.DictReader(handle))


def test_new_defective_training_images_are_quarantined_named_and_can_be_accepted(home, tmp_path):
    from patchline.cli import app
    from patchline.flows.rebuild import rebuild_product_line

    root = tmp_path / "line"
    images, good, bad = write_elpv_line(root, train=16, test_good=12, test_cracked=12)
    config = cells_config("cells-screened", root)
    first = rebuild_product_line(config)
    assert first.promoted and first.screening.champion is None
    # A first build has no champion to screen with: it reports the images unlike the rest instead.
    assert first.screening.unlike is not None and first.screening.unlike.cutoff > 0
    client = configure_mlflow()
    assert client.get_run(first.run_id).data.tags[DECISION_REASON_TAG].startswith("auto: the best image AUROC")

    # Cracked cells the line does not test on, three of those its champion flags, and one more good cell.
    spare = [images[i] for i in bad[12:40]]
    flagged = [cell for cell, hit in zip(spare, champion_flags(config.name, spare)) if hit][:3]
    assert len(flagged) == 3, "the premise: the champion flags some severe cracks"
    added = [write_image(root / "train" / "good" / f"new_crack{i}.png", cell) for i, cell in enumerate(flagged)]
    added.append(write_image(root / "train" / "good" / "new_good.png", images[good[40]]))
    expected = {str(path) for path, hit in zip(added, champion_flags(config.name, flagged + [images[good[40]]])) if hit}
    assert {str(path) for path in added[:3]} <= expected

    second = rebuild_product_line(config)
    screening = second.screening
    assert screening.champion == "1" and screening.screened == 4
    assert {item.path for item in screening.quarantined} == expected
    assert all(item.score >= item.threshold and item.score_unit >= 0.5 for item in screening.quarantined)
    # Neither fitted nor calibrated on: gone from the run's manifest, listed as quarantined beside it.
    manifest = run_artifact_rows(second.run_id, "data/manifest.csv", tmp_path / "a")
    assert not expected & {row["source"] for row in manifest}
    report = run_artifact_rows(second.run_id, "data/manifest.skipped.csv", tmp_path / "b")
    assert {row["path"] for row in report if row["kind"] == "quarantined"} == expected
    table = run_artifact_rows(second.run_id, "screening/quarantined.csv", tmp_path / "c")
    assert {row["path"] for row in table} == expected
    listed = {a.path for a in client.list_artifacts(second.run_id, "screening")}
    assert {f"screening/{row['heatmap']}" for row in table} <= listed
    # The deciding detector stays the champion's, whatever this rebuild's test AUROCs say.
    assert second.decision_detector == first.decision_detector
    assert second.decision_reason.startswith("kept from champion v1")

    # The same quarantined images and nothing else new: nothing to rebuild.
    third = rebuild_product_line(config)
    assert third.skipped and "quarantined" in third.reason

    # A reviewer accepts one of them: the next rebuild passes it unscreened and fits on it.
    runner = CliRunner()
    line_file = save_line(config, tmp_path / "line.yaml")
    accepted = sorted(expected)[0]
    result = runner.invoke(app, ["accept", str(line_file), accepted, "--reason", "glass glare, not a crack"])
    assert result.exit_code == 0, result.output
    fourth = rebuild_product_line(config)
    assert fourth.screening.accepted == 1 and accepted not in {i.path for i in fourth.screening.quarantined}
    manifest = run_artifact_rows(fourth.run_id, "data/manifest.csv", tmp_path / "d")
    assert accepted in {row["source"] for row in manifest}


def test_a_poisoned_full_rebuild_is_rejected_unscreened_and_quarantined_screened(home, tmp_path):
    """Issue 32's second scenario: more new "good" images than half the champion's, so the rebuild is full;
    twelve of them cracked."""
    from patchline.flows.rebuild import rebuild_product_line

    root = tmp_path / "line"
    images, good, bad = write_elpv_line(root, train=16, test_good=12, test_cracked=12)
    config = cells_config("cells-poisoned", root)
    first = rebuild_product_line(config)
    client = configure_mlflow()
    champion_run = client.get_run(first.run_id).data.metrics
    cracks = [images[i] for i in bad[12:24]]
    for i, cell in enumerate(cracks):
        write_image(root / "train" / "good" / f"crack{i}.png", cell)

    unscreened = rebuild_product_line(config, screen=False)
    assert unscreened.reuse["rebuild"].startswith("full rebuild: ")
    assert not unscreened.promoted, unscreened.reason
    assert unscreened.reason.startswith(("rule champion", "rule same_detector", "rule floor", "rule miss_rate",
                                            "rule fpr", "rule threshold_rise", "rule max_detector_drop"))
    assert champion_version(client, config.name).version == 1

    screened = rebuild_product_line(config)
    flags = champion_flags(config.name, cracks)
    assert {item.path for item in screened.screening.quarantined} == {
        str(root / "train" / "good" / f"crack{i}.png") for i in np.flatnonzero(flags)}
    if screened.promoted:
        # What the screen let through did not cost the operating point more than the gate allows.
        after = client.get_run(screened.run_id).data.metrics
        rule = config.promotion
        assert after["miss_rate_at_threshold"] - champion_run["miss_rate_at_threshold"] <= rule.max_miss_rate_increase


def test_auto_keeps_the_champions_deciding_detector_and_says_why():
    metrics = {"patchcore": {"image_auroc": 0.79}, "fused": {"image_auroc": 0.91}}
    assert choose_decision_detector("auto", metrics, None)[0] == "fused"
    kept, why = choose_decision_detector("auto", metrics, ("1", "patchcore"))
    assert kept == "patchcore" and why.startswith("kept from champion v1")
    assert choose_decision_detector("fused", metrics, ("1", "patchcore")) == (
        "fused", "set in the line config (evaluation.decision_detector)")
    gone, why = choose_decision_detector("auto", {"ae": {"image_auroc": 0.7}}, ("1", "patchcore"))
    assert gone == "ae" and "champion v1's patchcore is not built" in why
    with pytest.raises(ValueError):
        choose_decision_detector("auto", {}, None)


def test_leave_one_image_out_finds_the_image_whose_patches_no_other_has():
    from patchline.models.patchcore.outliers import leave_one_image_out_scores, unlike_the_rest

    rng = np.random.default_rng(0)
    # Twenty images of one texture, five bank rows each; image 7 also holds a patch far from all of them.
    owners = np.repeat(np.arange(20), 5)
    bank = rng.normal(size=(100, 16)).astype(np.float32)
    bank[37] += 12.0
    scores = leave_one_image_out_scores(bank, owners, 21)
    flagged, cutoff = unlike_the_rest(scores[:20])
    assert list(flagged) == [7] and scores[7] > cutoff > 0
    assert scores[20] == 0  # an image without bank rows is covered by the others
    # Two images sharing the odd patch vouch for each other: neither is unlike the rest.
    bank[2] = bank[37] + 0.01
    assert 7 not in unlike_the_rest(leave_one_image_out_scores(bank, owners, 20))[0]
    with pytest.raises(ValueError, match="at least two images"):
        leave_one_image_out_scores(bank[:5], owners[:5], 1)


def test_a_small_bank_reports_only_the_image_unlike_the_others_that_hold_rows():
    """A bank of fewer rows than images (small images, a 1 % coreset) leaves most images without rows: they
    are covered by the others and do not pull the cut-off down to 0, which would report every image with a row."""
    from patchline.models.patchcore.outliers import leave_one_image_out_scores, unlike_the_rest

    rng = np.random.default_rng(1)
    # 100 images, 30 of them holding one bank row each; image 12's row is far from all the others.
    owners = np.arange(0, 60, 2)
    bank = rng.normal(size=(30, 16)).astype(np.float32)
    bank[6] += 12.0
    scores = leave_one_image_out_scores(bank, owners, 100)
    assert (scores > 0).sum() == 30
    flagged, cutoff = unlike_the_rest(scores)
    assert list(flagged) == [12] and cutoff > float(np.median(scores[scores > 0]))
    assert unlike_the_rest(np.zeros(5))[0].size == 0
