"""MLflow steps: open the run, log everything a rebuild made, register the model and apply the gate."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import mlflow
from mlflow.entities import Metric
from prefect import get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from patchline.models.config import LineConfig
from patchline.models.patchcore.memory_bank import MemoryBank
from patchline.storage.line_config import save_line
from patchline.storage.manifest import Manifest
from patchline.storage.nearest_cache import bank_digest
from patchline.storage.paths import work_folders
from patchline.storage.pyfunc_model import log_line_model
from patchline.storage.gate_evidence import TEST_SCORES_ARTIFACT, ChampionScores, gate_challenger
from patchline.storage.registry import GateDecision, champion_version, registered_model_name
from patchline.storage.tag_names import (
    BANK_TAG, BEST_DETECTOR_TAG, DATA_FINGERPRINT_TAG, DECISION_DETECTOR_TAG, DECISION_REASON_TAG, ERROR_TAG,
    LEFT_OUT_TAG_PREFIX, LINE_TAG, MODEL_CONFIG_TAG, REUSE_TAG, SKIPPED_TAG, TEST_FINGERPRINT_TAG)
from patchline.storage.tracking import (
    MODEL_TRAINING_VIEW, config_params, configure_mlflow, ensure_tracking_reachable, line_experiment_id,
    model_config_fingerprint)
from patchline.tasks.evaluate import Evaluation
from patchline.tasks.incremental import write_fit_ids
from patchline.tasks.ingest import LineData
from patchline.tasks.outcome import RunOutcome
from patchline.tasks.screening import SCREENING_ARTIFACTS, Screening

MLFLOW_UI_ENV = "PATCHLINE_MLFLOW_UI_URL"


@dataclass(frozen=True)
class StartedRun:
    """The rebuild's MLflow run, the work folder its files are written to before logging, and its Prefect
    flow run."""

    run_id: str
    experiment_id: str
    work_dir: Path
    flow_run_id: str | None = None


@dataclass(frozen=True)
class UnchangedChampion:
    """The champion a rebuild would reproduce: built from the same images with the same model settings."""

    version: str
    run_id: str
    metrics: dict[str, float]
    decision_detector: str


@dataclass(frozen=True)
class GateOutcome:
    version: str
    decision: GateDecision
    champion: str | None
    champion_scores: ChampionScores | None = None   # for the review page; None for champions logged without
    awaiting_approval: bool = False                  # passed the gate; `champion` moves once a person approves
    champion_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # its metric per detector


def reuse_tags(reuse: dict[str, str]) -> dict[str, str]:
    """Run tags of what a rebuild reused, by part: `patchline.incremental` for the rebuild as a whole,
    `patchline.incremental.<part>` for the bank and each network."""
    return {REUSE_TAG if part == "rebuild" else f"{REUSE_TAG}.{part}": note for part, note in reuse.items()}


def memory_bank_tags(bank: MemoryBank) -> dict[str, str]:
    return {BANK_TAG: bank_digest(bank.features)}


def test_fingerprint(data: LineData) -> str:
    """Identity of the test set, so the gate only compares metrics measured on the same images."""
    return Manifest(data.manifest.line, data.test).fingerprint()


# No retries: a server that is down now is down in ten seconds too, and MLflow's client already waits.
@task(name="check-mlflow", cache_policy=NO_CACHE)
def check_tracking_task() -> str:
    """Fail at once, naming the URL, when the MLflow tracking server does not answer."""
    return ensure_tracking_reachable()


@task(name="start-mlflow-run", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def start_run_task(config: LineConfig, flow_run_id: str | None) -> StartedRun:
    """Open the rebuild's run in the line's experiment with the whole config as params."""
    client = configure_mlflow()
    experiment_id = line_experiment_id(client, config.name)
    run = client.create_run(experiment_id, run_name=f"{config.name} rebuilding",
                            tags={LINE_TAG: config.name, "prefect.flow_run_id": str(flow_run_id),
                                  MODEL_CONFIG_TAG: model_config_fingerprint(config)})
    params = config_params(config)
    client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in params.items()])
    return StartedRun(run.info.run_id, experiment_id, work_folders(config.name) / run.info.run_id,
                      str(flow_run_id) if flow_run_id else None)


@task(name="find-unchanged-champion", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def find_unchanged_champion_task(config: LineConfig, data: LineData) -> UnchangedChampion | None:
    """The champion, when its run saw exactly these images (and labels) with these model settings."""
    client = configure_mlflow()
    champion = champion_version(client, config.name)
    if champion is None:
        return None
    run = client.get_run(champion.run_id)
    if run.data.tags.get(DATA_FINGERPRINT_TAG) != data.manifest.fingerprint() or \
            run.data.tags.get(MODEL_CONFIG_TAG) != model_config_fingerprint(config):
        return None
    return UnchangedChampion(str(champion.version), champion.run_id, dict(run.data.metrics),
                             run.data.tags.get(DECISION_DETECTOR_TAG, ""))


@task(name="record-skip", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def record_skip_task(run: StartedRun, data: LineData, unchanged: UnchangedChampion, screening: Screening) -> str:
    """Tag the run as a skip that names the champion it left in place; returns the reason."""
    quarantined = (f" once the screen quarantined {len(screening.quarantined)} new training images"
                   if screening.quarantined else "")
    reason = (f"unchanged since v{unchanged.version}{quarantined}: same images and model settings as its run "
              f"{unchanged.run_id}; not rebuilt (--force, or the flow parameter force, rebuilds anyway)")
    client = configure_mlflow()
    client.set_tag(run.run_id, DATA_FINGERPRINT_TAG, data.manifest.fingerprint())
    client.set_tag(run.run_id, SKIPPED_TAG, reason)
    create_markdown_artifact(markdown=f"# Rebuild of `{data.manifest.line}`\n\n**Skipped:** {reason}.\n\n"
                                      + _screening_markdown(screening),
    key=f"rebuild-{data.manifest.line}", description=f"Rebuild of {data.manifest.line}: skipped")
    get_run_logger().info("%s: %s", data.manifest.line, reason)
    return reason


@task(name="finish-mlflow-run", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def finish_run_task(run: StartedRun, error: str | None = None) -> None:
    """Mark the run FINISHED, or FAILED with the error as its `patchline.error` tag, and remove its work
    folder: what it held is in MLflow now, or belongs to a run that failed."""
    client = configure_mlflow()
    if error is not None:
        client.set_tag(run.run_id, ERROR_TAG, error[:5000])
    client.set_terminated(run.run_id, "FAILED" if error is not None else "FINISHED")
    shutil.rmtree(run.work_dir, ignore_errors=True)


@task(name="name-run", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def name_run_task(run: StartedRun, outcome: RunOutcome) -> None:
    """Name the MLflow run and the Prefect flow run by what happened, and tag the outcome, version and
    deciding figure on the MLflow run (columns of its run list)."""
    client = configure_mlflow()
    for key, value in outcome.tags().items():
        client.set_tag(run.run_id, key, value)
    client.update_run(run.run_id, name=outcome.name)
    if run.flow_run_id is not None:
        with get_client(sync_client=True) as prefect:
            prefect.update_flow_run(UUID(run.flow_run_id), name=outcome.name)


@task(name="log-to-mlflow", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_rebuild_task(run_id: str, config: LineConfig, data: LineData, evaluation: Evaluation,
                     histories: dict[str, dict[str, list[float]]], extra_metrics: dict[str, float],
                     reuse: dict[str, str], tags: dict[str, str], bundle: Path, export: Path | None,
                     work_dir: Path) -> str:
    """Metrics, loss curves, plots, manifest (and the fit images' ids), config, what was reused of the
    champion (`reuse_tags`), `tags`, and the pyfunc model (with the checked ONNX `export` when there is
    one); returns the model URI."""
    client = configure_mlflow()
    started = time.perf_counter()
    now = int(time.time() * 1000)
    metrics = {**evaluation.flat_metrics(), **extra_metrics}
    metrics.update({f"manifest_{key.replace('/', '_')}": float(n) for key, n in data.manifest.counts().items()})
    batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
    for network, history in histories.items():
        for series, values in history.items():
            batch += [Metric(f"loss_{network}_{series}", float(v), now, step) for step, v in enumerate(values)]
    for start in range(0, len(batch), 900):  # MLflow caps one batch at 1,000 metrics
        client.log_batch(run_id, metrics=batch[start:start + 900])
    client.set_tag(run_id, DATA_FINGERPRINT_TAG, data.manifest.fingerprint())
    client.set_tag(run_id, TEST_FINGERPRINT_TAG, test_fingerprint(data))
    client.set_tag(run_id, BEST_DETECTOR_TAG, evaluation.best)
    client.set_tag(run_id, DECISION_DETECTOR_TAG, evaluation.calibration.decision_detector)
    client.set_tag(run_id, DECISION_REASON_TAG, evaluation.decision_reason)
    tags = {**tags, **{LEFT_OUT_TAG_PREFIX + name: why for name, why in evaluation.left_out.items()}}
    for tag, value in {**reuse_tags(reuse), **tags}.items():
        client.set_tag(run_id, tag, value[:5000])
    data.manifest.write_csv(work_dir / "manifest.csv")
    save_line(config, work_dir / "line_config.yaml")
    for path in [work_dir / "manifest.csv", work_dir / "manifest.skipped.csv", work_dir / "line_config.yaml",
                 write_fit_ids(data, work_dir),
                 _write_test_scores(data, evaluation, work_dir / Path(TEST_SCORES_ARTIFACT).name)]:
        client.log_artifact(run_id, str(path), "data")
    for path in evaluation.plots:
        client.log_artifact(run_id, str(path), "plots")
    with mlflow.start_run(run_id=run_id):
        info = log_line_model(bundle, export)
    get_run_logger().info("logged run %s with model %s in %.1f s", run_id, info.model_uri,
                          time.perf_counter() - started)
    return info.model_uri


# Written by tasks/review.py after the gate; the summary links to it.
REVIEW_ARTIFACT = "review/review.html"


def _write_test_scores(data: LineData, evaluation: Evaluation, path: Path) -> Path:
    """Every test row's score per detector and the deciding detector's score, threshold and decision: what
    the next rebuild's review page shows of this version without scoring it again."""
    chosen = evaluation.decision_test.scores
    threshold = evaluation.calibration.thresholds[evaluation.calibration.decision_detector]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "label", "defect_type", "score", "threshold", "decision",
                         *(f"score_{name}" for name in evaluation.test)])
        for i, row in enumerate(data.test):
            writer.writerow([row.id, row.source, row.label, row.defect_type, f"{chosen[i]:.6f}", f"{threshold:.6f}",
                             "anomalous" if chosen[i] >= threshold else "good",
                             *(f"{d.scores[i]:.6f}" for d in evaluation.test.values())])
    return path


@task(name="register-and-gate", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register_and_gate_task(config: LineConfig, run_id: str, model_uri: str, data: LineData,
                           evaluation: Evaluation) -> GateOutcome:
    """The gate on the challenger, carried out in the registry (storage/gate_evidence.py)."""
    result = gate_challenger(configure_mlflow(), config, run_id, model_uri, evaluation.metrics,
                             evaluation.calibration.decision_detector, data.test, test_fingerprint(data))
    get_run_logger().info("gate for %s v%s: %s (%s)", config.name, result.version,
                          "awaiting approval" if result.awaiting_approval else "promoted" if result.decision.promote
                          else "kept champion", result.decision.reason)
    return GateOutcome(result.version, result.decision, result.evidence.champion, result.champion_scores,
                       result.awaiting_approval, result.evidence.champion_detectors)


@task(name="publish-summary", cache_policy=NO_CACHE)
def publish_summary_task(config: LineConfig, run: StartedRun, evaluation: Evaluation, outcome: GateOutcome,
                         timings: dict[str, float], reuse: dict[str, str], screening: Screening) -> None:
    """The Prefect markdown artifact: metrics per detector, the gate's decision, the screen's quarantine,
    what was reused of the champion, and the MLflow links."""
    ui = os.environ.get(MLFLOW_UI_ENV, "http://127.0.0.1:5000").rstrip("/")
    columns = ["image_auroc", "image_f1_max", "threshold", "fpr_at_threshold", "miss_rate_at_threshold",
               "pixel_auroc", "aupro_30"]
    shown = [c for c in columns if any(c in m for m in evaluation.metrics.values())]
    metric = config.promotion.metric
    champion = [f"champion v{outcome.champion} {metric}"] if outcome.champion_metrics else []
    marks = {name: "".join(mark for mark, on in ((" (best)", name == evaluation.best),
                                                 (" (decides)", name == evaluation.calibration.decision_detector),
                                                 (" (left out)", name in evaluation.left_out)) if on)
             for name in evaluation.metrics}
    rows = [f"| {name}{marks[name]} | "
            + " | ".join(f"{m[c]:.4f}" if c in m else "–" for c in shown)
            + "".join(f" | {outcome.champion_metrics[name]:.4f}" if name in outcome.champion_metrics else " | –"
                      for _ in champion) + " |"
            for name, m in evaluation.metrics.items()]
    verdict = "promoted to champion" if outcome.decision.promote else f"not promoted (champion stays v{outcome.champion})"
    run_url = f"{ui}/#/experiments/{run.experiment_id}/runs/{run.run_id}"
    view = MODEL_TRAINING_VIEW
    markdown = "\n".join([
        f"# Rebuild of `{config.name}`", "",
        "| detector | " + " | ".join(shown + champion) + " |", "|---" * (len(shown) + len(champion) + 1) + "|", *rows,
        "", f"**Gate:** version {outcome.version} {verdict}. {outcome.decision.reason}", "",
        f"**Review page** (champion and challenger side by side, the images they get wrong): "
        f"[{REVIEW_ARTIFACT}]({run_url}/artifactPath/{REVIEW_ARTIFACT}{view})", "",
        f"**Deciding detector:** {evaluation.calibration.decision_detector}: {evaluation.decision_reason}", "",
        _self_check_markdown(evaluation), "",
        _screening_markdown(screening), "",
        "**What was reused:**", *(f"- {part}: {note}" for part, note in reuse.items()), "",
        f"- MLflow run: {run_url}{view}",
        f"- Model version: {ui}/#/models/{registered_model_name(config.name)}/versions/{outcome.version}{view}",
        "", "Stage times (s): " + ", ".join(f"{k.removeprefix('time_').removesuffix('_s')} {v:.1f}"
                                            for k, v in timings.items() if k.startswith("time_")),
    ])
    create_markdown_artifact(markdown=markdown, key=f"rebuild-{config.name}",
                             description=f"Rebuild of {config.name}: metrics and gate decision")
    get_run_logger().info("%s: version %s %s", config.name, outcome.version, verdict)


def _self_check_markdown(evaluation: Evaluation) -> str:
    """The self-check's AUROC per detector it judged, and those it left out with why."""
    check = evaluation.self_check
    if check is None or not check.aurocs:
        return "**Self-check:** not run (no detector of this line takes it, or too few held-out goods)"
    figures = ", ".join(f"{name} {auroc:.4f}" for name, auroc in check.aurocs.items())
    return "\n".join([f"**Self-check** (image AUROC on {check.images} held-out goods and painted copies): {figures}",
                      *(f"- {name} {why}" for name, why in check.left_out.items())])


def _screening_markdown(screening: Screening) -> str:
    """The screen's note and its quarantined images (path, score, threshold, heat map artifact)."""
    lines = [f"**Screen:** {screening.note}."]
    if screening.unlike is not None and screening.unlike.images:
        lines += ["", f"First build: {len(screening.unlike.images)} training images are unlike the rest "
                      f"(leave-one-image-out score above {screening.unlike.cutoff:.4f}; reported, still fitted on, "
                      f"{SCREENING_ARTIFACTS}/unlike.csv):", *(f"- {path}: {score:.4f}" for path, score in
                                                              screening.unlike.images)]
    if screening.quarantined:
        lines += ["", "| quarantined image | score | threshold | 0-1 score | heat map |", "|---|---|---|---|---|"]
        lines += [f"| {item.path} | {item.score:.4f} | {item.threshold:.4f} | {item.score_unit:.3f} | "
                  f"{SCREENING_ARTIFACTS}/{item.heatmap} |" for item in screening.quarantined]
    return "\n".join(lines)
