"""The MLflow model registry per product line: versions, the `challenger` / `champion` aliases, the gate."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from patchline.models.config import PromotionConfig

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


def decide_promotion(challenger: float, champion: float | None, rule: PromotionConfig) -> GateDecision:
    """Promote when there is no champion yet, or the challenger is not worse by more than the tolerance."""
    if champion is None:
        return GateDecision(True, f"first version for this line ({rule.metric} = {challenger:.4f})")
    if challenger != challenger:  # NaN: the metric could not be computed
        return GateDecision(False, f"challenger {rule.metric} is NaN")
    delta = challenger - champion
    verdict = f"challenger {rule.metric} {challenger:.4f} vs champion {champion:.4f} (Δ {delta:+.4f}, tolerance {rule.tolerance})"
    return GateDecision(delta >= -rule.tolerance, verdict)


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
    version = existing[0] if existing else client.create_model_version(name, model_uri, run_id=run_id)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def apply_gate(client: MlflowClient, line: str, version: ModelVersion, decision: GateDecision) -> None:
    """Record the decision on the version and its run, and move `champion` only when it says promote."""
    for key, value in ((DECISION_TAG, "promoted" if decision.promote else "rejected"), (REASON_TAG, decision.reason)):
        client.set_model_version_tag(version.name, version.version, key, value)
        if version.run_id:
            client.set_tag(version.run_id, key, value)
    if decision.promote:
        _make_champion(client, line, version.version)


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
