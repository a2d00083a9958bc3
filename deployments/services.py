"""The servers patchline starts as child processes on 127.0.0.1: the Prefect and MLflow UIs behind
`patchline ui`, and a line's model over MLflow's REST API behind `patchline serve`."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from patchline.storage.locks import exclusive_lock
from patchline.storage.paths import patchline_home
from patchline.storage.registry import CHAMPION, registered_model_name
from patchline.storage.serving import MODEL_URI_ENV, ServingLimits
from patchline.storage.tracking import artifact_root, tracking_uri

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
_LOG_TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class ServiceError(RuntimeError):
    """A server exited or did not become healthy."""


@dataclass(frozen=True)
class Service:
    name: str
    url: str
    health_url: str
    process: subprocess.Popen
    log_path: Path


@dataclass(frozen=True)
class RunningUis:
    prefect: Service
    mlflow: Service

    @property
    def services(self) -> tuple[Service, Service]:
        return self.prefect, self.mlflow


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` (a socket merely in TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # The servers bind with SO_REUSEADDR too, so only a live listener stops them, as it stops this.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return True
    return False


def _log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join("    " + line for line in lines)


def _stop_with_parent() -> None:
    # Runs in the child before exec: the kernel sends it SIGTERM when the process that started it dies,
    # even by SIGKILL, when no cleanup code of the parent can run.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _launch(name: str, argv: list[str], env: dict[str, str], port: int, health_path: str,
            stop_with_parent: bool = False) -> Service:
    logs = patchline_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name.lower().replace(' ', '-')}.log"
    with log_path.open("w") as log:
        # A new session: terminal Ctrl-C reaches only `patchline ui`, which then stops the servers in
        # order, and the whole process group (MLflow's uvicorn child included) can be signalled.
        # cwd is the data directory so stray defaults (./mlruns, ./mlartifacts) land there.
        process = subprocess.Popen(argv, env={**os.environ, **env}, cwd=patchline_home(),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=_stop_with_parent if stop_with_parent else None)
    url = f"http://{HOST}:{port}"
    logger.info("started %s (pid %d), log: %s", name, process.pid, log_path)
    return Service(name, url, url + health_path, process, log_path)


# The services a flow run of a CLI command needs: task runs reach the database only as events that the
# task-run recorder writes (without it the UI shows no stage), the event persister keeps the run's event
# feed, and pause expirations end an approval that nobody answered. The scheduler and the rest serve
# deployments and work pools, which such an API has none of.
_API_ONLY_SERVICES_OFF = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "REPOSSESSOR", "CANCELLATION_CLEANUP",
                          "TRIGGERS", "EVENT_LOGGER")


def start_prefect_server(port: int, api_only: bool = False) -> Service:
    """`prefect server start` with its database under `PATCHLINE_HOME/prefect`; not yet healthy.

    `api_only`: no UI and only the services a CLI command's flow runs need, stopped by the kernel if its
    parent dies."""
    env = {"PREFECT_HOME": str(patchline_home() / "prefect"),
           "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    if api_only:
        argv += ["--no-ui"]
        env.update({f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in _API_ONLY_SERVICES_OFF})
    else:
        # The UI's pages call the API at this address; Prefect's default names port 4200 whatever the port.
        env["PREFECT_UI_API_URL"] = f"http://{HOST}:{port}/api"
    return _launch("Prefect API" if api_only else "Prefect server", argv, env, port, "/api/health",
                   stop_with_parent=api_only)


def ui_api_file() -> Path:
    """Where `patchline ui` leaves its Prefect API's URL while it runs, for other commands to use."""
    return patchline_home() / "prefect" / "ui-api-url"


def running_ui_api() -> str | None:
    """The API URL of a `patchline ui` running on this home, if it answers now."""
    try:
        url = ui_api_file().read_text().strip()
    except OSError:
        return None
    return url if url and _answers(url.removesuffix("/api") + "/api/health") else None


@contextmanager
def local_prefect_api(timeout_s: float = 180.0) -> Iterator[str]:
    """A Prefect API for this process's flows, its URL in the settings inside the block: the one of a
    `patchline ui` running on this home (its UI then shows the runs at once), else one on a free port.

    Prefect's own temporary server is an ordinary child: when a CLI run is killed it lives on (about
    250 MB) for good. Ours is stopped by the kernel when its parent dies, however it dies."""
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    shared = running_ui_api()
    if shared is not None:
        logger.info("using the Prefect API of `patchline ui`: %s", shared)
        with temporary_settings(updates={PREFECT_API_URL: shared}):
            try:
                yield shared.removesuffix("/api")
            finally:
                APILogWorker.drain_all(timeout=10)
        return
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    database = patchline_home() / "prefect" / "prefect.db"
    # A server creates and migrates its SQLite database as it starts: first runs started together in
    # an empty home would migrate one database at once, and all but one fail. The first creates it while
    # the others wait; once it exists, servers start side by side.
    creating = exclusive_lock(database.with_suffix(".lock"), "creating the Prefect database") \
        if not database.exists() else contextlib.nullcontext()
    with creating:
        server = start_prefect_server(port, api_only=True)
        try:
            wait_until_healthy((server,), timeout_s)
        except BaseException:
            stop_services((server,))
            raise
    try:
        with temporary_settings(updates={PREFECT_API_URL: f"{server.url}/api"}):
            try:
                yield server.url
            finally:
                # The runs' last log lines wait in Prefect's queue for the next batch; sent after the
                # server stops, they fail with a connection error on the console.
                APILogWorker.drain_all(timeout=10)
    finally:
        stop_services((server,))


def start_mlflow_server(port: int) -> Service:
    """`mlflow server` on the patchline tracking store, one worker; not yet healthy."""
    store = tracking_uri()
    if store.startswith(("http://", "https://")):
        raise ValueError(f"MLFLOW_TRACKING_URI={store} names a remote server; `patchline ui` starts an "
                         "MLflow UI only for a local store: unset MLFLOW_TRACKING_URI or open that server's UI")
    artifacts = artifact_root()
    artifacts.mkdir(parents=True, exist_ok=True)
    # The defaults start ~15 processes and ~3 GB; one worker and no job runner need ~0.5 GB.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
            "--default-artifact-root", artifacts.as_uri(), "--host", HOST, "--port", str(port),
            "--workers", "1"]
    return _launch("MLflow server", argv, env, port, "/health")


def start_model_server(line: str, port: int, version: str | None = None,
                       limits: ServingLimits | None = None) -> Service:
    """The line's champion (or `version`) served by patchline's scoring app (storage/serving.py: MLflow's
    scoring protocol within `limits`) under uvicorn, in this environment; not yet healthy."""
    name = registered_model_name(line)
    model_uri = f"models:/{name}/{version}" if version else f"models:/{name}@{CHAMPION}"
    env = {"MLFLOW_TRACKING_URI": tracking_uri(), "MLFLOW_DISABLE_TELEMETRY": "true", MODEL_URI_ENV: model_uri,
           **(limits or ServingLimits()).environment()}
    argv = [sys.executable, "-m", "uvicorn", "--factory", "patchline.storage.serving:create_app", "--host", HOST,
            "--port", str(port), "--workers", "1", "--no-access-log"]
    return _launch(f"model server {line}", argv, env, port, "/ping")


@contextmanager
def serving_model(line: str, port: int = 5001, version: str | None = None, timeout_s: float = 180.0,
                  limits: ServingLimits | None = None) -> Iterator[Service]:
    """The line's model served and healthy inside the block, stopped when it exits (however it exits)."""
    if port_in_use(port):
        raise ValueError(f"port {port}: {HOST}:{port} is already in use; stop that server or choose another port")
    server = start_model_server(line, port, version, limits)
    try:
        wait_until_healthy((server,), timeout_s)
        yield server
    finally:
        stop_services((server,))


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_until_healthy(services: tuple[Service, ...], timeout_s: float) -> None:
    """Poll each health URL until it answers 200; `ServiceError` naming the log if one exits or times out."""
    pending = list(services)
    began = time.monotonic()
    deadline = began + timeout_s
    while pending:
        for service in list(pending):
            code = service.process.poll()
            if code is not None:
                raise ServiceError(f"{service.name} exited with code {code} while starting; "
                                   f"see {service.log_path}:\n{_log_tail(service.log_path)}")
            if _answers(service.health_url):
                logger.info("%s healthy after %.1f s", service.name, time.monotonic() - began)
                pending.remove(service)
        if pending and time.monotonic() > deadline:
            names = ", ".join(f"{s.name} ({s.health_url}; log {s.log_path})" for s in pending)
            raise ServiceError(f"not healthy after {timeout_s:.0f} s: {names}")
        if pending:
            time.sleep(0.5)


def _signal_group(service: Service, signum: int) -> None:
    try:
        os.killpg(service.process.pid, signum)
    except ProcessLookupError:
        pass


def _group_alive(service: Service) -> bool:
    try:
        os.killpg(service.process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_services(services: tuple[Service, ...], grace_s: float = 15.0) -> None:
    """SIGTERM every server's process group, then SIGKILL what is still there after `grace_s`."""
    for service in services:
        _signal_group(service, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for service in services:
        try:
            service.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            logger.warning("%s ignored SIGTERM for %.0f s; killing it", service.name, grace_s)
            _signal_group(service, signal.SIGKILL)
            service.process.wait()
        # A child can outlive its parent by a moment (MLflow's uvicorn worker).
        while _group_alive(service) and time.monotonic() < deadline:
            time.sleep(0.1)
        _signal_group(service, signal.SIGKILL)
        logger.info("stopped %s (exit code %s)", service.name, service.process.returncode)


@contextmanager
def running_uis(prefect_port: int = 4200, mlflow_port: int = 5000,
                timeout_s: float = 180.0) -> Iterator[RunningUis]:
    """Both servers started and healthy inside the block, both stopped when it exits (however it exits)."""
    if prefect_port == mlflow_port:
        raise ValueError(f"the Prefect and MLflow ports are both {prefect_port}; give them different ports")
    for name, port in (("Prefect", prefect_port), ("MLflow", mlflow_port)):
        if port_in_use(port):
            raise ValueError(f"{name} port {port}: {HOST}:{port} is already in use "
                             "(a server still running?); stop it or choose another port")
    started: list[Service] = []
    try:
        # MLflow first: its store check can refuse to start, and then nothing needs stopping.
        started.append(mlflow := start_mlflow_server(mlflow_port))
        started.append(prefect := start_prefect_server(prefect_port))
        wait_until_healthy(tuple(started), timeout_s)
        ui_api_file().write_text(f"{prefect.url}/api\n")
        yield RunningUis(prefect, mlflow)
    finally:
        ui_api_file().unlink(missing_ok=True)
        stop_services(tuple(started))


def block_until_one_exits(services: tuple[Service, ...], poll_s: float = 1.0) -> NoReturn:
    """Block while the servers run; `ServiceError` naming the first that exits and its log."""
    while True:
        for service in services:
            code = service.process.poll()
            if code is not None:
                raise ServiceError(f"{service.name} exited with code {code}; "
                                   f"see {service.log_path}:\n{_log_tail(service.log_path)}")
        time.sleep(poll_s)
