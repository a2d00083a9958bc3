"""Where patchline keeps its state: one data directory, `PATCHLINE_HOME`.

The default is `.patchline/` in the current working directory (as MLflow's `./mlruns`), so a checkout
and an installed wheel behave alike and nothing is written next to the installed code.
"""

from __future__ import annotations

import os
from pathlib import Path

# Telemetry would try the network, which these machines do not have; each also logs errors when it fails.
_OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def patchline_home() -> Path:
    """The data directory holding Prefect's home, the MLflow store and the feature stores."""
    home = Path(os.environ.get("PATCHLINE_HOME", ".patchline")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def configure_environment() -> Path:
    """Point Prefect at `PATCHLINE_HOME` and turn telemetry off; call before Prefect is imported."""
    home = patchline_home()
    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    # MLflow draws a progress bar per artifact download, one for every model load.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The local API Prefect starts for a run needs longer than its 20 s default on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return home
