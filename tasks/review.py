"""The review page of a rebuild (storage/review_page.py), logged with its run as `review/review.html`."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from patchline.storage.review_page import ModelScores, QuarantinedPicture, write_review_page
from patchline.storage.tracking import configure_mlflow
from patchline.tasks.evaluate import Evaluation
from patchline.tasks.ingest import LineData
from patchline.tasks.screening import SCREENING_ARTIFACTS, Screening
from patchline.tasks.tracking import REVIEW_ARTIFACT, GateOutcome, StartedRun


@task(name="write-review-page", cache_policy=NO_CACHE)
def write_review_page_task(line: str, run: StartedRun, data: LineData, evaluation: Evaluation, outcome: GateOutcome,
                           screening: Screening) -> str:
    """Challenger and champion on the same test set, the images they get wrong or disagree on, and the
    quarantined training images; returns the artifact path."""
    detector = evaluation.calibration.decision_detector
    challenger = ModelScores(f"challenger v{outcome.version} ({detector})", evaluation.decision_test.scores,
                             evaluation.calibration.thresholds[detector])
    known = outcome.champion_scores
    champion = None if known is None else ModelScores(f"champion v{known.version} ({known.detector})",
                                                      known.scores, known.threshold)
    verdict = ("awaiting a person's approval: " if outcome.awaiting_approval else
               "promoted: " if outcome.decision.promote else "rejected: ") + outcome.decision.reason
    if outcome.champion is not None and champion is None:
        verdict += f" (champion v{outcome.champion} logged no per-image test scores, so it is not shown)"
    quarantined = [QuarantinedPicture(item.path, item.score, item.threshold,
                                      run.work_dir / SCREENING_ARTIFACTS / item.heatmap) for item in screening.quarantined]
    page = write_review_page(run.work_dir / REVIEW_ARTIFACT, f"{line} v{outcome.version}: review", verdict, data.test,
                             challenger, evaluation.decision_test.maps, champion, quarantined)
    configure_mlflow().log_artifact(run.run_id, str(page), REVIEW_ARTIFACT.rsplit("/", 1)[0])
    get_run_logger().info("review page: %s in the run's artifacts (%.0f kB)", REVIEW_ARTIFACT,
                          page.stat().st_size / 1024)
    return REVIEW_ARTIFACT
