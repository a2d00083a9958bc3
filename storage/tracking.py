"""MLflow tracking: where runs live, one experiment per product line, and what a run records."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from patchline.models.config import LineConfig
from patchline.storage.paths import patchline_home


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when the user has a server, else a SQLite file under `PATCHLINE_HOME`."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    folder = patchline_home() / "mlflow"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


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


def line_experiment_id(client: MlflowClient, line: str) -> str:
    """The line's experiment, created on first use with an explicit artifact folder.

    Without `artifact_location` MLflow would put artifacts under the current directory of whichever
    process created the database, which differs between the CLI, workers and tests.
    """
    name = experiment_name(line)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = artifact_root() / line
    location.mkdir(parents=True, exist_ok=True)
    return client.create_experiment(name, artifact_location=location.as_uri())


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
