"""Reading line configs inside a flow, so a bad config file shows as a failed task in the Prefect UI."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from patchline.models.config import LineConfig
from patchline.storage.line_config import bundled_line_files, load_line


def configured_lines() -> list[str]:
    """The names of the line configs that ship with patchline."""
    return list(bundled_line_files())


@task(name="load-line-config", cache_policy=NO_CACHE)
def load_line_task(name_or_path: str) -> LineConfig:
    """A bundled line's name or a config file's path → its validated config."""
    return load_line(name_or_path)
