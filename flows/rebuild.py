"""The rebuild of one product line: ingest → features → coreset → bank ∥ AE → SDN (→ darkness) → evaluate →
MLflow → gate."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from models.backbones import backbone_weights_file
from models.config import LineConfig
from storage.model_bundle import save_bundle
from storage.paths import patchline_home
from storage.registry import registered_model_name
from storage.tracking import configure_mlflow
from tasks.darkness import score_darkness_task
from tasks.evaluate import Evaluation, evaluate_task
from tasks.ingest import ingest_line
from tasks.oesdn import score_reconstruction_task, train_autoencoder_task, train_sdn_task
from tasks.patchcore import build_memory_bank_task, extract_features_task, score_patchcore_task, select_coreset_task
from tasks.tracking import GateOutcome, log_rebuild_task, register_and_gate_task, start_run_task

MLFLOW_UI_ENV = "PATCHLINE_MLFLOW_UI_URL"


@flow(name="rebuild-product-line", flow_run_name="rebuild-{config.name}")
def rebuild_product_line(config: LineConfig) -> dict:
    """Rebuild every detector of one line, evaluate it, log it to MLflow and let the gate decide on it."""
    started = time.perf_counter()
    run_id = start_run_task(config, flow_run.get_id())
    client = configure_mlflow()
    try:
        outcome, evaluation, timings = _rebuild(config, run_id, started)
    except BaseException as error:
        # The run says why it failed; the registry was never touched, so `champion` stays where it was.
        client.set_tag(run_id, "patchline.error", f"{type(error).__name__}: {error}"[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    _publish_summary(config, run_id, evaluation, outcome, timings)
    return {"line": config.name, "run_id": run_id, "version": outcome.version,
            "promoted": outcome.decision.promote, "reason": outcome.decision.reason,
            "decision_detector": evaluation.calibration.decision_detector,
            "image_auroc": {name: m["image_auroc"] for name, m in evaluation.metrics.items()}}


def _rebuild(config: LineConfig, run_id: str, started: float) -> tuple[GateOutcome, Evaluation, dict[str, float]]:
    data = ingest_line(config)
    work = patchline_home() / "runs" / config.name / run_id
    detectors = set(config.evaluation.detectors)
    calibration_set, test_set, extra = {}, {}, {}
    # Both branches are submitted before either is awaited, so PatchCore and OE-SDN run side by side.
    if "patchcore" in detectors:
        stored = extract_features_task.submit(config, data.manifest.rows)
        selected = select_coreset_task.submit(config, stored, data.fit)
        bank = build_memory_bank_task.submit(config, stored, data.fit, selected)
    if detectors & {"oesdn", "ae"}:
        autoencoder = train_autoencoder_task.submit(config, data.fit)
        sdn = train_sdn_task.submit(config, data.fit, autoencoder) if "oesdn" in detectors else None
    bundle_parts: dict = {}
    if "patchcore" in detectors:
        stored, selected, bank = stored.result(), selected.result(), bank.result()
        calibration_set["patchcore"] = score_patchcore_task(stored, bank, data.calibration)
        test_set["patchcore"] = score_patchcore_task(stored, bank, data.test)
        bundle_parts.update(bank=bank, backbone_weights=backbone_weights_file(config.patchcore.backbone,
                                                                              config.patchcore.weights_path))
        extra.update(time_extract_features_s=stored.seconds, time_coreset_s=selected.seconds,
                     features_new_images=stored.written, memory_bank_rows=len(bank.features),
                     memory_bank_dim=bank.features.shape[1], coreset_candidates=selected.candidates,
                     coreset_radius=selected.coreset.radius)
    histories = {}
    if detectors & {"oesdn", "ae"}:
        autoencoder = autoencoder.result()
        sdn = sdn.result() if sdn is not None else None
        calibration_set.update(score_reconstruction_task(config, autoencoder, sdn, data.calibration))
        test_set.update(score_reconstruction_task(config, autoencoder, sdn, data.test))
        bundle_parts.update(autoencoder=autoencoder.network, sdn=sdn.network if sdn else None)
        histories["autoencoder"] = autoencoder.history
        extra["time_train_autoencoder_s"] = autoencoder.seconds
        if sdn is not None:
            histories["sdn"] = sdn.history
            extra["time_train_sdn_s"] = sdn.seconds
    if "darkness" in detectors:
        calibration_set.update(score_darkness_task(config, data.calibration))
        test_set.update(score_darkness_task(config, data.test))
    evaluation = evaluate_task(config, data.test, calibration_set, test_set, work / "plots")
    bundle = save_bundle(work / "bundle", config, evaluation.calibration, **bundle_parts)
    extra["time_until_logging_s"] = time.perf_counter() - started
    model_uri = log_rebuild_task(run_id, config, data, evaluation, histories, extra, bundle, work)
    outcome = register_and_gate_task(config, run_id, model_uri, data, evaluation)
    extra["time_total_s"] = time.perf_counter() - started
    return outcome, evaluation, extra


def _publish_summary(config: LineConfig, run_id: str, evaluation: Evaluation, outcome: GateOutcome,
                     timings: dict[str, float]) -> None:
    """The Prefect markdown artifact: metrics per detector, the gate's decision, and the MLflow links."""
    ui = os.environ.get(MLFLOW_UI_ENV, "http://127.0.0.1:5000").rstrip("/")
    experiment = configure_mlflow().get_run(run_id).info.experiment_id
    columns = ["image_auroc", "image_f1_max", "threshold", "fpr_at_threshold", "miss_rate_at_threshold",
               "pixel_auroc", "aupro_30"]
    shown = [c for c in columns if any(c in m for m in evaluation.metrics.values())]
    rows = [f"| {name}{' (best)' if name == evaluation.best else ''}{' (decides)' if name == evaluation.calibration.decision_detector else ''} | "
            + " | ".join(f"{m[c]:.4f}" if c in m else "–" for c in shown) + " |"
            for name, m in evaluation.metrics.items()]
    verdict = "promoted to champion" if outcome.decision.promote else f"not promoted (champion stays v{outcome.champion})"
    markdown = "\n".join([
        f"# Rebuild of `{config.name}`", "",
        "| detector | " + " | ".join(shown) + " |", "|---" * (len(shown) + 1) + "|", *rows, "",
        f"**Gate:** version {outcome.version} {verdict}. {outcome.decision.reason}", "",
        f"- MLflow run: {ui}/#/experiments/{experiment}/runs/{run_id}",
        f"- Model version: {ui}/#/models/{registered_model_name(config.name)}/versions/{outcome.version}",
        "", "Stage times (s): " + ", ".join(f"{k.removeprefix('time_').removesuffix('_s')} {v:.1f}"
                                            for k, v in timings.items() if k.startswith("time_")),
    ])
    create_markdown_artifact(markdown=markdown, key=f"rebuild-{config.name}",
                             description=f"Rebuild of {config.name}: metrics and gate decision")
    get_run_logger().info("%s: version %s %s", config.name, outcome.version, verdict)
