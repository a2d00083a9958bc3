"""The stack tier: README's "Running on a cluster" commands run as written (PostgreSQL, a Prefect server and
an MLflow server on it, a Dask scheduler with two worker processes, a process work pool and its worker),
then a tiny line's nightly on them, a Dask worker killed during a coreset and the MLflow server stopped
during a rebuild. Every server is its own process on 127.0.0.1, stopped by PID at the end."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cloudpickle
import numpy as np
import psutil
import pytest
from distributed.diagnostics.plugin import WorkerPlugin

from tests.conftest import write_line_config, write_mvtec_line

pytestmark = [pytest.mark.stack, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
LINE = "widget"
POOL = "patchline"

# What this module sends to the Dask scheduler and workers travels by value: they cannot import tests/.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def readme_blocks() -> list[str]:
    """The section's shell blocks: start everything, run the rebuild now, stop everything."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Running on a cluster\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 3, f"expected 3 shell blocks in README's 'Running on a cluster', found {len(blocks)}"
    return blocks


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Stack:
    folder: Path
    env: dict[str, str]
    start: str
    run_now: str
    stop: str

    @property
    def exports(self) -> str:
        """The start block's `export` lines: what the README's reader's shell has from then on."""
        return "\n".join(line for line in self.start.splitlines() if line.startswith("export "))

    def run_now_command(self, *params: str) -> str:
        """README's second block with `--param`s: the deployment run through the API, watched to its end."""
        return self.run_now.strip() + "".join(f" --param {p}" for p in params)

    def shell(self, script: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        """`script` in a shell that has run the start block's exports, as the README's reader's would."""
        return subprocess.run(["bash", "-euo", "pipefail", "-c", f"{self.exports}\n{script}"], cwd=REPO,
                              env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout_s)

    def url(self, name: str) -> str:
        port = self.env[name]
        return f"http://127.0.0.1:{port}"

    def pid(self, name: str) -> int:
        return int((self.folder / f"{name}.pid").read_text())


def stack_env(folder: Path, line_config: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PREFECT_", "MLFLOW_", "PATCHLINE_"))}
    env.update(STACK=str(folder), LINE=LINE, LINE_CONFIG=str(line_config), PG_PORT=str(free_port()),
               PREFECT_PORT=str(free_port()), MLFLOW_PORT=str(free_port()), DASK_PORT=str(free_port()),
               HOME=str(folder), COLUMNS="250",
               # MLflow's client retries a dead server for minutes by default; the tasks' own retries are
               # what the fault test looks at.
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
               MLFLOW_HTTP_REQUEST_TIMEOUT="20")
    if os.geteuid() == 0:
        env["PG_USER"] = "postgres"
    return env


def write_tiny_line(folder: Path) -> Path:
    return write_line_config(folder / f"{LINE}.yaml", write_mvtec_line(folder / "line", train=8), name=LINE)


def kill_tree(pid: int, signum: int = signal.SIGKILL) -> None:
    try:
        process = psutil.Process(pid)
        family = process.children(recursive=True) + [process]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.fail("the stack tier needs Debian's PostgreSQL: apt-get install -y postgresql")
    # Not under pytest's 0700 folders: PostgreSQL runs as its own user when the tests run as root.
    folder = Path(tempfile.mkdtemp(prefix="patchline-stack-", dir="/tmp"))
    folder.chmod(0o755)
    stack = Stack(folder, stack_env(folder, write_tiny_line(folder)), *readme_blocks())
    began = time.monotonic()
    starting = subprocess.Popen(["bash", "-euo", "pipefail", "-c", stack.start], cwd=REPO, env=stack.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        output, _ = starting.communicate(timeout=300)
        assert starting.returncode == 0, f"README's start block failed:\n{output}\n{logs(folder)}"
        print(f"stack started in {time.monotonic() - began:.1f} s", file=sys.stderr)
        yield stack
    finally:
        stopped = stack.shell(stack.stop, timeout_s=120)
        print(f"README's stop block: exit {stopped.returncode}\n{stopped.stderr[-2000:]}", file=sys.stderr)
        for pid_file in folder.glob("*.pid"):
            kill_tree(int(pid_file.read_text()))
        try:
            os.killpg(starting.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(folder, ignore_errors=True)


def logs(folder: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}" for log in sorted(folder.glob("*.log")))


@contextmanager
def prefect_client(stack: Stack) -> Iterator:
    """A client of the stack's Prefect server (this process's own settings name no server)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: f"{stack.url('PREFECT_PORT')}/api"}), \
            get_client(sync_client=True) as client:
        yield client


def flow_runs(stack: Stack) -> list:
    """The line's flow runs, newest first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_client(stack) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_=LINE)),
                                     sort=FlowRunSort.START_TIME_DESC)


def task_runs(stack: Stack, flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with prefect_client(stack) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def mlflow(stack: Stack):
    from mlflow import MlflowClient

    uri = stack.url("MLFLOW_PORT")
    return MlflowClient(uri, uri)


def line_runs(stack: Stack) -> list:
    client = mlflow(stack)
    experiment = client.get_experiment_by_name(f"patchline-{LINE}")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])


def champion(stack: Stack):
    return mlflow(stack).get_model_version_by_alias(f"patchline-{LINE}", "champion")


def rebuild_now(stack: Stack, *params: str) -> subprocess.CompletedProcess:
    return stack.shell(stack.run_now_command(*params))


def dask_scheduler(stack: Stack, function):
    from distributed import Client

    with Client(f"tcp://127.0.0.1:{stack.env['DASK_PORT']}", timeout="20s") as client:
        return client.run_on_scheduler(function)


def _coreset_prefixes(dask_scheduler) -> dict[str, float]:
    return {name: prefix.all_durations.get("compute", 0.0) for name, prefix in dask_scheduler.task_prefixes.items()}


def test_the_nightly_runs_on_the_work_pool_with_its_coreset_on_the_dask_workers(stack):
    began = time.monotonic()
    run = rebuild_now(stack)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}\n{logs(stack.folder)}"
    print(f"first rebuild on the stack in {time.monotonic() - began:.1f} s", file=sys.stderr)

    flow_run = flow_runs(stack)[0]
    assert flow_run.state.is_completed()
    assert flow_run.work_pool_name == POOL and flow_run.deployment_id is not None
    # The worker ran it in a process of its own: the flow run's infrastructure is a PID of the worker's child.
    assert flow_run.infrastructure_pid

    durations = dask_scheduler(stack, _coreset_prefixes)
    assert durations.get("partition_greedy", 0) > 0, f"the coreset's greedy never ran on the scheduler: {durations}"
    assert durations.get("route_block", 0) > 0

    [run_record] = line_runs(stack)
    assert run_record.info.status == "FINISHED"
    # Artifacts went to the MLflow server over HTTP, into its artifact folder, not to a path of the client's.
    assert run_record.info.artifact_uri.startswith("mlflow-artifacts:")
    logged = {item.path for item in mlflow(stack).list_artifacts(run_record.info.run_id, "data")}
    assert "data/manifest.csv" in logged and "data/fit_ids.txt" in logged
    assert list((stack.folder / "mlflow-artifacts").rglob("manifest.csv"))
    assert run_record.data.tags.get("patchline.memory_bank_digest")
    version = champion(stack)
    assert version.run_id == run_record.info.run_id


def chromium(url: str, *options: str) -> subprocess.CompletedProcess:
    """Debian's headless Chromium on `url`, given time for the page's scripts to fetch and draw."""
    browser = shutil.which("chromium")
    assert browser, "the stack tier's browser check needs Debian's chromium (.ci/run installs it)"
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1400,1600", "--virtual-time-budget=20000", *options, url],
                          capture_output=True, text=True, timeout=120)


def test_the_flow_run_page_lists_the_stages_and_the_review_page_renders(stack, tmp_path):
    """What a watcher sees in a real browser: the rebuild's task runs on its Prefect flow run page, and the
    review page from the MLflow run with its pictures drawn. Screenshots stay in the test's folder."""
    from PIL import Image

    flow_run = flow_runs(stack)[-1]
    page = f"{stack.url('PREFECT_PORT')}/runs/flow-run/{flow_run.id}"
    dom = chromium(page, "--dump-dom").stdout
    # The page's header counts the run's task runs (its graph, drawn on a canvas, shows each by name; the
    # names themselves are checked through the API in tests/test_watching.py).
    counted = re.search(r"(\d+) Task runs", dom)
    assert counted and int(counted.group(1)) >= 12, f"the flow run page shows no stages: {counted}"
    assert "did not generate any task" not in dom
    shot = tmp_path / "flow-run.png"
    chromium(page, f"--screenshot={shot}")
    assert shot.stat().st_size > 20_000, "the flow run page rendered (nearly) blank"

    [record] = [run for run in line_runs(stack) if run.data.tags.get("prefect.flow_run_id") == str(flow_run.id)]
    review = Path(mlflow(stack).download_artifacts(record.info.run_id, "review/review.html", str(tmp_path)))
    assert review.read_text().count("data:image/png") >= 2  # the ROC curves and the score histograms
    shot = tmp_path / "review.png"
    chromium(review.as_uri(), f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # The ROC curves and histograms are drawn in colour: a page whose pictures failed shows text only.
    coloured = (np.abs(pixels[..., 0] - pixels[..., 2]) > 60).mean()
    assert coloured > 0.005, f"review page screenshot is nearly colourless ({coloured:.4f}): pictures missing"


def test_deploying_to_a_work_pool_that_does_not_exist_names_it(stack):
    deployed = stack.shell("patchline deploy ${LINE_CONFIG} --pool nightly-gpu", timeout_s=120)
    assert deployed.returncode == 2
    assert "work pool 'nightly-gpu' does not exist" in deployed.stderr
    assert "prefect work-pool create nightly-gpu --type process" in deployed.stderr


def _coreset_of(stack: Stack, address: str | None) -> tuple[np.ndarray, float, str]:
    from patchline.models.patchcore.coreset import coreset_size, greedy_coreset_dask
    from patchline.storage.dask_cluster import dask_client
    from patchline.storage.feature_store import FeatureStore
    from patchline.storage.line_config import load_line
    from patchline.storage.nearest_cache import bank_digest
    from patchline.tasks.patchcore import feature_key

    config = load_line(stack.env["LINE_CONFIG"])
    run_id = line_runs(stack)[-1].info.run_id
    fit_ids = Path(mlflow(stack).download_artifacts(run_id, "data/fit_ids.txt",
                                                    str(stack.folder / f"download-{address is None}")))
    store = FeatureStore.open(stack.folder / "home" / "features", LINE, feature_key(config), read_only=True)
    patches = store.as_dask_array(fit_ids.read_text().split()).reshape(-1, store.patch_shape[1])
    size = coreset_size(patches.shape[0], config.patchcore.coreset_ratio)
    scratch = tempfile.mkdtemp(dir=stack.folder)
    with dask_client(address):
        coreset = greedy_coreset_dask(patches, size, projection_dim=config.patchcore.projection_dim, scratch=scratch)
    bank = patches[np.sort(coreset.indices)].compute().astype(np.float32)
    return np.asarray(coreset.indices), coreset.radius, bank_digest(bank)


def test_two_worker_processes_and_the_in_process_cluster_pick_the_same_bank_bit_for_bit(stack):
    on_workers = _coreset_of(stack, f"tcp://127.0.0.1:{stack.env['DASK_PORT']}")
    in_process = _coreset_of(stack, None)
    np.testing.assert_array_equal(on_workers[0], in_process[0])
    assert on_workers[1] == in_process[1]
    assert on_workers[2] == in_process[2]
    # ... and that is the bank the nightly on the worker built and logged.
    assert line_runs(stack)[-1].data.tags["patchline.memory_bank_digest"] == on_workers[2]


class KillOnceDuringTheGreedy(WorkerPlugin):
    """A Dask worker plugin: the first worker to start a partition's greedy kills itself (SIGKILL, as the
    kernel's OOM killer would); a marker file makes it happen once across all workers and restarts."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key, start: str, finish: str, **kwargs) -> None:
        from dask.utils import key_split

        if finish != "executing" or key_split(key) != "partition_greedy":
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def _workers(dask_scheduler) -> int:
    return len(dask_scheduler.workers)


def test_a_dask_worker_killed_during_the_coreset_gives_the_same_bank_or_a_failure_naming_it(stack):
    from distributed import Client

    first = line_runs(stack)[-1].data.tags["patchline.memory_bank_digest"]
    marker = stack.folder / "killed-worker.txt"
    with Client(f"tcp://127.0.0.1:{stack.env['DASK_PORT']}", timeout="20s") as client:
        client.register_plugin(KillOnceDuringTheGreedy(str(marker)), name="kill-once")
        try:
            run = rebuild_now(stack, "force=true")
        finally:
            client.unregister_worker_plugin("kill-once")
    assert marker.exists(), "no worker started a partition's greedy, so none was killed"
    assert not psutil.pid_exists(int(marker.read_text())), "the killed worker is still there"
    flow_run = flow_runs(stack)[0]
    if run.returncode == 0:
        # The scheduler ran the lost worker's tasks again elsewhere: the bank must be the same one.
        assert line_runs(stack)[0].data.tags["patchline.memory_bank_digest"] == first
    else:
        assert "KilledWorker" in (flow_run.state.message or ""), flow_run.state.message
        assert champion(stack).run_id == line_runs(stack)[-1].info.run_id
    print(f"worker killed during the coreset: rebuild exit {run.returncode}, {flow_run.state.name}", file=sys.stderr)
    # The worker's nanny starts a new worker process in its place.
    deadline = time.monotonic() + 60
    while dask_scheduler(stack, _workers) < 2:
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        time.sleep(1)


def test_the_mlflow_server_stopped_during_a_rebuild_fails_it_visibly_and_the_next_run_succeeds(stack):
    before = champion(stack).version
    known = {run.id for run in flow_runs(stack)}
    rebuilding = subprocess.Popen(["bash", "-euo", "pipefail", "-c",
                                   f"{stack.exports}\n{stack.run_now_command('force=true')}"],
                                  cwd=REPO, env=stack.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
    # Stopped once the rebuild has scored everything: its logging then meets a dead server.
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline, "the rebuild never reached its evaluation"
        new = [run for run in flow_runs(stack) if run.id not in known]
        names = {task.name.rsplit("-", 1)[0]: task for task in task_runs(stack, new[0].id)} if new else {}
        if "evaluate" in names:
            assert "log-to-mlflow" not in names, "the rebuild logged before the server could be stopped"
            break
        time.sleep(0.2)
    kill_tree(stack.pid("mlflow-server"), signal.SIGTERM)
    output, _ = rebuilding.communicate(timeout=300)
    assert rebuilding.returncode != 0, output[-3000:]

    flow_run = flow_runs(stack)[0]
    assert flow_run.id == new[0].id and flow_run.state.is_failed()
    logging = [task for task in task_runs(stack, flow_run.id) if task.name.startswith("log-to-mlflow")]
    assert len(logging) == 1 and logging[0].state.is_failed()
    assert logging[0].run_count == 3, "the logging task's two retries do not show in Prefect"

    # The server comes back the way it was started; the gate never ran, so `champion` has not moved.
    [restart] = [line for line in stack.start.splitlines() if "mlflow server" in line]
    [health] = [line for line in stack.start.splitlines() if "MLFLOW_TRACKING_URI/health" in line]
    restarted = stack.shell(f"{restart}\n{health}", timeout_s=120)
    assert restarted.returncode == 0, restarted.stderr
    assert champion(stack).version == before
    run = rebuild_now(stack, "force=true")
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{logs(stack.folder)}"
    runs = line_runs(stack)
    assert runs[0].info.status == "FINISHED"
    # The run the dead server left RUNNING was marked by the next rebuild.
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
