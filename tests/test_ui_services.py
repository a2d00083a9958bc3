"""`patchline ui`: real Prefect and MLflow servers on free ports, real HTTP, real shutdown."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from patchline.deployments.services import (
    ServiceError, port_in_use, running_uis, start_mlflow_server, stop_services, wait_until_healthy)

PATCHLINE = Path(sys.executable).parent / "patchline"


@pytest.fixture(scope="module")
def ui_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One home for the module: the second start skips the first-run database migrations."""
    return tmp_path_factory.mktemp("ui-home")


@pytest.fixture
def home_env(ui_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PATCHLINE_HOME", str(ui_home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return ui_home


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode(errors="replace")


def assert_both_answer(prefect_url: str, mlflow_url: str) -> None:
    status, page = get(prefect_url + "/")
    assert status == 200 and "<html" in page.lower()
    status, health = get(prefect_url + "/api/health")
    assert status == 200 and health.strip() == "true"
    status, page = get(mlflow_url + "/")
    assert status == 200 and "<html" in page.lower()
    status, body = get(mlflow_url + "/api/2.0/mlflow/experiments/search?max_results=1")
    assert status == 200 and '"experiments"' in body


def assert_gone(processes: list[psutil.Process], ports: tuple[int, ...]) -> None:
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert alive == []
    assert not any(port_in_use(port) for port in ports)


def test_running_uis_serve_both_then_stop_both(home_env: Path) -> None:
    ports = free_port(), free_port()
    with running_uis(*ports) as uis:
        assert (uis.prefect.url, uis.mlflow.url) == tuple(f"http://127.0.0.1:{p}" for p in ports)
        assert_both_answer(uis.prefect.url, uis.mlflow.url)
        servers = [psutil.Process(s.process.pid) for s in uis.services]
        processes = servers + [child for server in servers for child in server.children(recursive=True)]
    assert_gone(processes, ports)
    assert (home_env / "prefect" / "prefect.db").is_file()
    assert (home_env / "mlflow" / "mlflow.db").is_file()
    assert "Uvicorn running" in (home_env / "logs" / "mlflow-server.log").read_text()


def test_port_in_use_is_refused_before_anything_starts(home_env: Path) -> None:
    mlflow_port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(ValueError, match=f"Prefect port {taken}: 127.0.0.1:{taken} is already in use"):
            with running_uis(prefect_port=taken, mlflow_port=mlflow_port):
                pass
        with pytest.raises(ValueError, match="ports are both 4200"):
            with running_uis(prefect_port=4200, mlflow_port=4200):
                pass
        result = subprocess.run([str(PATCHLINE), "ui", "--prefect-port", str(free_port()),
                                 "--mlflow-port", str(taken)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"MLflow port {taken}: 127.0.0.1:{taken} is already in use" in result.stderr


def test_server_that_exits_while_starting_is_reported_with_its_log(
        home_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nothing")
    server = start_mlflow_server(free_port())
    try:
        with pytest.raises(ServiceError, match=r"MLflow server exited with code 1 while starting; "
                                               r"see .*mlflow-server\.log") as error:
            wait_until_healthy((server,), timeout_s=60)
    finally:
        stop_services((server,))
    assert "unsupported URI 'bogus://nothing'" in str(error.value)  # the log's tail comes with it


def test_remote_tracking_uri_is_refused(home_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI=http://mlflow.example:5000 names a remote server"):
        start_mlflow_server(free_port())


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def test_cli_prints_urls_and_ctrl_c_stops_both(home_env: Path) -> None:
    prefect_port, mlflow_port = free_port(), free_port()
    cli = subprocess.Popen([str(PATCHLINE), "ui", "--prefect-port", str(prefect_port),
                            "--mlflow-port", str(mlflow_port)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=read_lines, args=(cli.stdout, lines), daemon=True)
    reader.start()
    output = []
    try:
        deadline = time.monotonic() + 150
        while not any("Ctrl-C stops both" in line for line in output):
            output.append(lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
        printed = "".join(output)
        assert f"Prefect UI: http://127.0.0.1:{prefect_port}" in printed
        assert f"MLflow UI:  http://127.0.0.1:{mlflow_port}" in printed
        assert_both_answer(f"http://127.0.0.1:{prefect_port}", f"http://127.0.0.1:{mlflow_port}")
        processes = psutil.Process(cli.pid).children(recursive=True)
        assert len(processes) >= 2
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=60) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
    reader.join(timeout=10)
    while not lines.empty():
        output.append(lines.get())
    assert "Stopped the Prefect and MLflow servers." in "".join(output)
    assert_gone(processes, (prefect_port, mlflow_port))
