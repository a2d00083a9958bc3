"""Real flows on small real data: a real Prefect API, MLflow SQLite store, Dask LocalCluster and Zarr store."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image
from prefect.client.orchestration import get_client

from patchline.models.config import (
    ElpvSource, EvaluationConfig, LineConfig, MvtecSource, OeSdnConfig, PatchCoreConfig, PromotionConfig,
    ScheduleConfig)
from patchline.models.scoring.metrics import image_auroc
from patchline.models.scoring.unit_scale import scored_detectors
from patchline.storage.ingest import build_manifest
from patchline.storage.line_config import save_line
from patchline.storage.pixels import read_pixels
from patchline.storage.registry import CHAMPION, champion_version, registered_model_name
from patchline.storage.tag_names import DECISION_TAG, SKIPPED_TAG
from patchline.storage.tracking import configure_mlflow
from tests.conftest import png_claiming

LINE = "elpv-tiny"


def tiny_config(**changes) -> LineConfig:
    """A few dozen mono cells at 64 px: big enough for every step to do real work, small enough for CI."""
    config = LineConfig(
        name=LINE, source=ElpvSource(cell_type="mono", limit_per_class=12), image_size=64,
        # Brightness normalised as elpv-mono is, so the champion's pyfunc must reproduce it too.
        patchcore=PatchCoreConfig(coreset_ratio=0.1, normalise_brightness=True),
        oesdn=OeSdnConfig(image_size=32, epochs=3, sdn_epochs=3, batch_size=8, ae_base_width=8, sdn_base_width=16),
        evaluation=EvaluationConfig(calibration_fraction=0.3, detectors=("patchcore", "oesdn", "ae", "darkness"),
                                    fusion_weights={"patchcore": 1.0, "darkness": 0.5}),
        # 24 known test cells: enough for these tests to exercise the gate's comparisons.
        promotion=PromotionConfig(min_test_images=20))
    return config.model_copy(update=changes)


@pytest.fixture(scope="module")
def first_rebuild(home):
    from patchline.flows.rebuild import rebuild_product_line

    return rebuild_product_line(tiny_config())


def test_rebuild_logs_everything_and_the_first_version_becomes_champion(first_rebuild, home):
    client = configure_mlflow()
    assert not list((home / "runs" / LINE).iterdir()), "the work folder goes once its files are in MLflow"
    assert first_rebuild.version == "1" and first_rebuild.promoted
    run = client.get_run(first_rebuild.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["patchcore.backbone"] == "efficientnet-lite0" and run.data.params["image_size"] == "64"
    for key in ("image_auroc", "patchcore_image_auroc", "oesdn_image_auroc", "ae_image_auroc", "darkness_image_auroc",
                "fused_image_auroc",
                "patchcore_threshold", "time_extract_features_s", "time_coreset_s", "memory_bank_rows",
                "manifest_train_good"):
        assert key in run.data.metrics, key
    assert run.data.metrics["manifest_train_good"] == 12
    assert len(client.get_metric_history(run.info.run_id, "loss_autoencoder_train_loss")) >= 1
    artifacts = {a.path for folder in ("plots", "data") for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"plots/roc.png", "plots/pr.png", "data/manifest.csv", "data/line_config.yaml"} <= artifacts
    version = champion_version(client, LINE)
    assert version.version == 1 and version.tags[DECISION_TAG] == "promoted"


def test_champion_model_scores_like_the_rebuild(first_rebuild):
    """The registered pyfunc re-extracts features from pixels; its scores must reproduce the rebuild's metrics."""
    client = configure_mlflow()
    model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(LINE)}@{CHAMPION}")
    rows = [r for r in build_manifest(tiny_config()).select(split="test") if r.label != "ambiguous"]
    images = [read_pixels(r.source) for r in rows]
    output = model.predict(images, params={"maps": True, "all_detectors": True})
    labels = [r.label == "anomaly" for r in rows]
    metrics = client.get_run(first_rebuild.run_id).data.metrics
    for detector in ("patchcore", "oesdn", "ae", "darkness", "fused"):
        assert image_auroc(output[f"score_{detector}"], labels) == pytest.approx(metrics[f"{detector}_image_auroc"], abs=1e-6)
    assert output["anomaly_map"].shape == (len(rows), 64, 64)
    assert set(np.unique(output["decision"])) <= {True, False}
    # Issue 36: by default only the detectors the decision reads run, with the same scores and decisions.
    reads = model.unwrap_python_model().detector.decision_reads()
    deciding = model.predict(images)
    assert set(scored_detectors(deciding)) == set(reads)
    assert len(reads) < 5, "this line's decision does not read every detector"
    for key in ("score", "decision", *(f"score_{name}" for name in reads)):
        np.testing.assert_array_equal(deciding[key], output[key])


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_champion_is_served_over_mlflow_rest_and_scores_as_in_process(first_rebuild):
    """`patchline serve` speaks MLflow's scoring protocol: pixels as JSON lists, encoded PNG files and a
    DataFrame get the in-process scores back; bad pixels get a 400 with the model's one-line reason."""
    from patchline.deployments.services import serving_model

    rows = [r for r in build_manifest(tiny_config()).select(split="test") if r.label != "ambiguous"][:3]
    images = [read_pixels(r.source) for r in rows]
    expected = mlflow.pyfunc.load_model(f"models:/{registered_model_name(LINE)}@{CHAMPION}").predict(
        images, params={"maps": True})
    pngs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[:, :, 0]).save(buffer, format="PNG")
        pngs.append(base64.b64encode(buffer.getvalue()).decode())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with serving_model(LINE, port) as server:
        for body in ({"inputs": np.stack(images).tolist()}, {"inputs": {"image": pngs}, "params": {"maps": True}},
                     {"dataframe_split": {"columns": ["image"], "data": [[png] for png in pngs]}}):
            status, answer = post_json(f"{server.url}/invocations", body)
            assert status == 200, answer
            served = answer["predictions"]
            scores = [key for key in expected if key.startswith(("score", "threshold"))]
            assert set(served) - {"anomaly_map"} == set(scores) | {"decision"}
            for key in scores:
                np.testing.assert_allclose(served[key], expected[key], rtol=0, atol=1e-5, err_msg=key)
            assert served["decision"] == expected["decision"].tolist()
            # Maps only when the request asks: they are most of an answer's bytes.
            assert ("anomaly_map" in served) == ("params" in body)
            if "params" in body:
                np.testing.assert_allclose(served["anomaly_map"], expected["anomaly_map"], rtol=0, atol=1e-5)
        status, answer = post_json(f"{server.url}/invocations", {"inputs": [[[0, 300], [1, 2]]]})
        assert (status, answer["message"]) == (400, "the input: pixel values must lie in 0..255, got 0..300")


def test_the_served_model_holds_its_limits_under_a_burst(first_rebuild, tmp_path):
    """Issue 35's probe: a 97 KB PNG of 10,000 x 10,000 px cost the server +1.5 GB, eight at once 5.65 GB;
    errors carried stack traces with server paths; `path` inputs read any file. Now a request's images are
    counted from their headers before any is decoded, too many requests at once get 429, a large body 413,
    and every error body is one line of patchline's reason."""
    import concurrent.futures

    import psutil

    from patchline.deployments.services import serving_model
    from patchline.storage.serving import ServingLimits

    def png(side: int, level: int) -> str:
        buffer = io.BytesIO()
        Image.fromarray(np.full((side, side), level, np.uint8)).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    huge, fair = png(10_000, 90), png(600, 120)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    limits = ServingLimits(max_body_bytes=2**20, max_request_pixels=2_000_000, max_concurrent=1,
                           path_root=tmp_path / "allowed")
    (tmp_path / "allowed").mkdir()
    with serving_model(LINE, port, limits=limits) as server:
        url = f"{server.url}/invocations"
        process = psutil.Process(server.process.pid)
        assert post_json(url, {"inputs": {"image": [fair]}})[0] == 200
        baseline = process.memory_info().rss
        peak, done = [baseline], threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak.append(process.memory_info().rss)
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            burst = list(pool.map(lambda body: post_json(url, body),
                                  [{"inputs": {"image": [huge]}}] * 8 + [{"inputs": {"image": [fair, fair]}}] * 4))
        done.set()
        watcher.join()
        answers = [answer for _, answer in burst]
        codes = [status for status, _ in burst]
        assert set(codes[:8]) <= {413, 429} and 413 in codes[:8], codes
        assert set(codes[8:]) <= {200, 429}, codes
        assert max(peak) - baseline < 300 * 2**20, f"peak RSS grew by {(max(peak) - baseline) / 2**20:.0f} MB"
        too_large = next(answer for status, answer in burst if status == 413)
        assert too_large["message"].startswith("image 0: the request's images come to more than the server's limit")
        busy = next((answer for status, answer in burst if status == 429), None)
        assert busy is None or "requests in progress" in busy["message"]
        request = urllib.request.Request(url, b'{"inputs": "' + b"A" * (2 * 2**20) + b'"}',
                                         {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert refused.value.code == 413
        answers.append(json.loads(refused.value.read()))
        outside = [post_json(url, {"inputs": {"path": [path]}}) for path in ("/etc/passwd", "/no/such/file.png")]
        # A file there and a file nowhere get the same answer: the server does not say which exist.
        assert [status for status, _ in outside] == [400, 400]
        assert all(answer["message"].endswith("is outside the folder this server may read") for _, answer in outside)
        answers += [answer for _, answer in outside]
        for answer in answers:
            if "message" in answer:
                assert set(answer) == {"error_code", "message"} and "Traceback" not in answer["message"], answer
                assert str(tmp_path) not in answer["message"] and "site-packages" not in answer["message"]


def test_a_worse_model_leaves_the_champion(first_rebuild):
    from patchline.flows.rebuild import rebuild_product_line

    # Only a barely trained autoencoder: far below PatchCore on these cells.
    worse = tiny_config(evaluation=EvaluationConfig(calibration_fraction=0.3, detectors=("ae",)),
                        oesdn=OeSdnConfig(image_size=32, epochs=1, sdn_epochs=1, batch_size=8, ae_base_width=4))
    result = rebuild_product_line(worse)
    client = configure_mlflow()
    champion_auroc = client.get_run(first_rebuild.run_id).data.metrics["image_auroc"]
    assert result.image_auroc["ae"] < champion_auroc - worse.promotion.tolerance  # the premise
    assert not result.promoted and "vs champion" in result.reason
    assert champion_version(client, LINE).version == 1
    assert client.get_model_version(registered_model_name(LINE), result.version).tags[DECISION_TAG] == "rejected"


def test_an_unreachable_tracking_server_fails_the_rebuild_at_once(home, monkeypatch):
    from patchline.flows.rebuild import rebuild_product_line

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    started = time.monotonic()
    state = rebuild_product_line(tiny_config(name="unreachable"), return_state=True)
    assert state.is_failed() and f"MLflow tracking server {url} does not answer" in state.message
    assert time.monotonic() - started < 60
    assert not (home / "features" / "unreachable").exists(), "nothing was extracted"


def broken_line(tmp_path: Path) -> Path:
    root = tmp_path / "broken"
    (root / "train" / "good").mkdir(parents=True)
    for i in range(5):
        Image.fromarray(np.full((64, 64), 40 * i, np.uint8)).save(root / "train" / "good" / f"{i}.png")
    (root / "train" / "good" / "bad.png").write_bytes(b"")
    return save_line(LineConfig(name="broken", source=MvtecSource(root=root)), tmp_path / "broken.yaml")


def test_a_failed_rebuild_leaves_the_registry_untouched(first_rebuild, tmp_path):
    from patchline.flows.rebuild import rebuild_product_line
    from patchline.storage.line_config import load_line

    client = configure_mlflow()
    before = {(v.name, v.version) for v in client.search_model_versions()}
    state = rebuild_product_line(load_line(broken_line(tmp_path)), return_state=True)
    assert state.is_failed() and "bad.png: empty file" in state.message
    assert {(v.name, v.version) for v in client.search_model_versions()} == before
    failed = client.search_runs([client.get_experiment_by_name("patchline-broken").experiment_id])
    assert failed[0].info.status == "FAILED" and "bad.png" in failed[0].data.tags["patchline.error"]


def test_a_run_a_failed_rebuild_could_not_end_is_marked_failed_not_killed(first_rebuild):
    """Issue 35's probe: a rebuild that failed on a full disk could not end its MLflow run, and the next
    rebuild marked it KILLED. Its lock was let go cleanly, so the next one marks it FAILED."""
    from patchline.flows.rebuild import rebuild_product_line
    from patchline.storage.tag_names import ERROR_TAG, KILLED_TAG
    from patchline.storage.tracking import line_experiment_id

    client = configure_mlflow()
    stale = client.create_run(line_experiment_id(client, LINE)).info.run_id
    rebuild_product_line(tiny_config())
    run = client.get_run(stale)
    assert run.info.status == "FAILED" and KILLED_TAG not in run.data.tags
    assert "could not record it" in run.data.tags[ERROR_TAG]


def test_nightly_skips_an_unchanged_line_and_survives_a_broken_one(first_rebuild, tmp_path):
    from patchline.flows.nightly import nightly

    client = configure_mlflow()
    # Another schedule and description change when the line is rebuilt, not the model it gets.
    unchanged = tiny_config(description="same line, new words", schedule=ScheduleConfig(cron="30 3 * * *"))
    good = save_line(unchanged, tmp_path / f"{LINE}.yaml")
    query = f"name = '{registered_model_name(LINE)}'"
    before = len(client.search_model_versions(query))
    champion = champion_version(client, LINE).version
    state = nightly([str(good), str(broken_line(tmp_path))], return_state=True)
    assert state.is_failed() and state.message.endswith("1 of 2 lines failed: broken")
    result = state.result(raise_on_failure=False).rebuilt[LINE]
    assert result.skipped and result.reason.startswith(f"unchanged since v{champion}: same images")
    assert result.image_auroc["patchcore"] == client.get_run(first_rebuild.run_id).data.metrics["patchcore_image_auroc"]
    assert len(client.search_model_versions(query)) == before and champion_version(client, LINE).version == champion
    skip = client.get_run(result.run_id)
    assert skip.info.status == "FINISHED" and skip.data.tags[SKIPPED_TAG] == result.reason
    # The nightly leaves the fleet view as a table artifact: the line's champion and its last run.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        [fleet] = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["fleet-status"])),
                                         limit=1)
    rows = {row["line"]: row for row in (json.loads(fleet.data) if isinstance(fleet.data, str) else fleet.data)}
    assert rows[LINE]["champion"] == f"v{champion}" and rows[LINE]["last rebuild"].startswith(f"{LINE} unchanged")
    assert rows["broken"]["last rebuild"].startswith("broken failed: IngestError")
    assert "bad.png: empty file" in rows["broken"]["why"]


def test_deployments_carry_each_lines_cron(home):
    from patchline.deployments.schedules import register
    from patchline.storage.line_config import load_line

    ids = register(["elpv-mono", "elpv-poly"])

    async def read():
        async with get_client() as client:
            return [await client.read_deployment(i) for i in ids]

    deployments = {d.name: d for d in asyncio.run(read())}
    assert set(deployments) == {"rebuild-elpv-mono", "rebuild-elpv-poly", "score-images"}
    for line in ("elpv-mono", "elpv-poly"):
        schedule = deployments[f"rebuild-{line}"].schedules[0].schedule
        assert schedule.cron == load_line(line).schedule.cron and schedule.timezone == load_line(line).schedule.timezone
        assert deployments[f"rebuild-{line}"].parameters["config"]["name"] == line


def test_batch_scoring_gives_every_input_one_row_and_its_own_heat_map(first_rebuild, tmp_path):
    from patchline.flows.score import score_images

    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    rows = build_manifest(tiny_config()).select(split="test")[:3]
    for i, row in enumerate(rows):
        Image.fromarray(read_pixels(row.source)[:, :, 0]).save(folder / f"cell{i}.png")
    # The same file name in a subfolder, and a PNG without a suffix: both images, both scored.
    Image.fromarray(read_pixels(rows[0].source)[:, :, 0]).save(folder / "sub" / "cell0.png")
    Image.fromarray(read_pixels(rows[1].source)[:, :, 0]).save(folder / "nosuffix", format="PNG")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (folder / "bomb.png").write_bytes(png_claiming(14_000, 14_000))
    (folder / "notes.txt").write_text("shift notes")
    (folder / ".hidden.png").write_bytes(b"")
    missing = tmp_path / "missing.png"

    def scored(recursive: bool) -> dict[str, dict]:
        out = tmp_path / f"out-{recursive}"
        csv_path = Path(score_images(LINE, [str(folder), str(missing)], str(out), recursive=recursive))
        with csv_path.open() as handle:
            written = list(csv.DictReader(handle))
        assert [int(r["index"]) for r in written] == list(range(len(written)))
        for r in written:
            if r["heatmap"]:
                assert (out / r["heatmap"]).stat().st_size > 1000
        return {str(Path(r["path"]).relative_to(tmp_path)): r for r in written}

    flat = scored(recursive=False)
    assert set(flat) == {"incoming/.hidden.png", "incoming/bomb.png", "incoming/cell0.png", "incoming/cell1.png",
                         "incoming/cell2.png", "incoming/corrupt.png", "incoming/nosuffix", "incoming/notes.txt",
                         "incoming/sub", "missing.png"}
    errors = {path: r["error"] for path, r in flat.items() if r["error"]}
    assert errors["incoming/sub"] == "a folder: not scored without --recursive"
    assert errors["incoming/bomb.png"].startswith("image too large: 14000x14000")
    assert errors["incoming/notes.txt"] == "not an image (unrecognised format)"
    assert errors["incoming/corrupt.png"].startswith(("not an image", "truncated or corrupt"))
    assert errors["incoming/.hidden.png"].startswith("hidden entry") and errors["missing.png"] == "file not found"
    assert all(flat[path]["score"] == "" and flat[path]["heatmap"] == "" for path in errors)
    champion = str(champion_version(configure_mlflow(), LINE).version)
    for path in ("incoming/cell0.png", "incoming/cell1.png", "incoming/cell2.png", "incoming/nosuffix"):
        assert flat[path]["decision"] in ("good", "anomalous") and flat[path]["model_version"] == champion
        # The 0..1 score is on the same side of 0.5 as the raw score is of its threshold.
        unit = float(flat[path]["score_unit"])
        assert 0 <= unit <= 1
        assert (unit > 0.5) == (float(flat[path]["score"]) > float(flat[path]["threshold"]))
    assert float(flat["incoming/nosuffix"]["score"]) == pytest.approx(float(flat["incoming/cell1.png"]["score"]), abs=1e-4)
    deep = scored(recursive=True)
    assert "incoming/sub" not in deep
    assert float(deep["incoming/sub/cell0.png"]["score"]) == pytest.approx(float(deep["incoming/cell0.png"]["score"]), abs=1e-4)
    assert deep["incoming/sub/cell0.png"]["heatmap"] != deep["incoming/cell0.png"]["heatmap"]


def test_cli_nightly_promote_and_rollback(first_rebuild, tmp_path):
    from typer.testing import CliRunner

    from patchline.cli import app

    runner = CliRunner()
    good = save_line(tiny_config(), tmp_path / f"{LINE}.yaml")
    result = runner.invoke(app, ["nightly", "--force", str(good), str(broken_line(tmp_path))])
    assert result.exit_code == 1
    assert f"{LINE}: image AUROC patchcore" in result.output and "broken: FAILED" in result.output
    client = configure_mlflow()
    champion = champion_version(client, LINE).version
    result = runner.invoke(app, ["promote", str(good), "2", "--reason", "operator check"])
    assert result.exit_code == 0 and "champion is now v2" in result.output
    result = runner.invoke(app, ["rollback", str(good)])
    assert result.exit_code == 0 and f"champion is back to v{champion}" in result.output
    result = runner.invoke(app, ["promote", str(good), "99"])
    assert result.exit_code == 2 and "cannot promote version 99" in result.output
    result = runner.invoke(app, ["lines", str(good)])
    assert result.exit_code == 0 and result.output.startswith(LINE) and f"champion: v{champion} (" in result.output
    result = runner.invoke(app, ["history", str(good)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "promoted          by gate: first version" in lines[0]
    assert any("v2     promoted by hand  by " in line and line.endswith("operator check") for line in lines)
    assert f"rolled back       by " in lines[-2] and lines[-1] == f"champion now: v{champion}"
    result = runner.invoke(app, ["status", str(good)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{LINE:<16} champion v{champion}") and "last: " in result.output


def test_status_names_a_schedule_that_did_not_run(first_rebuild):
    from datetime import datetime, timedelta, timezone
    from zoneinfo import ZoneInfo

    from patchline.storage.fleet import line_status

    client = configure_mlflow()
    config = tiny_config(schedule=ScheduleConfig(cron="0 2 * * *", timezone="Europe/Berlin"))
    now = datetime.now(timezone.utc)
    fresh = line_status(client, config, now)
    # Rebuilt minutes ago: nothing scheduled was missed since.
    assert fresh.champion is not None and fresh.last_run is not None and fresh.missed is None
    # Three days on at 04:00 Berlin time (past the hour's grace at any time of day the test runs), with no
    # rebuild since: that night's 02:00 is named.
    then = (now + timedelta(days=3)).astimezone(ZoneInfo("Europe/Berlin")).replace(hour=4, minute=0)
    later = line_status(client, config, then)
    assert later.missed is not None and later.missed.hour == 2 and str(later.missed.tzinfo) == "Europe/Berlin"
    row = later.row(then)
    assert row["missed schedule"].endswith("02:00+01:00") and row["last rebuild"].endswith(" ago)")


def test_a_damaged_bundle_file_is_refused_naming_it(first_rebuild, tmp_path):
    """The sign bit of every float of the champion's memory bank flipped (issue 35's probe): before, the
    model loaded and scored good cells as defective; now loading names the file."""
    import shutil
    import struct

    from patchline.storage.model_bundle import BundleDamagedError, load_bundle

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{registered_model_name(LINE)}/1",
                                                     dst_path=str(tmp_path / "model")))
    bundle = next(local.rglob("memory_bank.safetensors")).parent
    load_bundle(bundle)  # as logged: loads
    damaged = shutil.copytree(bundle, tmp_path / "damaged")
    bank = damaged / "memory_bank.safetensors"
    raw = bytearray(bank.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start + 3::4] = bytes(b ^ 0x80 for b in raw[start + 3::4])
    bank.write_bytes(bytes(raw))
    with pytest.raises(BundleDamagedError, match=r"memory_bank.safetensors: damaged or changed since it was logged"):
        load_bundle(damaged)
    (damaged / "calibration.json").unlink()
    shutil.copy(bundle / "memory_bank.safetensors", bank)
    with pytest.raises(BundleDamagedError, match=r"calibration.json: missing from the model bundle"):
        load_bundle(damaged)


def test_networks_that_cannot_see_painted_defects_are_left_out_of_the_decisions(home, tmp_path, capsys):
    """Three epochs of the tiny networks on 36 cells: at chance on painted copies of the 12 held-out goods,
    and on the test cells too. At the default bar they are left out: still fitted, scored and logged, but
    weighing 0 in the logged model's `fused`, never deciding, with a reason tag each."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from patchline.cli import _print_rebuild
    from patchline.flows.rebuild import rebuild_product_line
    from patchline.models.scoring.calibration import Calibration
    from patchline.storage.tag_names import LEFT_OUT_TAG_PREFIX

    line = "elpv-self-check"
    config = tiny_config(name=line, source=ElpvSource(cell_type="mono", limit_per_class=24),
                         evaluation=EvaluationConfig(calibration_fraction=0.4, detectors=("patchcore", "oesdn", "ae")))
    result = rebuild_product_line(config)
    run = configure_mlflow().get_run(result.run_id)
    aurocs = {name: run.data.metrics[f"{name}_self_check_auroc"] for name in ("oesdn", "ae")}
    left_out = {key.removeprefix(LEFT_OUT_TAG_PREFIX): why for key, why in run.data.tags.items()
                if key.startswith(LEFT_OUT_TAG_PREFIX)}
    assert set(left_out) == {name for name, auroc in aurocs.items() if auroc < 0.6} == {"oesdn", "ae"}, aurocs
    assert all(run.data.metrics[f"{name}_image_auroc"] < 0.6 for name in left_out)  # the test cells agree
    assert all("held-out goods" in why and "cannot see defects" in why for why in left_out.values())
    assert "patchcore_self_check_auroc" not in run.data.metrics  # judged by its test figures, not painted copies
    assert run.data.tags["patchline.decision_detector"] not in left_out
    assert result.left_out == left_out  # and the CLI prints each with its reason
    _print_rebuild(result, line)
    printed = capsys.readouterr().out
    assert all(f"  {name} {why}\n" in printed for name, why in left_out.items())
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{registered_model_name(line)}/1",
                                                     dst_path=str(tmp_path)))
    calibration = Calibration.from_json(next(local.rglob("calibration.json")).read_text())
    assert calibration.fusion_weights == {"patchcore": 1.0, **{name: float(name not in left_out) for name in aurocs}}
    with get_client(sync_client=True) as prefect:
        [summary] = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"rebuild-{line}"])))
    assert "**Self-check** (image AUROC on" in summary.data
    assert all(f"- {name} left out" in summary.data and f"| {name} (left out) |" in summary.data for name in left_out)
