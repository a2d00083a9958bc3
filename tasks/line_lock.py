"""One rebuild per line at a time, and the debris of a killed one cleared by the next.

The lock is a file under `PATCHLINE_HOME/locks/` (storage/locks.py): the kernel frees it when its
holder dies, so it needs no cleanup itself. Rebuilds open their MLflow run only once they hold it, so
the holder knows that any MLflow run of the line still RUNNING was killed; the Prefect flow run of a
killed holder is the one it left recorded in the lock file (rebuilds waiting for the lock are RUNNING
in Prefect too, and are left alone).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TERMINAL_STATES
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

from patchline.models.config import LineConfig
from patchline.storage.locks import exclusive_lock
from patchline.storage.paths import patchline_home, work_folders
from patchline.storage.tracking import configure_mlflow, mark_stale_runs


@contextmanager
def rebuild_lock(line: str, wait: bool, flow_run_id: str | None) -> Iterator[str | None]:
    """Held for a whole rebuild of `line`; busy: wait, or `LockBusyError` naming the running rebuild.
    Yields the flow run id of a rebuild that held the lock and was killed, if one did."""
    with exclusive_lock(patchline_home() / "locks" / f"rebuild-{line}.lock", f"rebuild of {line}", wait,
                        {"flow_run_id": flow_run_id}) as previous:
        yield previous.get("flow_run_id")


@task(name="clear-killed-runs", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def clear_killed_runs_task(config: LineConfig, killed_flow_run_id: str | None) -> int:
    """Mark the line's MLflow runs left RUNNING as KILLED when the last holder was killed (it left its flow
    run id in the lock), else as FAILED (it ended with an error it could not record), and a killed
    holder's flow run CRASHED; remove the work folders ended runs left; returns how many runs were marked."""
    log = get_run_logger()
    was_killed = killed_flow_run_id is not None
    killed = mark_stale_runs(configure_mlflow(), config.name, was_killed)
    for run_id in killed:
        log.warning("MLflow run %s of %s was left RUNNING by a %s: marked %s", run_id, config.name,
                    "killed rebuild" if was_killed else "rebuild that failed and could not record it",
                    "KILLED" if was_killed else "FAILED")
    # The lock holder is the line's only rebuild, so every work folder there now is a dead run's.
    folders = work_folders(config.name)
    left = sorted(folders.iterdir()) if folders.is_dir() else []
    for folder in left:
        shutil.rmtree(folder, ignore_errors=True)
    if left:
        log.info("removed %d work folder(s) of ended rebuilds of %s", len(left), config.name)
    if killed_flow_run_id is None:
        return len(killed)
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(UUID(killed_flow_run_id))
        except ObjectNotFound:  # recorded by a rebuild against another Prefect API
            return len(killed)
        if run.state_type in TERMINAL_STATES:
            return len(killed)
        client.set_flow_run_state(run.id, Crashed(message="its process was killed; found by the next rebuild"),
                                  force=True)
    log.warning("Prefect flow run %s was left %s by a killed rebuild: marked CRASHED", run.name, run.state_type.value)
    return len(killed) + 1
