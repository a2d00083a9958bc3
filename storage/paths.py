"""Where patchline keeps its state: one data directory, `PATCHLINE_HOME`.

The default is `.patchline/` in the current working directory (as MLflow's `./mlruns`), so a checkout
and an installed wheel behave alike and nothing is written next to the installed code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Telemetry would try the network, which these machines do not have; each also logs errors when it fails.
_OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


class NotWritableError(RuntimeError):
    """A folder patchline must write to cannot be written; the message names it and what it is for."""


def home_path() -> Path:
    """Where `PATCHLINE_HOME` points, whether or not the folder exists yet."""
    return Path(os.environ.get("PATCHLINE_HOME", ".patchline")).expanduser().resolve()


def patchline_home() -> Path:
    """The data directory holding Prefect's home, the MLflow store and the feature stores."""
    home = home_path()
    home.mkdir(parents=True, exist_ok=True)
    return home


def ensure_writable(folder: Path, what: str, remedy: str) -> Path:
    """`folder`, created if need be, once it took a probe file; else one error naming it, what it is
    for and what to do."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise NotWritableError(f"{what}: cannot write to {folder} ({error.strerror or error}); {remedy}") from None
    return folder


def ensure_writable_home() -> Path:
    """The home, once it and each folder directly in it are writable.

    A read-only home otherwise fails deep inside Prefect's and MLflow's SQLite code, with a traceback each.
    """
    remedy = "make it writable or set PATCHLINE_HOME to a folder you can write"
    home = ensure_writable(home_path(), "PATCHLINE_HOME", remedy)
    for folder in sorted(child for child in home.iterdir() if child.is_dir()):
        ensure_writable(folder, "PATCHLINE_HOME", remedy)
    return home


def work_folders(line: str) -> Path:
    """Where a rebuild of `line` writes its plots, manifest and bundle before logging them to MLflow, one
    subfolder per MLflow run; each is removed when its run ends."""
    return patchline_home() / "runs" / line


def configure_environment() -> Path:
    """Point Prefect at `PATCHLINE_HOME` and turn telemetry off; call before Prefect is imported."""
    home = home_path()
    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    # MLflow draws a progress bar per artifact download, one for every model load.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The local API Prefect starts for a run needs longer than its 20 s default on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return home
