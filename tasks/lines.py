"""Reading line configs inside a flow, so a bad config file shows as a failed task in the Prefect UI, and the
fleet view the nightly publishes."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from patchline.models.config import LineConfig
from patchline.storage.fleet import line_status
from patchline.storage.line_config import bundled_line_files, load_line
from patchline.storage.tracking import configure_mlflow


def configured_lines() -> list[str]:
    """The names of the line configs that ship with patchline."""
    return list(bundled_line_files())


@task(name="load-line-config", cache_policy=NO_CACHE)
def load_line_task(name_or_path: str) -> LineConfig:
    """A bundled line's name or a config file's path → its validated config."""
    return load_line(name_or_path)


@task(name="publish-fleet-status", cache_policy=NO_CACHE)
def publish_fleet_task(configs: list[LineConfig]) -> list[dict[str, str]]:
    """The fleet view (`patchline status`) of these lines as a Prefect table artifact."""
    now = datetime.now(timezone.utc)
    client = configure_mlflow()
    rows = [line_status(client, config, now).row(now) for config in configs]
    create_table_artifact(table=rows, key="fleet-status",
                          description="Each line's champion, its last rebuild and why, and missed schedules")
    return rows
