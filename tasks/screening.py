"""The screen: every good training image the champion has not seen is scored by it before anything is
fitted, and those it calls anomalous are quarantined (neither fitted nor calibrated on), each listed with
its score and heat map in the run's `screening/` artifacts. A reviewer who finds one good after all
accepts it (`patchline accept`), and from then on it passes."""

from __future__ import annotations

import csv
import dataclasses
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from patchline.models.config import LineConfig
from patchline.models.patchcore.memory_bank import MemoryBank
from patchline.models.patchcore.outliers import leave_one_image_out_scores, unlike_the_rest
from patchline.storage.pixels import read_pixels
from patchline.storage.plots import save_heatmap_overlay
from patchline.storage.pyfunc_model import MAPS_PARAM
from patchline.storage.registry import accepted_images, champion_version, registered_model_name
from patchline.storage.tag_names import DECISION_DETECTOR_TAG
from patchline.storage.tracking import configure_mlflow
from patchline.tasks.ingest import LineData
from patchline.tasks.patchcore import SelectedCoreset, StoredFeatures

MANIFEST_ARTIFACT = "data/manifest.csv"
SCREENING_ARTIFACTS = "screening"
# Images scored per call of the champion: bounds the memory of the maps held at once.
_BATCH = 16


@dataclass(frozen=True)
class QuarantinedImage:
    path: str
    score: float
    score_unit: float   # 0..1, 0.5 at the champion's threshold (NaN for champions from before that scale)
    threshold: float
    heatmap: str        # file name under the run's `screening/` artifacts


@dataclass(frozen=True)
class UnlikeImages:
    """A first build's training images whose patches no other training image has (models/patchcore/outliers.py):
    reported, not quarantined."""

    cutoff: float
    images: tuple[tuple[str, float], ...]   # (path, leave-one-image-out score), highest first


@dataclass(frozen=True)
class Screening:
    """What the screen did: which champion screened, how many new images it scored, which it quarantined."""

    note: str
    champion: str | None = None            # the screening version; None for a line's first build
    decision_detector: str | None = None   # the champion's deciding detector, which its challenger keeps
    screened: int = 0
    accepted: int = 0                      # new images a reviewer had accepted: not screened
    quarantined: tuple[QuarantinedImage, ...] = ()
    unlike: UnlikeImages | None = None      # a first build's report, where PatchCore was built

    @property
    def kept_decision(self) -> tuple[str, str] | None:
        """(champion version, its deciding detector), as `evaluate_task` takes it."""
        return (self.champion, self.decision_detector) if self.champion and self.decision_detector else None


@task(name="screen-training-images", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def screen_training_images_task(config: LineConfig, run_id: str, work_dir: Path, data: LineData,
                                screen: bool = True) -> tuple[LineData, Screening]:
    """The line's data without the new training images its champion calls anomalous, and what was screened
    (with `screen` False: the data as it is, and the champion whose deciding detector the challenger keeps)."""
    client = configure_mlflow()
    champion = champion_version(client, config.name)
    if champion is None:
        return data, Screening("no champion yet: this first version's training images are not screened")
    run = client.get_run(champion.run_id)
    version = str(champion.version)
    detector = run.data.tags.get(DECISION_DETECTOR_TAG)
    known = _known_training_ids(champion.run_id)
    accepted = accepted_images(client, config.name)
    new = [row for row in [*data.fit, *data.calibration] if row.id not in known]
    unseen = [row for row in new if row.id not in accepted]
    base = Screening("", version, detector, len(unseen), len(new) - len(unseen))
    if not screen:
        return data, dataclasses.replace(base, screened=0, note=f"not screened (screen=False): {len(unseen)} new "
                                                                "training images fitted on as they are")
    if not unseen:
        note = f"no new training images since champion v{version}" if not new else \
            f"{len(new)} new training images, every one accepted by a reviewer before"
        return data, dataclasses.replace(base, note=note)
    model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(config.name)}/{version}")
    folder = work_dir / SCREENING_ARTIFACTS
    folder.mkdir(parents=True, exist_ok=True)
    quarantined: list[QuarantinedImage] = []
    reasons: dict[str, str] = {}
    for start in range(0, len(unseen), _BATCH):
        rows = unseen[start:start + _BATCH]
        pixels = [read_pixels(row.source) for row in rows]
        result = model.predict(pixels, params={MAPS_PARAM: True})
        for i in np.flatnonzero(result["decision"]):
            row = rows[i]
            heatmap = f"{len(quarantined):03d}_{re.sub(r'[^A-Za-z0-9._-]', '_', Path(row.source).stem)[:60]}.png"
            save_heatmap_overlay(pixels[i], result["anomaly_map"][i], float(result["threshold"][i]), folder / heatmap)
            quarantined.append(QuarantinedImage(row.source, float(result["score"][i]), float(result["score_unit"][i]),
                                                float(result["threshold"][i]), heatmap))
            reasons[row.id] = _reason(quarantined[-1], version)
    screening = dataclasses.replace(base, quarantined=tuple(quarantined), note=(
        f"champion v{version} ({detector}) scored {len(unseen)} new training images and quarantined "
        f"{len(quarantined)}" + (f"; {base.accepted} more were accepted by a reviewer before" if base.accepted else "")))
    log = get_run_logger()
    log.info("%s: screen: %s", config.name, screening.note)
    if quarantined:
        for row in unseen:
            if row.id in reasons:
                log.warning("%s: quarantined %s: %s", config.name, row.source, reasons[row.id])
        _write_table(quarantined, folder / "quarantined.csv")
        client.log_artifacts(run_id, str(folder), SCREENING_ARTIFACTS)
        data = LineData(data.manifest.without(set(reasons), reasons), [r for r in data.fit if r.id not in reasons],
                        [r for r in data.calibration if r.id not in reasons], data.test)
    return data, screening


def _reason(item: QuarantinedImage, version: str) -> str:
    return (f"champion v{version} scores it {item.score:.4f} (threshold {item.threshold:.4f}, 0-1 score "
            f"{item.score_unit:.3f}): anomalous; `patchline accept` passes it if a reviewer finds it good")


def _known_training_ids(run_id: str) -> set[str]:
    """The good training images (fitted or held out for calibration) of the champion's rebuild."""
    with tempfile.TemporaryDirectory() as folder:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MANIFEST_ARTIFACT, dst_path=folder)
        with open(path, newline="") as handle:
            return {row["id"] for row in csv.DictReader(handle) if row["split"] == "train" and row["label"] == "good"}


def _write_table(quarantined: list[QuarantinedImage], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[field.name for field in dataclasses.fields(QuarantinedImage)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(item) for item in quarantined)
    return path


@task(name="flag-unlike-training-images", cache_policy=NO_CACHE)
def flag_unlike_training_images_task(run_id: str, work_dir: Path, features: StoredFeatures, selected: SelectedCoreset,
                                     bank: MemoryBank) -> UnlikeImages:
    """A first build's fit images whose bank patches lie far from every other image's (leave one image out),
    listed in the run's `screening/unlike.csv`; the build still fits on them."""
    per_image = features.grid[0] * features.grid[1]
    # The bank's rows follow the coreset's sorted patch indices (build_memory_bank_task).
    scores = leave_one_image_out_scores(bank.features, np.sort(selected.coreset.indices) // per_image,
                                        len(selected.rows))
    flagged, cutoff = unlike_the_rest(scores)
    found = UnlikeImages(cutoff, tuple((selected.rows[i].source, float(scores[i]))
                                       for i in flagged[np.argsort(-scores[flagged])]))
    if found.images:
        folder = work_dir / SCREENING_ARTIFACTS
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "unlike.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "leave_one_out_score", "cutoff"])
            writer.writerows((path, f"{score:.6f}", f"{cutoff:.6f}") for path, score in found.images)
        configure_mlflow().log_artifact(run_id, str(folder / "unlike.csv"), SCREENING_ARTIFACTS)
    get_run_logger().info("first build: %d of %d training images unlike the rest (leave-one-image-out score above "
                          "%.4f); reported, still fitted on", len(found.images), len(selected.rows), cutoff)
    return found
