"""What a rebuild's run says happened, in the Prefect and MLflow run lists alike: its name
(`elpv-mono v7 promoted`, `elpv-mono v8 rejected: miss rate`, `elpv-mono unchanged`) and tags that MLflow
can show as columns."""

from __future__ import annotations

from dataclasses import dataclass, field

from patchline.storage.registry import GateDecision
from patchline.storage.tag_names import FIGURE_TAG, OUTCOME_TAG, VERSION_TAG
from patchline.tasks.screening import Screening

@dataclass(frozen=True)
class RebuildResult:
    """What `rebuild-product-line` returns: the version it made (or, when `skipped`, the champion it left in
    place, whose figures still stand), whether it became champion and why, and each detector's image AUROC."""

    line: str
    run_id: str
    version: str
    promoted: bool
    reason: str
    skipped: bool
    decision_detector: str
    image_auroc: dict[str, float]
    screening: Screening
    decision_reason: str = ""
    reuse: dict[str, str] = field(default_factory=dict)   # what was reused of the champion, by part
    left_out: dict[str, str] = field(default_factory=dict)  # detectors the self-check left out, with why


@dataclass(frozen=True)
class NightlySummary:
    """What `nightly` returns (also as its state's data when a line failed): each line's result or failure."""

    rebuilt: dict[str, RebuildResult]
    failed: dict[str, str]


# Names stay short enough to read in a run list; a reviewer's note can be long.
_NAME_LENGTH = 120


@dataclass(frozen=True)
class RunOutcome:
    outcome: str                 # promoted, rejected, awaiting approval, unchanged or failed
    name: str                    # the Prefect flow run's and the MLflow run's name
    version: str | None = None   # the registered version the run made, or the champion it left in place
    figure: str = ""             # the deciding detector's promotion metric, e.g. "patchcore image_auroc 0.9477"

    def tags(self) -> dict[str, str]:
        return {OUTCOME_TAG: self.outcome, VERSION_TAG: self.version or "", FIGURE_TAG: self.figure}


def gated(line: str, version: str, decision: GateDecision, figure: str, incremental: bool,
          awaiting_approval: bool = False, approved: bool | None = None, answer: str = "") -> RunOutcome:
    """The outcome of a rebuild that reached the gate (and, where it waited for one, of a person's `answer`)."""
    how = "incremental, " if incremental else ""
    if awaiting_approval:
        outcome, said = "awaiting approval", "awaiting approval"
    elif approved is not None:
        outcome, said = "promoted" if approved else "rejected", answer
    elif decision.promote:
        outcome, said = "promoted", "promoted"
    else:
        outcome, said = "rejected", f"rejected: {decision.rule.replace('_', ' ')}"
    return RunOutcome(outcome, f"{line} v{version} {how}{said}"[:_NAME_LENGTH], version, figure)


def unchanged(line: str, champion: str, screening: Screening) -> RunOutcome:
    quarantined = f", {len(screening.quarantined)} quarantined" if screening.quarantined else ""
    return RunOutcome("unchanged", f"{line} unchanged{quarantined}", champion)


def failed(line: str, error: BaseException) -> RunOutcome:
    return RunOutcome("failed", f"{line} failed: {type(error).__name__}")
