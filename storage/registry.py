"""The MLflow model registry per product line: versions, the `challenger` / `champion` aliases, the gate."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from patchline.models.config import GATE_METRICS, PromotionConfig

CHAMPION = "champion"
CHALLENGER = "challenger"
PROMOTED_AT_TAG = "patchline.promoted_at"
DECISION_TAG = "patchline.gate.decision"
REASON_TAG = "patchline.gate.reason"
HISTORY_TAG = "patchline.champion_history"


def registered_model_name(line: str) -> str:
    return f"patchline-{line}"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


@dataclass(frozen=True)
class GateEvidence:
    """What the gate decides on: the promotion metric, every value measured on the challenger's test set."""

    detector: str                      # the challenger's deciding detector
    challenger: dict[str, float]       # its metric per detector, `detector` included
    test_images: int                   # good + anomalous test images behind those values
    champion: str | None = None        # the champion version read (None: the line has none yet)
    champion_value: float | None = None             # the champion's deciding detector's metric
    champion_detectors: dict[str, float] = field(default_factory=dict)  # per detector, where logged
    best_recent: tuple[str, float] | None = None    # (version, metric) of the best recent champion


def decide_promotion(evidence: GateEvidence, rule: PromotionConfig) -> GateDecision:
    """Promote the first version; later ones only when no rule objects. The reason names the deciding rule."""
    value = evidence.challenger[evidence.detector]
    better = 1.0 if GATE_METRICS[rule.metric] == "higher" else -1.0
    name = f"{rule.metric} ({GATE_METRICS[rule.metric]} is better)"
    if evidence.champion is None:
        small = f"; only {evidence.test_images} test images" if evidence.test_images < rule.min_test_images else ""
        return GateDecision(True, f"first version for this line ({rule.metric} = {value:.4f}{small})")
    if value != value:  # NaN: the metric could not be computed
        return GateDecision(False, f"rule nan: challenger {rule.metric} is NaN")
    if evidence.test_images < rule.min_test_images:
        return GateDecision(False, f"rule min_test_images: only {evidence.test_images} test images (fewer than "
                                   f"{rule.min_test_images}) are too little evidence to replace v{evidence.champion}; "
                                   f"promote it by hand (`patchline promote`) if it is good")
    checks = [("champion", f"champion v{evidence.champion}", evidence.champion_value)]
    if evidence.detector in evidence.champion_detectors:
        checks.append(("same_detector", f"champion v{evidence.champion}'s {evidence.detector}",
                       evidence.champion_detectors[evidence.detector]))
    if evidence.best_recent is not None:
        checks.append(("history", f"best recent champion v{evidence.best_recent[0]}", evidence.best_recent[1]))
    compared = []
    for rule_name, against, reference in checks:
        delta = better * (value - reference)
        verdict = (f"challenger {evidence.detector} {name} {value:.4f} vs {against} {reference:.4f} "
                   f"(Δ {value - reference:+.4f}")
        if delta < -rule.tolerance:
            return GateDecision(False, f"rule {rule_name}: {verdict}, tolerance {rule.tolerance})")
        compared.append(f"{verdict})")
    for detector, reference in sorted(evidence.champion_detectors.items()):
        now = evidence.challenger.get(detector)
        if now is not None and better * (now - reference) < -rule.max_detector_drop:
            return GateDecision(False, f"rule max_detector_drop: {detector} {rule.metric} went from {reference:.4f} "
                                       f"to {now:.4f} (worse by more than {rule.max_detector_drop}); "
                                       "check the training images")
    return GateDecision(True, "; ".join(compared) + f"; tolerance {rule.tolerance}")


def champion_version(client: MlflowClient, line: str) -> ModelVersion | None:
    """The version behind the line's `champion` alias, or None when there is none yet."""
    try:
        return client.get_model_version_by_alias(registered_model_name(line), CHAMPION)
    except MlflowException:
        return None


def register_version(client: MlflowClient, line: str, model_uri: str, run_id: str) -> ModelVersion:
    """Register a new version of the line's model and point `challenger` at it."""
    name = registered_model_name(line)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=f"patchline anomaly detector for product line {line}")
    # A retried task must not register the same run twice.
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    # A tracking server accepts a `models:/<model id>` source only with that id (a local store does not ask).
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = existing[0] if existing else client.create_model_version(name, model_uri, run_id=run_id,
                                                                        model_id=model_id)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def apply_gate(client: MlflowClient, line: str, version: ModelVersion, decision: GateDecision,
               read_champion: str | None) -> bool:
    """Record the decision on the version and its run, and move `champion` only when it says promote.

    Compare-and-set: when `champion` no longer points at `read_champion` (the version the decision was
    made against), nothing is written and False comes back, so the caller decides again."""
    current = champion_version(client, line)
    if (str(current.version) if current else None) != read_champion:
        return False
    for key, value in ((DECISION_TAG, "promoted" if decision.promote else "rejected"), (REASON_TAG, decision.reason)):
        client.set_model_version_tag(version.name, version.version, key, value)
        if version.run_id:
            client.set_tag(version.run_id, key, value)
    if decision.promote:
        _make_champion(client, line, version.version)
    return True


def recent_champions(client: MlflowClient, line: str, count: int) -> list[ModelVersion]:
    """The line's last `count` champions, oldest first (the history `rollback` walks)."""
    name = registered_model_name(line)
    return [client.get_model_version(name, version) for version in _champion_history(client, line)[-count:]]


def promote(client: MlflowClient, line: str, version: str, reason: str) -> ModelVersion:
    """Move `champion` to `version` by hand; the reason is kept on the version."""
    name = registered_model_name(line)
    chosen = client.get_model_version(name, version)
    client.set_model_version_tag(name, version, REASON_TAG, reason)
    client.set_model_version_tag(name, version, DECISION_TAG, "promoted by hand")
    _make_champion(client, line, chosen.version)
    return client.get_model_version(name, version)


def rollback(client: MlflowClient, line: str) -> ModelVersion:
    """Give `champion` back to the version that held it before the current one."""
    name = registered_model_name(line)
    history = _champion_history(client, line)
    if len(history) < 2:
        raise ValueError(f"line {line}: no earlier champion to roll back to (champion history: {history or 'empty'})")
    current, previous = history[-1], history[-2]
    client.set_model_version_tag(name, previous, DECISION_TAG, "restored by rollback")
    client.set_model_version_tag(name, previous, REASON_TAG, f"rollback from version {current}")
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1]))
    return client.get_model_version(name, previous)


def _champion_history(client: MlflowClient, line: str) -> list[str]:
    tags = client.get_registered_model(registered_model_name(line)).tags
    return [v for v in tags.get(HISTORY_TAG, "").split(",") if v]


def _make_champion(client: MlflowClient, line: str, version: str) -> None:
    name = registered_model_name(line)
    client.set_model_version_tag(name, version, PROMOTED_AT_TAG, datetime.now(timezone.utc).isoformat())
    client.set_registered_model_alias(name, CHAMPION, version)
    # The alias alone forgets who held it before; the history is what `rollback` walks back through.
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(_champion_history(client, line) + [str(version)]))
