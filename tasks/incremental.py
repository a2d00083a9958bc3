"""What a rebuild reuses of its champion: when only new good images arrived since the champion was built
(same model settings, none of its fit images gone), the memory bank grows by the new images' patches (the
networks are trained on all the fit images in every rebuild: tasks/detectors.py). Every other case is a
full rebuild, and says why."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from patchline.models.config import LineConfig
from patchline.models.incremental import MAX_NEW_SHARE, too_many_new
from patchline.models.line_detector import LineDetector
from patchline.storage.manifest import ManifestRow
from patchline.storage.registry import champion_version, registered_model_name
from patchline.storage.tag_names import MODEL_CONFIG_TAG
from patchline.storage.tracking import configure_mlflow, model_config_fingerprint
from patchline.tasks.ingest import LineData

# The champion run's artifact listing the ids of the images its detectors were fitted on.
FIT_IDS_ARTIFACT = "data/fit_ids.txt"


@dataclass(frozen=True)
class Reuse:
    """The champion a rebuild starts from and the fit images it has not seen, or (no `detector`) why the
    rebuild starts from nothing."""

    reason: str
    version: str | None = None
    detector: LineDetector | None = None
    coreset_radius: float | None = None
    new_fit: tuple[ManifestRow, ...] = ()

    @property
    def incremental(self) -> bool:
        return self.detector is not None


def write_fit_ids(data: LineData, folder: Path) -> Path:
    """The fit images' ids, one per line: logged with every rebuild so a later one knows what it saw."""
    path = folder / Path(FIT_IDS_ARTIFACT).name
    path.write_text("".join(f"{row.id}\n" for row in data.fit))
    return path


@task(name="find-reusable-champion", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def find_reusable_champion_task(config: LineConfig, data: LineData, full: bool) -> Reuse:
    """The champion to update, when the only change since it was built is new good fit images."""
    reuse = _reusable_champion(config, data, full)
    get_run_logger().info("%s: %s", config.name, ("incremental rebuild " if reuse.incremental else "full rebuild: ")
                          + reuse.reason)
    return reuse


def _reusable_champion(config: LineConfig, data: LineData, full: bool) -> Reuse:
    if full:
        return Reuse("asked for (--full, or the flow parameter full)")
    client = configure_mlflow()
    champion = champion_version(client, config.name)
    if champion is None:
        return Reuse("no champion to start from")
    name = f"champion v{champion.version}"
    run = client.get_run(champion.run_id)
    if run.data.tags.get(MODEL_CONFIG_TAG) != model_config_fingerprint(config):
        return Reuse(f"the model settings (or patchline's version) differ from those of {name}")
    with tempfile.TemporaryDirectory() as folder:
        try:
            listing = mlflow.artifacts.download_artifacts(run_id=champion.run_id, artifact_path=FIT_IDS_ARTIFACT,
                                                          dst_path=folder)
        except (OSError, mlflow.exceptions.MlflowException):
            return Reuse(f"{name} has no record of the images it was fitted on (built before incremental rebuilds)")
        old_ids = set(Path(listing).read_text().split())
    gone = old_ids - {row.id for row in data.fit}
    if gone:
        return Reuse(f"{len(gone)} of the {len(old_ids)} images {name} was fitted on are no longer fit images "
                     "(removed, relabelled or moved to calibration)")
    new_fit = tuple(row for row in data.fit if row.id not in old_ids)
    if not new_fit:
        return Reuse(f"no new good training images since {name}")
    if too_many_new(len(new_fit), len(old_ids)):
        return Reuse(f"{len(new_fit)} new fit images, more than {MAX_NEW_SHARE:.0%} of the {len(old_ids)} of {name}")
    try:
        model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(config.name)}/{champion.version}")
    except (OSError, ValueError, mlflow.exceptions.MlflowException) as error:
        return Reuse(f"the model of {name} could not be loaded ({type(error).__name__}: {error})")
    return Reuse(f"from {name} (run {champion.run_id}): {len(new_fit)} new fit images beside its {len(old_ids)}",
                 str(champion.version), model.unwrap_python_model().detector, run.data.metrics.get("coreset_radius"),
                 new_fit)
