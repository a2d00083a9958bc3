"""What the gate (storage/registry.py) decides on, and the decision carried out: the challenger's metrics
and operating point, the champion's on the same test set (as its run logged them, or re-scored), the
floor, and the registration that moves `champion` only if nothing moved it meanwhile."""

from __future__ import annotations

import csv
import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import mlflow
import numpy as np
from mlflow import MlflowClient

from patchline.models.config import LineConfig
from patchline.models.scoring.metrics import error_rates_at_threshold, image_auroc
from patchline.storage.manifest import ManifestRow
from patchline.storage.pixels import read_pixels
from patchline.storage.registry import (
    GateDecision, GateEvidence, OperatingPoint, apply_gate, champion_version, decide_promotion, gate_floor,
    register_version)
from patchline.storage.tag_names import DECISION_DETECTOR_TAG, TEST_FINGERPRINT_TAG

# Each rebuild logs its test rows' scores here; the gate reads a champion's back when the test set is the same.
TEST_SCORES_ARTIFACT = "data/test_scores.csv"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChampionScores:
    """The champion's deciding detector on this rebuild's test rows (NaN for ambiguous rows it was not
    re-scored on), with its own threshold."""

    version: str
    detector: str
    scores: np.ndarray
    threshold: float


@dataclass(frozen=True)
class GateResult:
    version: str
    decision: GateDecision
    evidence: GateEvidence
    champion_scores: ChampionScores | None
    awaiting_approval: bool


def gate_challenger(client: MlflowClient, config: LineConfig, run_id: str, model_uri: str,
                    metrics: dict[str, dict[str, float]], detector: str, test_rows: Sequence[ManifestRow],
                    fingerprint: str) -> GateResult:
    """Decide on the challenger (its `metrics` per detector on `test_rows`, `detector` deciding), register it
    as `challenger`, and move `champion` only if the gate says so (with `promotion.approval: manual`, a
    challenger that passes waits for a person instead).

    Everything the decision needs is read before the registry is touched, and `champion` moves only if it
    still points where the decision read it (else the gate decides again)."""
    metric = config.promotion.metric
    challenger = {name: values[metric] for name, values in metrics.items() if metric in values}
    if detector not in challenger:
        raise ValueError(f"line {config.name}: promotion metric {metric!r} was not measured for the deciding "
                         f"detector {detector} (pixel metrics need ground-truth masks); the registry is untouched")
    test_images = sum(1 for row in test_rows if row.label != "ambiguous")
    own = metrics[detector]
    point = OperatingPoint(own["miss_rate_at_threshold"], own["fpr_at_threshold"], own["threshold"],
                           own.get("good_spread"))
    hold = config.promotion.approval == "manual"
    version, scores = None, None
    for _ in range(3):
        current = champion_version(client, config.name)
        evidence = GateEvidence(detector, challenger, test_images, challenger_point=point)
        if current is not None:
            evidence, scores = _champion_evidence(client, config, current, test_rows, fingerprint, evidence)
        decision = decide_promotion(evidence, config.promotion)
        waits = hold and decision.promote and current is not None
        version = version or register_version(client, config.name, model_uri, run_id)
        if apply_gate(client, config.name, version, decision, evidence.champion, hold=waits):
            return GateResult(str(version.version), decision, evidence, scores, waits)
        log.warning("champion of %s moved while the gate decided; deciding again", config.name)
    raise RuntimeError(f"line {config.name}: champion kept moving while the gate decided; v{version.version} "
                       "stays challenger only")


def _champion_evidence(client: MlflowClient, config: LineConfig, champion, test_rows: Sequence[ManifestRow],
                       fingerprint: str, evidence: GateEvidence) -> tuple[GateEvidence, ChampionScores | None]:
    """The champion's metrics and operating point on this rebuild's test set (logged if it saw the same set,
    else re-scored), the floor (the best value of any champion the line ever had on this test set), and the
    champion's per-image scores where they are known."""
    metric, detector = config.promotion.metric, evidence.detector
    run = client.get_run(champion.run_id)
    logged = run.data.metrics
    detectors: dict[str, float] = {}
    # Thresholds come from held-out good images, not from the test set: comparable either way.
    threshold, spread = logged.get(f"{detector}_threshold"), logged.get(f"{detector}_good_spread")
    same = run.data.tags.get(DECISION_DETECTOR_TAG) == detector
    if run.data.tags.get(TEST_FINGERPRINT_TAG) == fingerprint and metric in logged:
        value = logged[metric]
        detectors = {name: logged[f"{name}_{metric}"] for name in evidence.challenger if f"{name}_{metric}" in logged}
        point = OperatingPoint(logged[f"{detector}_miss_rate_at_threshold"], logged[f"{detector}_fpr_at_threshold"],
                               threshold, spread) if f"{detector}_miss_rate_at_threshold" in logged else None
        scores = _logged_scores(run, champion, test_rows)
    elif metric == "image_auroc":
        scores = _rescored(champion, run.data.tags.get(DECISION_DETECTOR_TAG, "?"), test_rows)
        known = ~np.isnan(scores.scores)
        is_anomaly = np.array([row.label == "anomaly" for row in test_rows])[known]
        value = image_auroc(scores.scores[known], is_anomaly)
        fpr, miss_rate = error_rates_at_threshold(scores.scores[known], is_anomaly, scores.threshold)
        point = OperatingPoint(miss_rate, fpr, threshold if same else None, spread)
    else:
        raise ValueError(f"the champion was evaluated on another test set and only image_auroc can be "
                         f"re-scored here, not {metric!r}")
    return dataclasses.replace(evidence, champion=str(champion.version), champion_value=value,
                               champion_detectors=detectors, floor=gate_floor(client, config.name, metric, fingerprint),
                               champion_point=point), scores


def _logged_scores(run, champion, test_rows: Sequence[ManifestRow]) -> ChampionScores | None:
    """The champion's test scores as its run logged them (None for runs from before they were)."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=TEST_SCORES_ARTIFACT,
                                                       dst_path=folder)
        except (OSError, mlflow.exceptions.MlflowException):
            return None
        with open(path, newline="") as handle:
            logged = {row["id"]: row for row in csv.DictReader(handle)}
    if not logged or any(row.id not in logged for row in test_rows):
        return None
    threshold = float(next(iter(logged.values()))["threshold"])
    return ChampionScores(str(champion.version), run.data.tags.get(DECISION_DETECTOR_TAG, "?"),
                          np.array([float(logged[row.id]["score"]) for row in test_rows]), threshold)


def _rescored(champion, detector: str, test_rows: Sequence[ManifestRow]) -> ChampionScores:
    """The champion's deciding scores on this test set (NaN for the ambiguous rows), scored now."""
    model = mlflow.pyfunc.load_model(f"models:/{champion.name}/{champion.version}")
    known = [i for i, row in enumerate(test_rows) if row.label != "ambiguous"]
    scores = np.full(len(test_rows), np.nan)
    threshold = float("nan")
    for start in range(0, len(known), 32):
        chosen = known[start:start + 32]
        result = model.predict([read_pixels(test_rows[i].source) for i in chosen])
        scores[chosen] = result["score"]
        threshold = float(result["threshold"][0])
    return ChampionScores(str(champion.version), detector, scores, threshold)
