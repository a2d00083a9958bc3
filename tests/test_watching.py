"""The nightly as its watchers see it (issue 33): runs named by outcome in Prefect and MLflow, every stage a
task run in the Prefect API, the review page, and approval of a challenger through the Prefect API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
from prefect.client.orchestration import get_client

from patchline.models.config import EvaluationConfig, LineConfig, MvtecSource, OeSdnConfig, PatchCoreConfig, PromotionConfig
from patchline.storage.line_config import save_line
from patchline.storage.registry import champion_version, registered_model_name
from patchline.storage.tag_names import APPROVAL_TAG, DECISION_TAG, FIGURE_TAG, OUTCOME_TAG, VERSION_TAG
from patchline.storage.tracking import configure_mlflow
from tests.conftest import write_elpv_line

REPO = Path(__file__).resolve().parent.parent
STAGES = {"ingest", "screen-training-images", "extract-features", "select-coreset", "build-memory-bank",
          "score-patchcore", "evaluate", "package-model", "log-to-mlflow", "register-and-gate", "write-review-page"}


def cells_line(name: str, root: Path, **promotion) -> LineConfig:
    write_elpv_line(root, train=12, test_good=12, test_cracked=12)
    return LineConfig(name=name, source=MvtecSource(root=root), image_size=64,
                      patchcore=PatchCoreConfig(coreset_ratio=0.1),
                      oesdn=OeSdnConfig(image_size=32, epochs=1, sdn_epochs=1, batch_size=4, ae_base_width=4),
                      evaluation=EvaluationConfig(calibration_fraction=0.25, detectors=("patchcore",)),
                      promotion=PromotionConfig(min_test_images=20, **promotion))


def flow_run_name(run_id: str) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).name


def test_runs_are_named_and_tagged_by_outcome_and_the_review_page_names_the_test_files(home, tmp_path):
    from patchline.flows.rebuild import rebuild_product_line

    config = cells_line("cells-named", tmp_path / "line")
    client = configure_mlflow()
    runs = {}
    first = rebuild_product_line(config)
    runs["promoted"] = first
    worse = config.model_copy(update={"evaluation": EvaluationConfig(calibration_fraction=0.25, detectors=("ae",))})
    runs["rejected"] = rebuild_product_line(worse)
    runs["unchanged"] = rebuild_product_line(config)
    assert runs["promoted"].promoted and not runs["rejected"].promoted and runs["unchanged"].skipped
    rule = runs["rejected"].reason.split(":")[0].removeprefix("rule ").replace("_", " ")
    expected = {"promoted": ("cells-named v1 promoted", "1"), "rejected": (f"cells-named v2 rejected: {rule}", "2"),
                "unchanged": ("cells-named unchanged", "1")}
    for outcome, result in runs.items():
        run = client.get_run(result.run_id)
        name, version = expected[outcome]
        assert run.info.run_name == name and run.data.tags[OUTCOME_TAG] == outcome, (run.info.run_name, outcome)
        assert run.data.tags[VERSION_TAG] == version
        flow_run_id = run.data.tags["prefect.flow_run_id"]
        assert flow_run_name(flow_run_id) == name
    assert client.get_run(first.run_id).data.tags[FIGURE_TAG].startswith("patchcore image_auroc ")
    # The MLflow UI opens the line's experiment on its model-training view, not the GenAI one.
    experiment = client.get_experiment(client.get_run(first.run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # The review page of the rejected version: both models, with every test file it shows named.
    page = Path(mlflow.artifacts.download_artifacts(run_id=runs["rejected"].run_id,
                                                    artifact_path="review/review.html", dst_path=str(tmp_path)))
    text = page.read_text()
    assert "challenger v2 (ae)" in text and "champion v1 (patchcore)" in text and "<img src='data:image/png" in text
    shown = {name for name in os.listdir(tmp_path / "line" / "test" / "crack") + os.listdir(tmp_path / "line" / "test" / "good")
             if name in text}
    assert shown, "the page names the test images it shows"
    assert "gets wrong" in text and "disagree" in text


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _api(url: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{url}/api{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_a_cli_rebuild_shows_every_stage_as_a_task_run_in_the_running_ui(tmp_path):
    """`patchline ui` runs; `patchline rebuild` uses its Prefect API, whose task runs list every stage."""
    config = cells_line("cells-ui", tmp_path / "line")
    line_file = save_line(config, tmp_path / "cells-ui.yaml")
    env = {**os.environ, "PATCHLINE_HOME": str(tmp_path / "home")}
    for key in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    prefect_port, mlflow_port = _free_port(), _free_port()
    cli = [sys.executable, "-m", "patchline"]
    ui = subprocess.Popen([*cli, "ui", "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)],
                          env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in ui.stdout:  # log lines, then the URLs once both servers answer
            if line.startswith("Prefect UI: "):
                break
        result = subprocess.run([*cli, "rebuild", str(line_file)], env=env, cwd=REPO, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "using the Prefect API of `patchline ui`" in result.stderr, result.stderr[-3000:]
        url = f"http://127.0.0.1:{prefect_port}"
        flow_runs = _api(url, "/flow_runs/filter", {})
        assert [run["name"] for run in flow_runs] == ["cells-ui v1 promoted"]
        deadline = time.monotonic() + 30  # the task-run recorder writes what the events say, a moment later
        while True:
            task_runs = _api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_runs[0]["id"]]}}})
            names = {run["name"].rsplit("-", 1)[0]: run["state_type"] for run in task_runs}
            if STAGES <= set(names) or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert STAGES <= set(names), sorted(names)
        assert all(names[stage] == "COMPLETED" for stage in STAGES), names
        assert "Finished in state Completed()" not in result.stderr
    finally:
        ui.terminate()
        ui.wait(timeout=60)


def _rebuild_in_thread(config: LineConfig) -> tuple[threading.Thread, dict]:
    """The rebuild runs in a thread; its result is under "result" of the returned dict once it ends."""
    from patchline.flows.rebuild import rebuild_product_line

    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=rebuild_product_line(config, force=True)))
    thread.start()
    return thread, box


def _paused_flow_run(line: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            for run in client.read_flow_runs():
                if run.state_type.value == "PAUSED" and run.name.startswith(line):
                    return str(run.id)
            time.sleep(1)
    raise AssertionError(f"no paused flow run of {line}")


def test_manual_approval_in_the_prefect_api_approve_reject_and_time_out(home, tmp_path):
    from prefect.flow_runs import resume_flow_run

    config = cells_line("cells-approved", tmp_path / "line", approval="manual", approval_timeout_hours=0.003)
    client = configure_mlflow()
    name = registered_model_name(config.name)
    first, _ = _rebuild_in_thread(config.model_copy(update={"promotion": config.promotion.model_copy(
        update={"approval_timeout_hours": 1.0})}))
    first.join()
    assert champion_version(client, config.name).version == 1  # a first version needs no approval

    slow = config.model_copy(update={"promotion": config.promotion.model_copy(update={"approval_timeout_hours": 1.0})})
    for answer, expected_champion in (({"approve": True, "reviewer": "anna", "note": "crack recall checked"}, 2),
                                      ({"approve": False, "reviewer": "ben", "note": "too many misses"}, 2)):
        thread, box = _rebuild_in_thread(slow)
        flow_run_id = _paused_flow_run(config.name)
        assert flow_run_name(flow_run_id).endswith("awaiting approval")
        assert client.get_model_version(name, str(expected_champion if answer["approve"] else 3)).tags[DECISION_TAG] \
            == "awaiting approval"
        resume_flow_run(flow_run_id, run_input=answer)
        thread.join(timeout=120)
        result = box["result"]
        assert champion_version(client, config.name).version == expected_champion
        tags = client.get_model_version(name, result.version).tags
        assert tags[APPROVAL_TAG].startswith(("approved by anna" if answer["approve"] else "rejected by ben"))
        assert result.promoted == answer["approve"]
        assert flow_run_name(flow_run_id).startswith(f"{config.name} v{result.version} ")

    # Nobody answers: the wait ends after the line's timeout and the champion stays.
    thread, box = _rebuild_in_thread(config)
    thread.join(timeout=180)
    result = box["result"]
    assert not result.promoted and result.reason.startswith("no answer within")
    assert champion_version(client, config.name).version == 2
    assert client.get_model_version(name, result.version).tags[DECISION_TAG] == "rejected"
