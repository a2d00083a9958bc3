"""Approval in the Prefect UI: with `promotion.approval: manual`, a challenger that passed the gate waits
(the flow run paused) for a person's answer, which becomes registry tags."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput

from patchline.storage.registry import apply_approval
from patchline.storage.tracking import configure_mlflow
from patchline.tasks.tracking import GateOutcome


class Approval(RunInput):
    """What the Prefect UI asks the reviewer (the form of the paused flow run)."""

    approve: bool
    reviewer: str
    note: str = ""


@task(name="apply-approval", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def apply_approval_task(line: str, outcome: GateOutcome, answer: Approval | None,
                        timeout_hours: float) -> tuple[bool, str]:
    """Record the answer (none: the wait timed out, and the champion stays); returns whether the version
    became champion, and what happened."""
    if answer is None:
        promoted, said = apply_approval(configure_mlflow(), line, outcome.version, outcome.champion, False, None,
                                        f"no answer within {timeout_hours:g} h; the champion stays")
    else:
        promoted, said = apply_approval(configure_mlflow(), line, outcome.version, outcome.champion, answer.approve,
                                        answer.reviewer.strip() or "an unnamed reviewer", answer.note)
    get_run_logger().info("%s v%s: %s", line, outcome.version, said)
    return promoted, said
