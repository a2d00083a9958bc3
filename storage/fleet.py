"""The fleet view: per line, its champion and how old it is, what its last rebuild did and why, and whether
a scheduled rebuild did not run. Read from the MLflow store alone, so it needs no Prefect API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from cronsim import CronSim
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from patchline.models.config import LineConfig
from patchline.storage.registry import champion_stack, champion_timeline, champion_version
from patchline.storage.tag_names import ERROR_TAG, REASON_TAG, SKIPPED_TAG
from patchline.storage.tracking import experiment_name

# A rebuild that started this long after its scheduled time still counts as that night's.
_GRACE_S = 3600


@dataclass(frozen=True)
class LineStatus:
    line: str
    champion: str | None         # version
    champion_since: datetime | None
    last_run: str | None         # the last rebuild's run name (its outcome, tasks/outcome.py)
    last_reason: str
    last_started: datetime | None
    missed: datetime | None      # the last scheduled time with no rebuild after it (lines rebuilt before)

    def row(self, now: datetime) -> dict[str, str]:
        """The status as a table row of text, the same in the CLI and the Prefect artifact."""
        return {"line": self.line,
                "champion": f"v{self.champion}" if self.champion else "none",
                "champion age": _age(now - self.champion_since) if self.champion_since else "–",
                "last rebuild": (f"{self.last_run} ({_age(now - self.last_started)} ago)" if self.last_run
                                 else "never"),
                "why": self.last_reason,
                "missed schedule": self.missed.isoformat(timespec="minutes") if self.missed else ""}


def line_status(client: MlflowClient, config: LineConfig, now: datetime | None = None) -> LineStatus:
    now = now or datetime.now(timezone.utc)
    champion = champion_version(client, config.name)
    since = None
    if champion is not None:
        events = champion_timeline(client, config.name)
        current = [e for e in events if e.version == str(champion.version) and e.at != "?"]
        if current and champion_stack(events)[-1:] == [str(champion.version)]:
            since = datetime.fromisoformat(current[-1].at)
    run = _last_run(client, config.name)
    started = datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc) if run else None
    tags = run.data.tags if run else {}
    reason = tags.get(ERROR_TAG) or tags.get(SKIPPED_TAG) or tags.get(REASON_TAG) or \
        ("running" if run and run.info.status == "RUNNING" else "")
    schedule = config.schedule
    due = next(CronSim(schedule.cron, now.astimezone(ZoneInfo(schedule.timezone)), reverse=True))
    # A line never rebuilt says so ("never"); a line in service that skipped its last schedule is named.
    missed = due if started is not None and started < due and (now - due).total_seconds() > _GRACE_S else None
    return LineStatus(config.name, str(champion.version) if champion else None, since,
                      run.info.run_name if run else None, reason[:300], started, missed)


def _last_run(client: MlflowClient, line: str):
    experiment = client.get_experiment_by_name(experiment_name(line))
    if experiment is None:
        return None
    try:
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    except MlflowException:
        return None
    return runs[0] if runs else None


def _age(delta) -> str:
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
