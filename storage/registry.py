"""The MLflow model registry per product line: versions, the `challenger` / `champion` aliases, the gate."""

from __future__ import annotations

import dataclasses
import getpass
import json
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from patchline.models.config import GATE_METRICS, PromotionConfig
from patchline.storage.tag_names import (
    ACCEPTED_TAG_PREFIX, APPROVAL_TAG, DECISION_TAG, EVENT_TAG_PREFIX, LEGACY_HISTORY_TAG, PROMOTED_AT_TAG,
    REASON_TAG, TEST_FINGERPRINT_TAG)

CHAMPION = "champion"
CHALLENGER = "challenger"
GATE = "gate"
AWAITING_APPROVAL = "awaiting approval"


def registered_model_name(line: str) -> str:
    return f"patchline-{line}"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    rule: str = ""  # the rule that rejected, or "" when the challenger was promoted


@dataclass(frozen=True)
class OperatingPoint:
    """One version's deciding detector at its own threshold on the test set the gate compares on."""

    miss_rate: float                   # share of test defects scored below the threshold
    fpr: float                         # share of test goods scored at or above it
    threshold: float | None = None     # None where the version's own scale is not comparable (re-scored)
    good_spread: float | None = None   # 1.4826 x MAD of its held-out good scores


@dataclass(frozen=True)
class GateEvidence:
    """What the gate decides on: the promotion metric, every value measured on the challenger's test set."""

    detector: str                      # the deciding detector (the champion's, once a line has one)
    challenger: dict[str, float]       # its metric per detector, `detector` included
    test_images: int                   # good + anomalous test images behind those values
    champion: str | None = None        # the champion version read (None: the line has none yet)
    champion_value: float | None = None             # the champion's deciding detector's metric
    champion_detectors: dict[str, float] = field(default_factory=dict)  # per detector, where logged
    floor: tuple[str, float] | None = None          # (version, metric) of the best champion ever on this test set
    challenger_point: OperatingPoint | None = None
    champion_point: OperatingPoint | None = None


def decide_promotion(evidence: GateEvidence, rule: PromotionConfig) -> GateDecision:
    """Promote the first version; later ones only when no rule objects. The reason names the deciding rule."""
    value = evidence.challenger[evidence.detector]
    better = 1.0 if GATE_METRICS[rule.metric] == "higher" else -1.0
    name = f"{rule.metric} ({GATE_METRICS[rule.metric]} is better)"
    if evidence.champion is None:
        small = f"; only {evidence.test_images} test images" if evidence.test_images < rule.min_test_images else ""
        return GateDecision(True, f"first version for this line ({rule.metric} = {value:.4f}{small})")
    if value != value:  # NaN: the metric could not be computed
        return GateDecision(False, f"rule nan: challenger {rule.metric} is NaN", "nan")
    if evidence.test_images < rule.min_test_images:
        return GateDecision(False, f"rule min_test_images: only {evidence.test_images} test images (fewer than "
                                   f"{rule.min_test_images}) are too little evidence to replace v{evidence.champion}; "
                                   f"promote it by hand (`patchline promote`) if it is good", "min_test_images")
    checks = [("champion", f"champion v{evidence.champion}", evidence.champion_value)]
    if evidence.detector in evidence.champion_detectors:
        checks.append(("same_detector", f"champion v{evidence.champion}'s {evidence.detector}",
                       evidence.champion_detectors[evidence.detector]))
    if evidence.floor is not None:
        checks.append(("floor", f"the best champion ever on this test set, v{evidence.floor[0]},", evidence.floor[1]))
    compared = []
    for rule_name, against, reference in checks:
        delta = better * (value - reference)
        verdict = (f"challenger {evidence.detector} {name} {value:.4f} vs {against} {reference:.4f} "
                   f"(Δ {value - reference:+.4f}")
        if delta < -rule.tolerance:
            return GateDecision(False, f"rule {rule_name}: {verdict}, tolerance {rule.tolerance})", rule_name)
        compared.append(f"{verdict})")
    for detector, reference in sorted(evidence.champion_detectors.items()):
        now = evidence.challenger.get(detector)
        if now is not None and better * (now - reference) < -rule.max_detector_drop:
            return GateDecision(False, f"rule max_detector_drop: {detector} {rule.metric} went from {reference:.4f} "
                                       f"to {now:.4f} (worse by more than {rule.max_detector_drop}); "
                                       "check the training images", "max_detector_drop")
    objection = _operating_point_objection(evidence, rule)
    if objection is not None:
        return objection
    return GateDecision(True, "; ".join(compared) + f"; tolerance {rule.tolerance}")


def _operating_point_objection(evidence: GateEvidence, rule: PromotionConfig) -> GateDecision | None:
    """The rules on what each version decides at its own threshold: misses, false alarms, threshold rise."""
    new, old = evidence.challenger_point, evidence.champion_point
    if new is None or old is None:
        return None
    versus = f"champion v{evidence.champion}"
    for rule_name, what, now, before, tolerance in (
            ("miss_rate", "misses", new.miss_rate, old.miss_rate, rule.max_miss_rate_increase),
            ("fpr", "flags", new.fpr, old.fpr, rule.max_fpr_increase)):
        if now - before > tolerance:
            share = "test defects" if rule_name == "miss_rate" else "test goods"
            return GateDecision(False, f"rule {rule_name}: at its threshold the challenger's {evidence.detector} "
                                       f"{what} {now:.4f} of the {share}, {versus} {before:.4f} (more by "
                                       f"{now - before:.4f}, tolerance {tolerance})", rule_name)
    if None not in (new.threshold, old.threshold, old.good_spread) and old.good_spread > 0:
        rise = (new.threshold - old.threshold) / old.good_spread
        if rise > rule.max_threshold_rise:
            return GateDecision(False, f"rule threshold_rise: the challenger's {evidence.detector} threshold "
                                       f"{new.threshold:.4f} is {rise:.2f} good-score spreads above {versus}'s "
                                       f"{old.threshold:.4f} (spread {old.good_spread:.4f}, tolerance "
                                       f"{rule.max_threshold_rise}); were defective images added as good?",
                                "threshold_rise")
    return None


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
               read_champion: str | None, hold: bool = False) -> bool:
    """Record the decision on the version and its run, and move `champion` only when it says promote and
    no person's approval is awaited (`hold`).

    Compare-and-set: when `champion` no longer points at `read_champion` (the version the decision was
    made against), nothing is written and False comes back, so the caller decides again."""
    current = champion_version(client, line)
    if (str(current.version) if current else None) != read_champion:
        return False
    said = AWAITING_APPROVAL if hold else "promoted" if decision.promote else "rejected"
    for key, value in ((DECISION_TAG, said), (REASON_TAG, decision.reason)):
        client.set_model_version_tag(version.name, version.version, key, value)
        if version.run_id:
            client.set_tag(version.run_id, key, value)
    if decision.promote and not hold:
        _make_champion(client, line, str(version.version), ChampionEvent(str(version.version), "", GATE, "promoted",
                                                                         decision.reason))
    return True


@dataclass(frozen=True)
class ChampionEvent:
    """One change of a line's champion: who or what made `version` champion, when and why."""

    version: str
    at: str       # ISO time, UTC
    by: str       # "gate", or the person (the user name of the process that ran the command)
    action: str   # "promoted" (the gate), "promoted by hand" or "rolled back"
    reason: str


def champion_timeline(client: MlflowClient, line: str) -> list[ChampionEvent]:
    """Every change of the line's champion, oldest first (champions from before the record: time and reason '?');
    none for a line without a registered model."""
    try:
        tags = client.get_registered_model(registered_model_name(line)).tags
    except MlflowException:
        return []
    legacy = [ChampionEvent(v, "?", "?", "promoted", "?") for v in tags.get(LEGACY_HISTORY_TAG, "").split(",") if v]
    return legacy + [ChampionEvent(**json.loads(tags[key])) for key in sorted(tags) if key.startswith(EVENT_TAG_PREFIX)]


def champion_stack(events: list[ChampionEvent]) -> list[str]:
    """The versions `rollback` can return to, the current champion last: each rollback withdraws the top."""
    stack: list[str] = []
    for event in events:
        if event.action == "rolled back":
            del stack[-1:]
        else:
            stack.append(event.version)
    return stack


def gate_floor(client: MlflowClient, line: str, metric: str, test_fingerprint: str) -> tuple[str, float] | None:
    """(version, value) of the best `metric` that any champion the line ever had measured on this test set.

    Every champion on record counts, not a recent window: equal-quality promotions in between would push
    the best one out of a window, and a run of slightly worse versions could then walk the line down."""
    name = registered_model_name(line)
    seen = []
    for version in dict.fromkeys(event.version for event in champion_timeline(client, line)):
        run = client.get_run(client.get_model_version(name, version).run_id)
        if run.data.tags.get(TEST_FINGERPRINT_TAG) == test_fingerprint and metric in run.data.metrics:
            seen.append((version, run.data.metrics[metric]))
    better = max if GATE_METRICS[metric] == "higher" else min
    return better(seen, key=lambda item: item[1]) if seen else None


def promote(client: MlflowClient, line: str, version: str, reason: str) -> ModelVersion:
    """Move `champion` to `version` by hand; the gate's own tags on it stay, the record gains the event."""
    name = registered_model_name(line)
    chosen = client.get_model_version(name, version)
    _make_champion(client, line, str(chosen.version),
                   ChampionEvent(str(chosen.version), "", getpass.getuser(), "promoted by hand", reason))
    return client.get_model_version(name, version)


def rollback(client: MlflowClient, line: str, reason: str = "rolled back by hand") -> ModelVersion:
    """Give `champion` back to the version that held it before the current one; a second rollback goes
    further back through the record."""
    name = registered_model_name(line)
    stack = champion_stack(champion_timeline(client, line))
    if len(stack) < 2:
        raise ValueError(f"line {line}: no earlier champion to roll back to (champions on record: "
                         f"{', '.join('v' + v for v in stack) or 'none'})")
    current, previous = stack[-1], stack[-2]
    _make_champion(client, line, previous,
                   ChampionEvent(previous, "", getpass.getuser(), "rolled back", f"{reason} (from v{current})"))
    return client.get_model_version(name, previous)


def _make_champion(client: MlflowClient, line: str, version: str, event: ChampionEvent) -> None:
    name = registered_model_name(line)
    now = datetime.now(timezone.utc)
    event = dataclasses.replace(event, at=now.isoformat(timespec="seconds"), reason=event.reason[:4000])
    client.set_model_version_tag(name, version, PROMOTED_AT_TAG, now.isoformat())
    # The key sorts by time; the random tail keeps two changes in the same microsecond apart.
    key = f"{EVENT_TAG_PREFIX}{now.strftime('%Y%m%dT%H%M%S%f')}-{secrets.token_hex(3)}"
    client.set_registered_model_tag(name, key, json.dumps(dataclasses.asdict(event)))
    client.set_registered_model_alias(name, CHAMPION, version)


def apply_approval(client: MlflowClient, line: str, version: str, read_champion: str | None, approve: bool,
                   reviewer: str | None, note: str) -> tuple[bool, str]:
    """A person's answer to a version that passed the gate (`reviewer` None: nobody answered, `note` says
    so): approved, it becomes champion if `champion` still points where the gate read it; either way the
    answer is a tag on the version and its run. Returns whether it became champion and what happened."""
    name = registered_model_name(line)
    chosen = client.get_model_version(name, version)
    current = champion_version(client, line)
    moved = (str(current.version) if current else None) != read_champion
    if approve and not moved:
        said = f"approved by {reviewer}" + (f": {note}" if note else "")
        _make_champion(client, line, version, ChampionEvent(version, "", reviewer, "promoted", said))
    elif approve:
        said = (f"approved by {reviewer}, but champion moved to v{current.version} while it waited; not promoted "
                "(rebuild, or `patchline promote`)")
    elif reviewer is None:
        said = note
    else:
        said = f"rejected by {reviewer}" + (f": {note}" if note else "")
    promoted = approve and not moved
    for key, value in ((APPROVAL_TAG, said), (DECISION_TAG, "promoted" if promoted else "rejected")):
        client.set_model_version_tag(name, version, key, value)
        if chosen.run_id:
            client.set_tag(chosen.run_id, key, value)
    return promoted, said


def accept_images(client: MlflowClient, line: str, images: dict[str, str], reason: str) -> None:
    """Record that a reviewer found these images (id → path) good: the screen passes them from now on."""
    name = registered_model_name(line)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ValueError(f"line {line} has no model yet: nothing is screened before its first version") from None
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for image_id, path in images.items():
        record = {"path": path, "by": getpass.getuser(), "at": at, "reason": reason[:4000]}
        client.set_registered_model_tag(name, f"{ACCEPTED_TAG_PREFIX}{image_id}", json.dumps(record))


def accepted_images(client: MlflowClient, line: str) -> dict[str, dict[str, str]]:
    """The images a reviewer accepted for the line, by image id: path, by whom, when and why."""
    tags = client.get_registered_model(registered_model_name(line)).tags
    return {key.removeprefix(ACCEPTED_TAG_PREFIX): json.loads(value) for key, value in tags.items()
            if key.startswith(ACCEPTED_TAG_PREFIX)}
