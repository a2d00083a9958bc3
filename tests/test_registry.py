"""The champion gate and hand promotion against a real MLflow SQLite store."""

from __future__ import annotations

import dataclasses

import mlflow
import pytest

from patchline.models.config import PromotionConfig
from patchline.storage.registry import (
    CHALLENGER, CHAMPION, GateEvidence, OperatingPoint, apply_gate, champion_stack, champion_timeline,
    champion_version, decide_promotion, gate_floor, promote, register_version, registered_model_name, rollback)
from patchline.storage.tag_names import DECISION_TAG, REASON_TAG, TEST_FINGERPRINT_TAG
from patchline.storage.tracking import configure_mlflow, line_experiment_id

RULE = PromotionConfig(metric="image_auroc", tolerance=0.01, min_test_images=30)


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHLINE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return configure_mlflow()


def evidence(value: float, champion_value: float | None = None, **changes) -> GateEvidence:
    """The deciding detector (PatchCore) at `value` against a champion v1 at `champion_value` (None: none)."""
    base = GateEvidence("patchcore", {"patchcore": value}, test_images=100,
                        champion=None if champion_value is None else "1", champion_value=champion_value)
    return dataclasses.replace(base, **changes)


def rebuild(client, auroc: float, rule: PromotionConfig = RULE):
    """One finished rebuild: a run with its metric and an artifact, registered and gated as the task does."""
    experiment = line_experiment_id(client, "widget")
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_metrics({"image_auroc": auroc, "patchcore_image_auroc": auroc})
        mlflow.set_tag(TEST_FINGERPRINT_TAG, "same test set")
        mlflow.log_text(f"auroc {auroc}", "model/summary.txt")
    current = champion_version(client, "widget")
    gathered = evidence(auroc)
    if current is not None:
        gathered = evidence(auroc, client.get_run(current.run_id).data.metrics["image_auroc"],
                            champion=str(current.version),
                            floor=gate_floor(client, "widget", "image_auroc", "same test set"))
    decision = decide_promotion(gathered, rule)
    version = register_version(client, "widget", f"{run.info.artifact_uri}/model", run.info.run_id)
    assert apply_gate(client, "widget", version, decision, gathered.champion)
    return version, run.info.run_id


def test_decide_promotion_rules():
    assert decide_promotion(evidence(0.80), RULE).promote
    assert decide_promotion(evidence(0.80, 0.805), RULE).promote  # within tolerance
    worse = decide_promotion(evidence(0.80, 0.82), RULE)
    assert not worse.promote and worse.reason.startswith("rule champion:") and "vs champion v1 0.8200" in worse.reason
    assert not decide_promotion(evidence(float("nan"), 0.5), RULE).promote
    few = decide_promotion(evidence(0.99, 0.80, test_images=20), RULE)
    assert not few.promote and few.reason.startswith("rule min_test_images:") and "patchline promote" in few.reason
    assert decide_promotion(evidence(0.99, test_images=20), RULE).promote  # a first version has no rival
    # The deciding detector against the champion's same detector, not only against what it deployed.
    switched = evidence(0.90, 0.85, detector="oesdn", challenger={"oesdn": 0.90, "patchcore": 0.95},
                        champion_detectors={"oesdn": 0.97, "patchcore": 0.96})
    assert decide_promotion(switched, RULE).reason.startswith("rule same_detector:")
    # A collapsing detector blocks promotion although the deciding one improved (poisoned training images).
    poisoned = evidence(0.95, 0.90, detector="oesdn", challenger={"oesdn": 0.95, "patchcore": 0.30},
                        champion_detectors={"oesdn": 0.90, "patchcore": 1.00})
    blocked = decide_promotion(poisoned, RULE)
    assert not blocked.promote and blocked.reason.startswith("rule max_detector_drop: patchcore")
    floor = decide_promotion(evidence(0.93, 0.94, floor=("3", 0.95)), RULE)
    assert not floor.promote and floor.reason.startswith("rule floor:") and floor.rule == "floor"


def test_the_operating_point_rules_each_with_its_direction_and_tolerance():
    """Both versions at their own thresholds on the same test set: more misses, more false alarms or a
    threshold lifted by defects among the "good" images reject a challenger whose AUROC is as good."""
    champion = OperatingPoint(miss_rate=0.0, fpr=0.01, threshold=27.89, good_spread=3.0)

    def decide(point: OperatingPoint):
        return decide_promotion(evidence(1.0, 1.0, challenger_point=point, champion_point=champion), RULE)

    # The first scenario of issue 32: AUROC stayed 1.0, one defect in 24 was missed at a threshold 14 up.
    missed = decide(OperatingPoint(0.042, 0.01, 42.32, 3.1))
    assert not missed.promote and missed.rule == "miss_rate" and "0.0420 of the test defects" in missed.reason
    lifted = decide(OperatingPoint(0.0, 0.01, 42.32, 3.1))
    assert not lifted.promote and lifted.rule == "threshold_rise" and "4.81 good-score spreads" in lifted.reason
    alarms = decide(OperatingPoint(0.0, 0.05, 27.0, 3.0))
    assert not alarms.promote and alarms.rule == "fpr"
    # Within each tolerance, and better in the other direction (a lower threshold, fewer misses): promoted.
    assert decide(OperatingPoint(0.015, 0.02, 30.0, 3.0)).promote
    assert decide(OperatingPoint(0.0, 0.0, 10.0, 3.0)).promote
    # A champion re-scored on a new test set without a comparable threshold: the rates still count.
    rescored = OperatingPoint(0.0, 0.01)
    assert decide_promotion(evidence(1.0, 1.0, challenger_point=OperatingPoint(0.0, 0.01, 99.0, 3.0),
                                     champion_point=rescored), RULE).promote


def test_two_hundred_nights_of_slightly_worse_challengers_stay_on_the_floor():
    """Issue 32's slide: nights alternate a challenger slightly worse than the champion (within the tolerance)
    with one equal to it. A recent-champions window forgot the best and the line sank from 0.95 to 0.852; the
    floor over every champion ever keeps it within the tolerance of its best."""
    champions = [0.95]
    for night in range(200):
        current = champions[-1]
        challenger = current - 0.0049 if night % 2 == 0 else current
        decision = decide_promotion(evidence(challenger, current, floor=("1", max(champions))), RULE)
        if decision.promote:
            champions.append(challenger)
        else:
            assert decision.rule == "floor"
    assert 0.95 - champions[-1] <= RULE.tolerance and min(champions) >= 0.95 - RULE.tolerance
    assert len(champions) > 100, "equal challengers keep being promoted: the floor does not freeze the line"


def test_lower_is_better_metrics_are_gated_the_right_way():
    rule = PromotionConfig(metric="fpr_at_threshold", tolerance=0.01)
    assert decide_promotion(evidence(0.02, 0.10), rule).promote
    assert not decide_promotion(evidence(0.10, 0.02), rule).promote


def test_a_run_of_slightly_worse_challengers_cannot_walk_the_line_down(client):
    versions = [rebuild(client, 0.950 - step * 0.0049)[0] for step in range(10)]
    champion = champion_version(client, "widget")
    # Each is within tolerance of the one before, but only those within it of the best (0.950) get in.
    assert 0.950 - client.get_run(champion.run_id).data.metrics["image_auroc"] <= RULE.tolerance
    assert champion.version == versions[2].version
    rejected = client.get_model_version(registered_model_name("widget"), versions[3].version).tags
    assert rejected[DECISION_TAG] == "rejected" and rejected[REASON_TAG].startswith("rule floor:")


def test_the_gate_does_not_move_a_champion_that_moved_since_it_read_it(client):
    v1, _ = rebuild(client, 0.90)
    v2, _ = rebuild(client, 0.80)  # rejected
    decision = decide_promotion(evidence(0.95, 0.90, champion=str(v1.version)), RULE)
    promote(client, "widget", v2.version, "operator")  # meanwhile, by hand
    v3 = register_version(client, "widget", "runs:/x/model", client.get_model_version(
        registered_model_name("widget"), v2.version).run_id)
    assert not apply_gate(client, "widget", v3, decision, str(v1.version))
    assert champion_version(client, "widget").version == v2.version


def test_first_version_becomes_champion_and_a_worse_one_does_not(client):
    first, first_run = rebuild(client, 0.90)
    assert champion_version(client, "widget").version == first.version
    worse, worse_run = rebuild(client, 0.70)
    name = registered_model_name("widget")
    assert champion_version(client, "widget").version == first.version
    assert client.get_model_version_by_alias(name, CHALLENGER).version == worse.version
    tags = client.get_model_version(name, worse.version).tags
    assert tags[DECISION_TAG] == "rejected" and "0.7000 vs champion v1 0.9000" in tags[REASON_TAG]
    assert client.get_run(worse_run).data.tags[DECISION_TAG] == "rejected"
    assert client.get_run(first_run).data.tags[DECISION_TAG] == "promoted"
    better, _ = rebuild(client, 0.95)
    assert champion_version(client, "widget").version == better.version


def test_hand_promotion_and_rollback_add_to_the_record_and_walk_back(client):
    v1, _ = rebuild(client, 0.90)
    v2, _ = rebuild(client, 0.60)  # rejected by the gate
    v3, _ = rebuild(client, 0.92)
    name = registered_model_name("widget")
    gate_reason = client.get_model_version(name, v2.version).tags[REASON_TAG]
    promote(client, "widget", v2.version, "operator prefers it")
    assert champion_version(client, "widget").version == v2.version
    # The gate's own decision on v2 stays; the hand promotion is an event of its own.
    tags = client.get_model_version(name, v2.version).tags
    assert tags[DECISION_TAG] == "rejected" and tags[REASON_TAG] == gate_reason
    assert rollback(client, "widget", "line stopped twice").version == v3.version
    assert rollback(client, "widget").version == v1.version  # the second goes further back, not forth
    with pytest.raises(ValueError, match="no earlier champion"):
        rollback(client, "widget")
    assert client.get_model_version_by_alias(name, CHAMPION).version == v1.version
    events = champion_timeline(client, "widget")
    assert [(e.version, e.action) for e in events] == [
        ("1", "promoted"), ("3", "promoted"), ("2", "promoted by hand"), ("3", "rolled back"), ("1", "rolled back")]
    assert events[0].by == "gate" and events[0].reason.startswith("first version")
    assert events[2].reason == "operator prefers it" and events[2].by not in ("gate", "")
    assert events[3].reason == "line stopped twice (from v2)" and events[4].reason == "rolled back by hand (from v3)"
    assert all(e.at.endswith("+00:00") for e in events)
    assert champion_stack(events) == ["1"]
    # A later gate promotion starts a new top; rollback returns to v1 again.
    v4, _ = rebuild(client, 0.95)
    assert champion_version(client, "widget").version == v4.version
    assert rollback(client, "widget").version == v1.version


def test_rollback_without_champion_is_a_clear_error(client):
    rebuild(client, 0.9)
    with pytest.raises(ValueError, match="widget: no earlier champion"):
        rollback(client, "widget")


def test_a_line_without_a_model_has_an_empty_record_and_rollback_says_so(client):
    assert champion_timeline(client, "nothing-yet") == []
    with pytest.raises(ValueError, match="nothing-yet: no earlier champion .*champions on record: none"):
        rollback(client, "nothing-yet")
