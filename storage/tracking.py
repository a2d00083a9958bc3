"""MLflow tracking: where runs live, one experiment per product line, and what a run records."""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from patchline.models.config import LineConfig
from patchline.storage.locks import exclusive_lock
from patchline.storage.paths import patchline_home
from patchline.storage.tag_names import ERROR_TAG, EXPERIMENT_KIND_TAG, KILLED_TAG


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when the user has a server, else a SQLite file under `PATCHLINE_HOME`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = patchline_home() / "mlflow"
    database = folder / "mlflow.db"
    if not database.is_file():
        _create_database(database)
    return f"sqlite:///{database}"


def _create_database(database: Path) -> None:
    """Create the SQLite store whole or not at all, one process at a time.

    MLflow creates its tables on first use, in many steps: two first runs at once both fail on each
    other's tables, and one that dies half-way (a full disk) leaves a file every later run fails on.
    So the tables are made in a scratch file under a lock, and the file takes its name only when done.
    """
    database.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(database.with_suffix(".lock"), "creating the MLflow database"):
        if database.is_file():  # another process made it while this one waited
            return
        scratch = database.with_suffix(".creating")
        scratch.unlink(missing_ok=True)
        MlflowClient(f"sqlite:///{scratch}").search_experiments(max_results=1)
        os.replace(scratch, database)


class TrackingUnreachableError(RuntimeError):
    """The MLflow tracking server does not answer; the message names its URL."""


def ensure_tracking_reachable(timeout_s: float = 10.0) -> str:
    """The tracking URI, once a server behind it answers its health check (a local store always does).

    MLflow's own client retries a dead server for minutes; a rebuild should fail before it does any work.
    """
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return uri
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return uri
            problem = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as error:
        problem = str(getattr(error, "reason", error))
    raise TrackingUnreachableError(f"MLflow tracking server {uri} does not answer its health check ({problem}); "
                                   "start it or fix MLFLOW_TRACKING_URI")


def artifact_root() -> Path:
    return patchline_home() / "mlflow" / "artifacts"


def configure_mlflow() -> MlflowClient:
    """Point MLflow's tracking and registry at the configured store and return a client for it."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def experiment_name(line: str) -> str:
    return f"patchline-{line}"


# MLflow 3's UI opens an experiment in its GenAI view unless its EXPERIMENT_KIND_TAG names model training,
MODEL_TRAINING = "custom_model_development"
# ... and its navigation in GenAI mode unless a link asks for model training; patchline's links do.
MODEL_TRAINING_VIEW = "?workflowType=machine_learning"


def line_experiment_id(client: MlflowClient, line: str) -> str:
    """The line's experiment, created on first use with an explicit artifact folder on a local store.

    Without `artifact_location` MLflow would put a local store's artifacts under the current directory of
    whichever process created the database, which differs between the CLI, workers and tests. A tracking
    server chooses the location itself: with `--serve-artifacts` clients then send artifacts over HTTP,
    so workers on other machines need no shared folder.
    """
    name = experiment_name(line)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING:
            client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return existing.experiment_id
    tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING}
    if client.tracking_uri.startswith(("http://", "https://")):
        return client.create_experiment(name, tags=tags)
    location = artifact_root() / line
    location.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=location.as_uri(), tags=tags)


def config_params(config: LineConfig) -> dict[str, str]:
    """The whole line config as flat `section.key` params, the way the MLflow UI compares runs."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = str(value)

    walk("", config.model_dump(mode="json"))
    return flat


# Settings that say when, where or how a line is rebuilt, described and exported, not which model it gets.
# Which images a line reads is the data fingerprint's business (source, on_bad_input): a moved folder or
# a few more images must not count as other model settings, or no rebuild could reuse its champion.
_NOT_MODEL_SETTINGS = ("description", "schedule", "dask_address", "source", "on_bad_input", "export_onnx")


def model_config_fingerprint(config: LineConfig) -> str:
    """Changes whenever a setting that shapes the model changes, or patchline's version does."""
    settings = {key: value for key, value in config_params(config).items()
                if key.split(".")[0] not in _NOT_MODEL_SETTINGS}
    text = json.dumps({"patchline": version("patchline"), **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mark_stale_runs(client: MlflowClient, line: str, killed: bool) -> list[str]:
    """End the line's runs still RUNNING, with a tag saying why; returns their ids. `killed`: the last
    rebuild was killed (KILLED); else it ended with an error it could not record (FAILED), as when the
    disk under the MLflow store was full.

    Only for a caller that holds the line's rebuild lock: then no live rebuild owns those runs.
    """
    experiment = client.get_experiment_by_name(experiment_name(line))
    if experiment is None:
        return []
    stale = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    for run in stale:
        if killed:
            client.set_tag(run.info.run_id, KILLED_TAG,
                           "left RUNNING by a rebuild that was killed; found by the next one")
        else:
            client.set_tag(run.info.run_id, ERROR_TAG, "the rebuild failed and could not record it here (the MLflow "
                                                       "store could not be written then, e.g. a full disk); its "
                                                       "Prefect flow run and log say why. Found by the next rebuild")
        client.set_terminated(run.info.run_id, "KILLED" if killed else "FAILED")
    return [run.info.run_id for run in stale]
