"""The champion gate and hand promotion against a real MLflow SQLite store."""

from __future__ import annotations

import mlflow
import pytest

from patchline.models.config import PromotionConfig
from patchline.storage.registry import (
    CHALLENGER, CHAMPION, DECISION_TAG, REASON_TAG, apply_gate, champion_version, decide_promotion,
    promote, register_version, registered_model_name, rollback)
from patchline.storage.tracking import configure_mlflow, line_experiment_id

RULE = PromotionConfig(metric="image_auroc", tolerance=0.01)


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHLINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return configure_mlflow()


def rebuild(client, auroc: float):
    """One finished rebuild: a run with its metric and an artifact, registered and gated."""
    experiment = line_experiment_id(client, "widget")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_metric("image_auroc", auroc)
        mlflow.log_text(f"auroc {auroc}", "model/summary.txt")
    version = register_version(client, "widget", f"{run.info.artifact_uri}/model", run.info.run_id)
    current = champion_version(client, "widget")
    current_metric = client.get_run(current.run_id).data.metrics["image_auroc"] if current else None
    decision = decide_promotion(auroc, current_metric, RULE)
    apply_gate(client, "widget", version, decision)
    return version, run.info.run_id


def test_decide_promotion_rule():
    assert decide_promotion(0.80, None, RULE).promote
    assert decide_promotion(0.80, 0.805, RULE).promote  # within tolerance
    assert not decide_promotion(0.80, 0.82, RULE).promote
    assert not decide_promotion(float("nan"), 0.5, RULE).promote
    assert "vs champion 0.8200" in decide_promotion(0.80, 0.82, RULE).reason


def test_first_version_becomes_champion_and_a_worse_one_does_not(client):
    first, first_run = rebuild(client, 0.90)
    assert champion_version(client, "widget").version == first.version
    worse, worse_run = rebuild(client, 0.70)
    name = registered_model_name("widget")
    assert champion_version(client, "widget").version == first.version
    assert client.get_model_version_by_alias(name, CHALLENGER).version == worse.version
    tags = client.get_model_version(name, worse.version).tags
    assert tags[DECISION_TAG] == "rejected" and "0.7000 vs champion 0.9000" in tags[REASON_TAG]
    assert client.get_run(worse_run).data.tags[DECISION_TAG] == "rejected"
    assert client.get_run(first_run).data.tags[DECISION_TAG] == "promoted"
    better, _ = rebuild(client, 0.95)
    assert champion_version(client, "widget").version == better.version


def test_hand_promotion_and_rollback_walk_the_history(client):
    v1, _ = rebuild(client, 0.90)
    v2, _ = rebuild(client, 0.60)  # rejected by the gate
    v3, _ = rebuild(client, 0.92)
    promote(client, "widget", v2.version, "operator prefers it")
    assert champion_version(client, "widget").version == v2.version
    assert rollback(client, "widget").version == v3.version
    assert rollback(client, "widget").version == v1.version
    with pytest.raises(ValueError, match="no earlier champion"):
        rollback(client, "widget")
    assert client.get_model_version_by_alias(registered_model_name("widget"), CHAMPION).version == v1.version


def test_rollback_without_champion_is_a_clear_error(client):
    rebuild(client, 0.9)
    with pytest.raises(ValueError, match="widget: no earlier champion"):
        rollback(client, "widget")
