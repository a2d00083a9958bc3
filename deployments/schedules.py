"""Prefect deployments: one nightly rebuild per product line on its own cron, plus batch scoring."""

from __future__ import annotations

from prefect import get_client, serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron

from patchline.flows.rebuild import rebuild_product_line
from patchline.flows.score import score_images
from patchline.storage.line_config import bundled_line_files, load_line

SCORE_DEPLOYMENT = "score-images"


class WorkPoolError(LookupError):
    """The work pool named for the deployments does not exist in the Prefect API."""


def line_deployments(lines: list[str] | None = None, *,
                     entrypoint_type: EntrypointType = EntrypointType.FILE_PATH) -> list[RunnerDeployment]:
    """A `rebuild-<line>` deployment per line (its config as the parameter) and the scoring deployment.

    The config is captured when deploying: after editing a line's YAML, deploy again.
    """
    deployments = []
    for name in lines or list(bundled_line_files()):
        config = load_line(name)
        deployments.append(rebuild_product_line.to_deployment(
            name=f"rebuild-{config.name}", parameters={"config": config.model_dump(mode="json")},
            schedules=[Cron(config.schedule.cron, timezone=config.schedule.timezone)],
            tags=["patchline", config.name], description=config.description or f"Nightly rebuild of {config.name}",
            entrypoint_type=entrypoint_type))
    deployments.append(score_images.to_deployment(name=SCORE_DEPLOYMENT, tags=["patchline"],
                                                  description="Score image files with a line's champion model",
                                                  entrypoint_type=entrypoint_type))
    return deployments


def register(lines: list[str] | None = None, work_pool: str | None = None) -> list[str]:
    """Create or update the deployments in the configured Prefect API; returns their ids.

    With `work_pool`, the pool's workers run them (`prefect worker start --pool <name>`). Their entrypoint
    is then the installed module (`patchline.flows.rebuild:...`), not a file of this checkout, so a
    worker needs patchline installed, not this folder, and no source is pulled."""
    if work_pool is None:
        return [str(deployment.apply()) for deployment in line_deployments(lines)]
    _check_work_pool(work_pool)
    return [str(deployment.apply(work_pool_name=work_pool))
            for deployment in line_deployments(lines, entrypoint_type=EntrypointType.MODULE_PATH)]


def _check_work_pool(name: str) -> None:
    try:
        with get_client(sync_client=True) as client:
            client.read_work_pool(name)
    except ObjectNotFound:
        raise WorkPoolError(f"work pool {name!r} does not exist in the Prefect API; create it with "
                            f"`prefect work-pool create {name} --type process`") from None


def serve_deployments(lines: list[str] | None = None) -> None:
    """Register the deployments and run them here until stopped (SIGTERM; `serve` ignores Ctrl-C once)."""
    serve(*line_deployments(lines))
