"""The rebuild of one product line: ingest → screen → features → coreset → bank ∥ each detector fitted on
images (AE → OE-SDN, darkness, …) → evaluate → package → MLflow → gate. Every step with a side effect is a
task, so the Prefect UI shows each one; the detectors are those the line enables, whatever is registered."""

from __future__ import annotations

import dataclasses
import time

from prefect import flow
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.runtime import flow_run

from patchline.models.config import LineConfig
from patchline.tasks import outcome as outcomes
from patchline.tasks.approval import Approval, apply_approval_task
from patchline.tasks.detectors import fit_detector_task, plan_fits, score_detector_task, self_check_task
from patchline.tasks.evaluate import Evaluation, evaluate_task
from patchline.tasks.incremental import find_reusable_champion_task
from patchline.tasks.ingest import LineData, ingest_line
from patchline.tasks.line_lock import clear_killed_runs_task, rebuild_lock
from patchline.tasks.packaging import export_model_task, package_model_task
from patchline.tasks.patchcore import build_memory_bank_task, extract_features_task, score_patchcore_task, select_coreset_task
from patchline.tasks.review import REVIEW_ARTIFACT, write_review_page_task
from patchline.tasks.run_logs import quiet_completed_states
from patchline.tasks.screening import Screening, flag_unlike_training_images_task, screen_training_images_task
from patchline.tasks.tracking import (
    GateOutcome, StartedRun, UnchangedChampion, check_tracking_task, find_unchanged_champion_task, finish_run_task,
    log_rebuild_task, memory_bank_tags, name_run_task, publish_summary_task, record_skip_task, register_and_gate_task,
    start_run_task)

quiet_completed_states()


@flow(name="rebuild-product-line", flow_run_name="{config.name} rebuilding")
def rebuild_product_line(config: LineConfig, wait: bool = True, force: bool = False, full: bool = False,
                         screen: bool = True) -> outcomes.RebuildResult:
    """Rebuild every detector of one line, evaluate it, log it to MLflow and let the gate decide on it.

    One rebuild per line at a time: another one still running is waited for, or with `wait=False`
    this one fails at once naming it. New good training images are screened by the champion first, and
    those it calls anomalous are quarantined (tasks/screening.py). A line whose images (after the screen)
    and model settings equal its champion's is not rebuilt (its run records the skip), unless `force`.
    When only new good images arrived, the champion's bank is grown (tasks/incremental.py), unless `full`;
    the networks are trained on all the fit images in every rebuild. `screen=False` fits on every good image, unscreened: for
    comparisons (benchmarks/poison.py), not for a nightly. With `promotion.approval: manual` a challenger
    that passes the gate waits, the flow run paused, for a person's answer in the Prefect UI."""
    started = time.perf_counter()
    check_tracking_task()
    with rebuild_lock(config.name, wait, flow_run.get_id()) as killed_flow_run:
        clear_killed_runs_task(config, killed_flow_run)
        run = start_run_task(config, flow_run.get_id())
        unchanged = None
        try:
            data = ingest_line(config)
            unchanged = None if force else find_unchanged_champion_task(config, data)
            screening = Screening("the images equal the champion's: nothing new to screen")
            if unchanged is None:
                data, screening = screen_training_images_task(config, run.run_id, run.work_dir, data, screen)
                unchanged = None if force or not screening.quarantined else find_unchanged_champion_task(config, data)
            if unchanged is not None:
                reason = record_skip_task(run, data, unchanged, screening)
                said = outcomes.unchanged(config.name, unchanged.version, screening)
            else:
                gate, evaluation, timings, reuse, screening = _rebuild(config, run, data, screening, started, full)
                said = _gated(config, gate, evaluation, reuse)
            name_run_task(run, said)
        except BaseException as error:
            # The run says why it failed; the registry was never touched, so `champion` stays where it was.
            # Naming it is best effort (its state, not an exception): marking it FAILED is what must happen.
            name_run_task(run, outcomes.failed(config.name, error), return_state=True)
            finish_run_task(run, f"{type(error).__name__}: {error}")
            raise
        finish_run_task(run)
    if unchanged is not None:
        return _skipped(config, run, unchanged, reason, screening)
    promoted, reason = gate.decision.promote, gate.decision.reason
    if gate.awaiting_approval:
        promoted, reason = _approval(config, run, gate)
        name_run_task(run, _gated(config, gate, evaluation, reuse, promoted, reason))
        gate = dataclasses.replace(gate, decision=dataclasses.replace(gate.decision, promote=promoted, reason=reason),
                                   awaiting_approval=False)
    publish_summary_task(config, run, evaluation, gate, timings, reuse, screening)
    return outcomes.RebuildResult(
        config.name, run.run_id, gate.version, promoted, reason, False, evaluation.calibration.decision_detector,
        {name: m["image_auroc"] for name, m in evaluation.metrics.items()}, screening, evaluation.decision_reason,
        reuse, evaluation.left_out)


def _gated(config: LineConfig, gate: GateOutcome, evaluation: Evaluation, reuse: dict[str, str],
           approved: bool | None = None, answer: str = "") -> outcomes.RunOutcome:
    detector, metric = evaluation.calibration.decision_detector, config.promotion.metric
    figure = f"{detector} {metric} {evaluation.metrics[detector][metric]:.4f}"
    incremental = reuse["rebuild"].startswith("incremental")
    return outcomes.gated(config.name, gate.version, gate.decision, figure, incremental,
                          gate.awaiting_approval and approved is None, approved, answer)


def _approval(config: LineConfig, run: StartedRun, gate: GateOutcome) -> tuple[bool, str]:
    """Wait, paused, for a person's answer to the challenger; returns whether it became champion and why."""
    hours = config.promotion.approval_timeout_hours
    question = (f"Approve **{config.name} v{gate.version}** as champion (now v{gate.champion})? It passed the gate: "
                f"{gate.decision.reason}. Review page: `{REVIEW_ARTIFACT}` in MLflow run {run.run_id}. Without an "
                f"answer within {hours:g} h the champion stays.")
    try:
        answer = pause_flow_run(wait_for_input=Approval.with_initial_data(description=question, approve=False,
                                                                          reviewer=""),
                                timeout=max(1, round(hours * 3600)), key=f"approve-v{gate.version}")
    except FlowPauseTimeout:
        answer = None
    return apply_approval_task(config.name, gate, answer, hours)


def _skipped(config: LineConfig, run: StartedRun, unchanged: UnchangedChampion, reason: str,
             screening: Screening) -> outcomes.RebuildResult:
    """The result of a skipped rebuild: the champion's own figures, which still stand."""
    suffix = "_image_auroc"
    return outcomes.RebuildResult(config.name, run.run_id, unchanged.version, False, reason, True,
                                  unchanged.decision_detector,
                                  {key.removesuffix(suffix): value for key, value in unchanged.metrics.items()
                                   if key.endswith(suffix)}, screening)


def _rebuild(config: LineConfig, run: StartedRun, data: LineData, screening: Screening, started: float,
             full: bool) -> tuple[GateOutcome, Evaluation, dict[str, float], dict[str, str], Screening]:
    calibration_set, test_set, extra, tags, histories, fitted = {}, {}, {}, {}, {}, {}
    plan = plan_fits(config)
    champion = find_reusable_champion_task(config, data, full)
    reuse = {"rebuild": ("incremental " if champion.incremental else "full rebuild: ") + champion.reason}
    # Every fit is submitted before any is awaited, so PatchCore and the networks train side by side.
    if plan.from_features:
        stored = extract_features_task.submit(config, data.manifest.rows)
        selected = select_coreset_task.submit(config, stored, data.fit, champion)
        bank = build_memory_bank_task.submit(config, stored, selected)
    fits = {}
    for name in plan.from_images:
        fits[name] = fit_detector_task.submit(config, name, data.fit, {e: fits[e] for e in plan.after(name)})
    for name in plan.from_features:
        stored, selected, fitted[name] = stored.result(), selected.result(), bank.result()
        kept = 0 if selected.kept is None else len(selected.kept)
        calibration_set[name] = score_patchcore_task(stored, fitted[name], data.calibration, kept)
        test_set[name] = score_patchcore_task(stored, fitted[name], data.test, kept)
        reuse[name] = selected.note
        if screening.champion is None and selected.kept is None:
            screening = dataclasses.replace(screening, unlike=flag_unlike_training_images_task(
                run.run_id, run.work_dir, stored, selected, fitted[name].bank))
        tags.update(memory_bank_tags(fitted[name].bank))
        extra.update(time_extract_features_s=stored.seconds, time_coreset_s=selected.seconds,
                     features_new_images=stored.written, memory_bank_rows=len(fitted[name].bank.features),
                     memory_bank_dim=fitted[name].bank.features.shape[1], coreset_candidates=selected.candidates,
                     coreset_radius=selected.coreset.radius)
    for name, future in fits.items():
        result = future.result()
        fitted[name] = result.detector
        calibration_set[name] = score_detector_task(name, result.detector, data.calibration)
        test_set[name] = score_detector_task(name, result.detector, data.test)
        histories.update(result.histories)
        extra[f"time_fit_{name}_s"] = result.seconds
        if result.note:
            reuse[name] = result.note
    self_check = self_check_task(config, {name: fitted[name] for name in fits}, data.calibration, calibration_set)
    evaluation = evaluate_task(config, data.test, calibration_set, test_set, run.work_dir / "plots",
                               screening.kept_decision, self_check)
    bundle = package_model_task(config, evaluation.calibration, run.work_dir / "bundle", fitted)
    export = export_model_task(bundle, run.work_dir / "export") if config.export_onnx else None
    extra["time_until_logging_s"] = time.perf_counter() - started
    model_uri = log_rebuild_task(run.run_id, config, data, evaluation, histories, extra, reuse, tags, bundle,
                                 export, run.work_dir)
    outcome = register_and_gate_task(config, run.run_id, model_uri, data, evaluation)
    write_review_page_task(config.name, run, data, evaluation, outcome, screening)
    extra["time_total_s"] = time.perf_counter() - started
    return outcome, evaluation, extra, reuse, screening
