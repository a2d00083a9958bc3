"""Faults leave no bad state: real `patchline rebuild` processes of one line, one of them killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow import MlflowClient
from prefect.logging import disable_run_logger

from patchline.storage.feature_store import FeatureStore
from patchline.tasks.patchcore import feature_key, remove_orphaned_scratch
from tests.conftest import textured, write_image, write_line_config

PATCHLINE = str(Path(sys.executable).with_name("patchline"))


def line_config(folder: Path, root: Path, epochs: int) -> Path:
    # Many epochs and no early stop keep the first rebuild training until it is killed.
    return write_line_config(folder / f"widget-{epochs}.yaml", root, epochs=epochs, patience=epochs, batch_size=2,
                             max_train_seconds=300)


def wait_for_line(process: subprocess.Popen, text: str, timeout_s: float = 300) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"no {text!r} from the rebuild; it printed:\n{''.join(seen)[-3000:]}")


class ListeningSockets(threading.Thread):
    """Every address a process and its children listen on while it runs, polled every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.seen, self.done = pid, set(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            try:
                root = psutil.Process(self.pid)
                for process in [root, *root.children(recursive=True)]:
                    self.seen |= {(c.laddr.ip, c.laddr.port) for c in process.net_connections("inet")
                                  if c.status == psutil.CONN_LISTEN}
            except psutil.Error:  # a process ended between listing and reading
                continue


def test_one_rebuild_per_line_and_a_killed_one_is_cleaned_up_by_the_next(mvtec_root, tmp_path):
    env = {**os.environ, "PATCHLINE_HOME": str(tmp_path / "home")}
    for key in ("PREFECT_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(key, None)
    slow, quick = line_config(tmp_path, mvtec_root, 10_000), line_config(tmp_path, mvtec_root, 2)
    first = subprocess.Popen([PATCHLINE, "rebuild", str(slow)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    sockets = ListeningSockets(first.pid)
    sockets.start()
    children: list[psutil.Process] = []
    try:
        wait_for_line(first, "features:")  # extracted and stored; now training
        wait_for_line(first, "coreset:")  # the Dask cluster has run and closed
        second = subprocess.run([PATCHLINE, "rebuild", str(quick), "--no-wait"], env=env, capture_output=True,
                                text=True, timeout=300)
        assert second.returncode != 0
        assert "rebuild of widget: already running" in second.stderr and f"pid {first.pid}" in second.stderr
        children = psutil.Process(first.pid).children(recursive=True)
        assert children, "the CLI runs its flows against a Prefect API it started"
        sockets.done.set()
        sockets.join()
        # The Prefect API and the Dask dashboards, all on loopback.
        assert len(sockets.seen) >= 2 and {ip for ip, _ in sockets.seen} == {"127.0.0.1"}, sockets.seen
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"outlived the killed rebuild: {[p.cmdline() for p in alive]}"
    finally:
        first.kill()
        for child in children:
            if child.is_running():
                child.kill()

    debris = tmp_path / "home" / "runs" / "widget" / "0123abcd"  # a work folder an older version kept
    (debris / "plots").mkdir(parents=True)
    third = subprocess.run([PATCHLINE, "rebuild", str(quick)], env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert not list((tmp_path / "home" / "runs" / "widget").iterdir()), "no work folder outlives its run"
    assert "was left RUNNING by a killed rebuild: marked KILLED" in third.stderr
    assert "was left RUNNING by a killed rebuild: marked CRASHED" in third.stderr
    store = f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}"
    # The registry too: without it MlflowClient takes the registry URI an earlier test set in this process.
    client = MlflowClient(store, store)
    runs = client.search_runs([client.get_experiment_by_name("patchline-widget").experiment_id])
    assert sorted(run.info.status for run in runs) == ["FINISHED", "KILLED"]
    killed = next(run for run in runs if run.info.status == "KILLED")
    assert "killed" in killed.data.tags["patchline.killed"]

    from patchline.storage.line_config import load_line

    store = FeatureStore.open(tmp_path / "home" / "features", "widget", feature_key(load_line(quick)), read_only=True)
    assert len(store) == 8 and "" not in store.ids  # every image of the folder, once
    assert store.read(store.ids).any(axis=(1, 2)).all(), "every committed image has its features"


def test_coreset_scratch_of_a_dead_process_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan, live = tmp_path / f"coreset-{dead.pid}-abc", tmp_path / f"coreset-{os.getpid()}-def"
    for folder in (orphan, live):
        (folder / "part-0").mkdir(parents=True)
    with disable_run_logger():
        assert remove_orphaned_scratch(tmp_path) == [orphan]
    assert not orphan.exists() and live.is_dir()


@pytest.mark.parametrize(("section", "setting", "message"), [
    ("promotion", {"metric": "image_aucroc"}, "promotion metric 'image_aucroc' is not one a rebuild produces"),
    ("schedule", {"cron": "0 25 * * *"}, "cron '0 25 * * *' is not a valid 5-field cron expression"),
    ("schedule", {"timezone": "Europe/Atlantis"}, "timezone 'Europe/Atlantis' is not an IANA time zone name"),
])
def test_config_mistakes_are_found_before_any_work(tmp_path, mvtec_root, section, setting, message):
    from patchline.storage.line_config import LineConfigError, load_line

    path = tmp_path / "widget.yaml"
    path.write_text(yaml.safe_dump({"name": "widget", "source": {"kind": "mvtec", "root": str(mvtec_root)},
                                    section: setting}))
    with pytest.raises(LineConfigError, match="widget.yaml: invalid line config") as error:
        load_line(path)
    assert message in str(error.value)


FULL_DISK = """
import resource, signal
# A file-size limit is a full disk for this process alone: writes past it fail with EFBIG.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
# 640 KB: past the first migrations, short of the whole schema (with MLflow 3.17, 512-768 KB limits
# left a half-made database on the old code, 1 MB let it finish).
resource.setrlimit(resource.RLIMIT_FSIZE, (640 * 1024, 640 * 1024))
from patchline.storage.tracking import configure_mlflow
configure_mlflow().search_experiments()
"""


def test_a_full_disk_while_the_mlflow_database_is_created_does_not_brick_the_home(tmp_path):
    env = {**os.environ, "PATCHLINE_HOME": str(tmp_path / "home"), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    full = subprocess.run([sys.executable, "-c", FULL_DISK], env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode != 0 and "disk I/O error" in full.stderr, full.stderr[-2000:]
    after = subprocess.run([sys.executable, "-c", "from patchline.storage.tracking import configure_mlflow, "
                            "line_experiment_id; print(line_experiment_id(configure_mlflow(), 'widget'))"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr[-2000:]
    assert after.stdout.strip().isdigit()


def test_two_first_runs_at_once_both_get_the_mlflow_database(tmp_path):
    env = {**os.environ, "PATCHLINE_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    go = tmp_path / "go"
    code = ("import time, pathlib\n"
            f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
            "from patchline.storage.tracking import configure_mlflow, line_experiment_id\n"
            "import sys; print(line_experiment_id(configure_mlflow(), sys.argv[1]))\n")
    # Everything imported before the start, so both reach the database within milliseconds.
    starters = [subprocess.Popen([sys.executable, "-c", "import mlflow, patchline.storage.tracking\n" + code, line],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for line in ("line-a", "line-b")]
    time.sleep(8)
    go.touch()
    for starter in starters:
        out, errors = starter.communicate(timeout=300)
        assert starter.returncode == 0, errors[-2000:]
        assert out.strip().isdigit()


def many_images_line(folder: Path, count: int) -> Path:
    """A folder line big enough that extracting its features at 256 px takes some seconds."""
    root = folder / "many"
    for i in range(count):
        write_image(root / "train" / "good" / f"{i:04d}.png", textured(1000 + i, size=64))
    for i in range(10):
        write_image(root / "test" / "good" / f"{i:03d}.png", textured(3000 + i, size=64))
        write_image(root / "test" / "scratch" / f"{i:03d}.png", textured(4000 + i, size=64, rgb=True))
    return write_line_config(folder / "many.yaml", root, name="many", image_size=256, coreset_ratio=0.005,
                             calibration_fraction=0.1, batch_size=16)


def test_a_kill_during_extraction_then_two_rebuilds_at_once_on_the_stored_features(tmp_path):
    env = {**os.environ, "PATCHLINE_HOME": str(tmp_path / "home")}
    for key in ("PREFECT_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(key, None)
    config = many_images_line(tmp_path, 150)
    first = subprocess.Popen([PATCHLINE, "rebuild", str(config)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for_line(first, "ingested many")
        time.sleep(2)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert "features:" not in first.stderr.read(), "the kill should land during extraction"
    finally:
        first.kill()

    both = [subprocess.Popen([PATCHLINE, "rebuild", str(config)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=900) for process in both]
    for process, (out, errors) in zip(both, outputs):
        assert process.returncode == 0, errors[-3000:]
    waited = [out for out, errors in outputs if "rebuild of many: waiting for" in errors]
    assert len(waited) == 1
    # The one that waited finds the other's champion built from the same images and settings.
    assert "many: unchanged since v1: same images and model settings" in waited[0], waited[0]

    store = f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}"
    # The registry too: without it MlflowClient takes the registry URI an earlier test set in this process.
    client = MlflowClient(store, store)
    runs = client.search_runs([client.get_experiment_by_name("patchline-many").experiment_id])
    assert sorted(run.info.status for run in runs) == ["FINISHED", "FINISHED", "KILLED"]
    assert sum("patchline.skipped" in run.data.tags for run in runs) == 1
    name = "patchline-many"
    # Every registration points `challenger` at its version: still v1, so nothing was registered after it.
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1", outputs

    from patchline.storage.line_config import load_line

    features = tmp_path / "home" / "features"
    store = FeatureStore.open(features, "many", feature_key(load_line(config)), read_only=True)
    assert len(store) == 170 and len(set(store.ids)) == 170 and "" not in store.ids
    assert store.read(store.ids).any(axis=(1, 2)).all()
    assert not list(features.glob("coreset-*")), "no coreset scratch is left"


def test_three_first_runs_at_once_all_get_a_prefect_api(tmp_path):
    """Issue 35's probe: three first runs in an empty home started three local Prefect APIs that migrated
    one SQLite database together, and one died with a 63-line alembic traceback."""
    env = {**os.environ, "PATCHLINE_HOME": str(tmp_path / "home")}
    for key in ("PREFECT_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(key, None)
    go = tmp_path / "go"
    code = ("import time, pathlib\n"
            f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
            "from prefect.client.orchestration import get_client\n"
            "with local_prefect_api():\n"
            "    with get_client(sync_client=True) as client:\n"
            "        print(len(client.read_flow_runs()))\n")
    prelude = "from patchline.storage.paths import configure_environment; configure_environment()\n" \
              "from patchline.deployments.services import local_prefect_api\n"
    starters = [subprocess.Popen([sys.executable, "-c", prelude + code], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for _ in range(3)]
    time.sleep(10)
    go.touch()
    for starter in starters:
        out, errors = starter.communicate(timeout=300)
        assert starter.returncode == 0, errors[-3000:]
        assert out.strip() == "0" and "alembic" not in errors
