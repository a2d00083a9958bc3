"""Prefect deployments: one nightly rebuild per product line on its own cron, plus batch scoring."""

from __future__ import annotations

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

from patchline.flows.rebuild import rebuild_product_line
from patchline.flows.score import score_images
from patchline.storage.line_config import bundled_line_files, load_line

SCORE_DEPLOYMENT = "score-images"


def line_deployments(lines: list[str] | None = None) -> list[RunnerDeployment]:
    """A `rebuild-<line>` deployment per line (its config as the parameter) and the scoring deployment.

    The config is captured when deploying: after editing a line's YAML, deploy again.
    """
    deployments = []
    for name in lines or list(bundled_line_files()):
        config = load_line(name)
        deployments.append(rebuild_product_line.to_deployment(
            name=f"rebuild-{config.name}", parameters={"config": config.model_dump(mode="json")},
            schedules=[Cron(config.schedule.cron, timezone=config.schedule.timezone)],
            tags=["patchline", config.name], description=config.description or f"Nightly rebuild of {config.name}"))
    deployments.append(score_images.to_deployment(name=SCORE_DEPLOYMENT, tags=["patchline"],
                                                  description="Score image files with a line's champion model"))
    return deployments


def register(lines: list[str] | None = None) -> list[str]:
    """Create or update the deployments in the configured Prefect API; returns their ids."""
    return [str(deployment.apply()) for deployment in line_deployments(lines)]


def serve_deployments(lines: list[str] | None = None) -> None:
    """Register the deployments and run them here until stopped (SIGTERM; `serve` ignores Ctrl-C once)."""
    serve(*line_deployments(lines))
