"""The rebuild of one product line: ingest → features → coreset → bank ∥ AE → SDN (→ darkness) → evaluate →
package → MLflow → gate. Every step with a side effect is a task, so the Prefect UI shows each one."""

from __future__ import annotations

import time

from prefect import flow
from prefect.runtime import flow_run

from patchline.models.config import LineConfig
from patchline.tasks.darkness import score_darkness_task
from patchline.tasks.evaluate import Evaluation, evaluate_task
from patchline.tasks.incremental import find_reusable_champion_task
from patchline.tasks.ingest import LineData, ingest_line
from patchline.tasks.line_lock import clear_killed_runs_task, rebuild_lock
from patchline.tasks.oesdn import score_reconstruction_task, train_autoencoder_task, train_sdn_task
from patchline.tasks.packaging import export_model_task, package_model_task
from patchline.tasks.patchcore import build_memory_bank_task, extract_features_task, score_patchcore_task, select_coreset_task
from patchline.tasks.tracking import (
    GateOutcome, StartedRun, UnchangedChampion, check_tracking_task, find_unchanged_champion_task, finish_run_task,
    log_rebuild_task, memory_bank_tags, publish_summary_task, record_skip_task, register_and_gate_task, start_run_task)


@flow(name="rebuild-product-line", flow_run_name="rebuild-{config.name}")
def rebuild_product_line(config: LineConfig, wait: bool = True, force: bool = False, full: bool = False) -> dict:
    """Rebuild every detector of one line, evaluate it, log it to MLflow and let the gate decide on it.

    One rebuild per line at a time: another one still running is waited for, or with `wait=False`
    this one fails at once naming it. A line whose images and model settings equal its champion's is
    not rebuilt (its run records the skip), unless `force`. When only new good images arrived, the
    champion's bank is grown and its networks warm-started (tasks/incremental.py), unless `full`."""
    started = time.perf_counter()
    check_tracking_task()
    with rebuild_lock(config.name, wait, flow_run.get_id()) as killed_flow_run:
        clear_killed_runs_task(config, killed_flow_run)
        run = start_run_task(config, flow_run.get_id())
        unchanged = None
        try:
            data = ingest_line(config)
            unchanged = None if force else find_unchanged_champion_task(config, data)
            if unchanged is not None:
                reason = record_skip_task(run, data, unchanged)
            else:
                outcome, evaluation, timings, reuse = _rebuild(config, run, data, started, full)
        except BaseException as error:
            # The run says why it failed; the registry was never touched, so `champion` stays where it was.
            finish_run_task(run, f"{type(error).__name__}: {error}")
            raise
        finish_run_task(run)
    if unchanged is not None:
        return _skipped(config, run, unchanged, reason)
    publish_summary_task(config, run, evaluation, outcome, timings, reuse)
    return {"line": config.name, "run_id": run.run_id, "version": outcome.version,
            "promoted": outcome.decision.promote, "reason": outcome.decision.reason, "skipped": False,
            "reuse": reuse,
            "decision_detector": evaluation.calibration.decision_detector,
            "image_auroc": {name: m["image_auroc"] for name, m in evaluation.metrics.items()}}


def _skipped(config: LineConfig, run: StartedRun, unchanged: UnchangedChampion, reason: str) -> dict:
    """The result of a skipped rebuild: the champion's own figures, which still stand."""
    suffix = "_image_auroc"
    return {"line": config.name, "run_id": run.run_id, "version": unchanged.version, "promoted": False,
            "reason": reason, "skipped": True, "decision_detector": unchanged.decision_detector,
            "image_auroc": {key.removesuffix(suffix): value for key, value in unchanged.metrics.items()
                            if key.endswith(suffix)}}


def _rebuild(config: LineConfig, run: StartedRun, data: LineData, started: float,
             full: bool) -> tuple[GateOutcome, Evaluation, dict[str, float], dict[str, str]]:
    detectors = set(config.evaluation.detectors)
    calibration_set, test_set, extra, tags = {}, {}, {}, {}
    bank = autoencoder = sdn = None
    champion = find_reusable_champion_task(config, data, full)
    reuse = {"rebuild": ("incremental " if champion.incremental else "full rebuild: ") + champion.reason}
    # Both branches are submitted before either is awaited, so PatchCore and OE-SDN run side by side.
    if "patchcore" in detectors:
        stored = extract_features_task.submit(config, data.manifest.rows)
        selected = select_coreset_task.submit(config, stored, data.fit, champion)
        bank = build_memory_bank_task.submit(config, stored, selected)
    if detectors & {"oesdn", "ae"}:
        autoencoder = train_autoencoder_task.submit(config, data.fit, champion)
        sdn = train_sdn_task.submit(config, data.fit, autoencoder, champion) if "oesdn" in detectors else None
    if bank is not None:
        stored, selected, bank = stored.result(), selected.result(), bank.result()
        kept = 0 if selected.kept is None else len(selected.kept)
        calibration_set["patchcore"] = score_patchcore_task(stored, bank, data.calibration, kept)
        test_set["patchcore"] = score_patchcore_task(stored, bank, data.test, kept)
        reuse["patchcore"] = selected.note
        tags.update(memory_bank_tags(bank))
        extra.update(time_extract_features_s=stored.seconds, time_coreset_s=selected.seconds,
                     features_new_images=stored.written, memory_bank_rows=len(bank.features),
                     memory_bank_dim=bank.features.shape[1], coreset_candidates=selected.candidates,
                     coreset_radius=selected.coreset.radius)
    histories = {}
    if autoencoder is not None:
        autoencoder = autoencoder.result()
        sdn = sdn.result() if sdn is not None else None
        calibration_set.update(score_reconstruction_task(config, autoencoder, sdn, data.calibration))
        test_set.update(score_reconstruction_task(config, autoencoder, sdn, data.test))
        histories["autoencoder"] = autoencoder.history
        extra["time_train_autoencoder_s"] = autoencoder.seconds
        reuse["autoencoder"] = autoencoder.note
        if sdn is not None:
            reuse["sdn"] = sdn.note
            histories["sdn"] = sdn.history
            extra["time_train_sdn_s"] = sdn.seconds
    if "darkness" in detectors:
        calibration_set["darkness"] = score_darkness_task(config, data.calibration)
        test_set["darkness"] = score_darkness_task(config, data.test)
    evaluation = evaluate_task(config, data.test, calibration_set, test_set, run.work_dir / "plots")
    bundle = package_model_task(config, evaluation.calibration, run.work_dir / "bundle", bank, autoencoder, sdn)
    export = export_model_task(bundle, run.work_dir / "export") if config.export_onnx else None
    extra["time_until_logging_s"] = time.perf_counter() - started
    model_uri = log_rebuild_task(run.run_id, config, data, evaluation, histories, extra, reuse, tags, bundle,
                                 export, run.work_dir)
    outcome = register_and_gate_task(config, run.run_id, model_uri, data, evaluation)
    extra["time_total_s"] = time.perf_counter() - started
    return outcome, evaluation, extra, reuse
