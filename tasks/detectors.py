"""Fitting and scoring any registered detector (models/detectors.py): one task each, named by detector.

Detectors that fit on images are fitted here, in the registry's order (`after`), on all the fit images in
every rebuild (an incremental one too: the same images, config and seed give the same detector). PatchCore
fits from the line's patch-feature store instead (tasks/patchcore.py), and scores from it too; its bank is
what an incremental rebuild grows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from patchline.models.config import LineConfig
from patchline.models.detector_spec import Detector
from patchline.models.detectors import DETECTORS, fitting_order
from patchline.models.scoring.detection import Detections
from patchline.models.scoring.self_check import MAX_IMAGES, SelfCheck, judge_self_check, painted_copies
from patchline.models.process import stopwatch
from patchline.storage.manifest import ManifestRow
from patchline.storage.pixels import PixelRows


@dataclass(frozen=True)
class FittedDetector:
    """A detector fitted in this rebuild: the per-epoch losses of its networks, its time, and what it reused."""

    detector: Detector
    histories: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class FitPlan:
    """The enabled detectors by how they are fitted: from the patch-feature store, or from images in order."""

    from_features: list[str]
    from_images: list[str]

    def after(self, name: str) -> list[str]:
        """The detectors fitted from images that `name` waits for."""
        return [earlier for earlier in DETECTORS[name].after if earlier in self.from_images]


def plan_fits(config: LineConfig) -> FitPlan:
    ordered = fitting_order(config.evaluation.detectors)
    return FitPlan([name for name in ordered if DETECTORS[name].fit is None],
                   [name for name in ordered if DETECTORS[name].fit is not None])


@task(name="fit-detector", task_run_name="fit-{name}", cache_policy=NO_CACHE)
def fit_detector_task(config: LineConfig, name: str, rows: list[ManifestRow],
                      fitted: dict[str, FittedDetector]) -> FittedDetector:
    """One detector fitted on the line's good fit images; `fitted` holds the detectors of its `after` fitted
    earlier in this rebuild."""
    with stopwatch() as elapsed:
        result = DETECTORS[name].fit(config, PixelRows(rows), {key: value.detector for key, value in fitted.items()})
    note = f"trained from scratch on {len(rows)} fit images" if result.histories else ""
    logger = get_run_logger()
    for network, history in result.histories.items():
        best_val = min(history["val_loss"]) if history.get("val_loss") else float("nan")
        logger.info("%s: %s %d epochs, last train loss %.4g, best val loss %.4g", name, network,
                    len(history["train_loss"]), history["train_loss"][-1], best_val)
    logger.info("%s: fitted in %.0f s%s", name, elapsed[0], f" ({note})" if note else "")
    return FittedDetector(result.detector, result.histories, elapsed[0], note)


@task(name="score-detector", task_run_name="score-{name}", cache_policy=NO_CACHE)
def score_detector_task(name: str, detector: Detector, rows: list[ManifestRow]) -> Detections:
    """Detections of `rows` by one fitted detector, from their pixels."""
    return detector.score(PixelRows(rows))


@task(name="self-check", cache_policy=NO_CACHE)
def self_check_task(config: LineConfig, fitted: dict[str, Detector], rows: list[ManifestRow],
                    good: dict[str, Detections]) -> SelfCheck:
    """The self-check (models/scoring/self_check.py) of the `fitted` detectors that take it: painted copies
    of the held-out good `rows` scored against `good`, their detections of the rows themselves."""
    settings = config.evaluation
    detectors = {name: detector for name, detector in fitted.items() if DETECTORS[name].self_checked}
    if not detectors:
        return SelfCheck({}, {}, len(rows))
    with stopwatch() as elapsed:
        painted = painted_copies(PixelRows(rows[:MAX_IMAGES])[:], config.oesdn.seed)
        check = judge_self_check({name: good[name].scores[:MAX_IMAGES] for name in detectors},
                                 {name: detector.score(painted).scores for name, detector in detectors.items()},
                                 settings.self_check_min_auroc, settings.detectors,
                                 {name: DETECTORS[name].after for name in detectors}, settings.self_check_max_gap)
    logger = get_run_logger()
    if not check.aurocs:
        logger.info("self-check skipped: %d held-out goods, fewer than it needs", check.images)
    else:
        logger.info("self-check on %d held-out goods and painted copies: image AUROC %s in %.1f s",
                    check.images, {name: round(auroc, 4) for name, auroc in check.aurocs.items()}, elapsed[0])
    for name, reason in check.left_out.items():
        logger.warning("%s %s", name, reason)
    for name, auroc in check.aurocs.items():
        if auroc < settings.self_check_min_auroc and name not in check.left_out:
            logger.warning("%s kept although its self-check image AUROC %.3f < %g: leaving it out would leave "
                           "the line no detector", name, auroc, settings.self_check_min_auroc)
    return check
