"""The typed configuration of one product line: what every detector, the gate and the schedule use.

Pure pydantic, so the algorithms in `models/` can take their settings without touching storage;
`storage/line_config.py` reads and writes these objects as YAML files.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ElpvSource(_Strict):
    """The bundled ELPV solar-cell set with the published anomaly-detection protocol."""

    kind: Literal["elpv"] = "elpv"
    cell_type: Literal["mono", "poly"] | None = None
    test_size: float = Field(0.25, gt=0, lt=1)
    seed: int = 42
    # Reading only part of the data keeps tests and smoke runs short; None = every image.
    limit_per_class: int | None = Field(None, ge=1)
    # The leading share of the train normals (after limit_per_class): rehearses a line whose good images
    # arrive over time, as benchmarks/incremental.py does; raising it adds images, keeping the others.
    train_share: float = Field(1.0, gt=0, le=1)


class MvtecSource(_Strict):
    """A folder in the MVTec AD layout: train/good, test/<defect>, ground_truth/<defect>/<name>_mask.png."""

    kind: Literal["mvtec"] = "mvtec"
    root: Path


class PatchCoreConfig(_Strict):
    backbone: Literal["efficientnet-lite0", "efficientnet-lite2", "wide_resnet50_2"] = "efficientnet-lite0"
    # Local weights file for torchvision backbones (nothing is downloaded at run time).
    weights_path: Path | None = None
    # Backbone stages whose outputs are concatenated (EfficientNet `_blocks` indices, ResNet `layerN`
    # numbers), shallow first; None = the backbone's stride-8 and stride-16 stage ends.
    layers: tuple[int, ...] | None = None
    neighbourhood: int = Field(3, ge=1)
    # Scale each image so its median intensity is mid-grey before the backbone, for images whose
    # overall brightness varies from part to part (electroluminescence: with the drive current). On
    # ELPV it lifted PatchCore alone on every line (benchmarks/README.md, "Brightness normalisation").
    normalise_brightness: bool = False
    # Reduce concatenated patch features to this many dims (adaptive average pooling); None keeps all.
    target_dim: int | None = Field(None, ge=1)
    coreset_ratio: float = Field(0.01, gt=0, le=1)
    # The coreset selects in a random projection to this many dims (none when the features have
    # fewer). 256 keeps Lite0's 152 and Lite2's dims whole: projecting Lite0 to 128 measured lower on
    # elpv-mono (benchmarks/README.md, "Figures behind settings in the code").
    projection_dim: int = Field(256, ge=1)
    # Eq. 7 of the PatchCore paper; with 1 neighbour the weight is always 0.
    reweight_neighbours: int = Field(9, ge=2)
    smoothing_sigma: float = Field(4.0, ge=0)
    batch_size: int = Field(16, ge=1)
    # Nearest-row search when scoring: "indexed" compares each patch with the bank's nearest cells only
    # and re-checks each image's most distant patches against the whole bank, so image scores are the
    # exact search's and maps are drawn from upper bounds (models/patchcore/nearest_index.py); "exact"
    # compares every patch with the whole bank (the reference). Scoring can choose with PATCHLINE_SEARCH.
    search: Literal["indexed", "exact"] = "indexed"

    @field_validator("neighbourhood")
    @classmethod
    def _odd(cls, size: int) -> int:
        if size % 2 == 0:
            raise ValueError(f"neighbourhood must be odd (centred on its patch), got {size}")
        return size


Augmentation = Literal["hflip", "vflip"]
# Each augmentation and each outlier-exposure turn as a 2 × 2 integer matrix acting on pixel coordinates.
_FLIPS: dict[str, tuple[int, int, int, int]] = {"hflip": (1, 0, 0, -1), "vflip": (-1, 0, 0, 1)}
_TURNS: dict[int, tuple[int, int, int, int]] = {1: (0, -1, 1, 0), 2: (-1, 0, 0, -1), 3: (0, 1, -1, 0)}


def _generated_group(generators: list[tuple[int, int, int, int]]) -> set[tuple[int, int, int, int]]:
    """Every composition of the generator matrices (a subgroup of the square's 8 symmetries)."""
    group = {(1, 0, 0, 1)}
    while True:
        grown = group | {(a * e + b * g, a * f + b * h, c * e + d * g, c * f + d * h)
                         for a, b, c, d in group for e, f, g, h in generators}
        if grown == group:
            return group
        group = grown


class OeSdnConfig(_Strict):
    # 64 px beat 128 px on ELPV for both the AE and OE-SDN, at a quarter of the cost
    # (benchmarks/README.md, "Figures behind settings in the code"). 16 px is the least the AE's four stride-2 stages take.
    image_size: int = Field(64, ge=16)
    channels: Literal[1, 3] = 1
    ae_base_width: int = Field(16, ge=4)
    ae_latent_dim: int = Field(64, ge=1)
    sdn_base_width: int = Field(32, ge=4)
    # Stride-2 stages of the SDN's U-Net; more stages widen what each output pixel sees (models/sdn.py).
    sdn_depth: int = Field(2, ge=1, le=5)
    # The training budget, in epochs: training stops earlier when the validation loss stops improving
    # (`patience`), so the same images, config and seed give the same weights on any machine load.
    epochs: int = Field(100, ge=1)
    sdn_epochs: int = Field(100, ge=1)
    # A guard, not a budget: a network still training after this many seconds fails the rebuild
    # (models/oesdn/training.py) instead of keeping weights that depend on the machine's load. None = no guard.
    max_train_seconds: float | None = Field(None, gt=0)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    oe_lambda: float = Field(0.5, ge=0, le=1)
    # Outlier exposure turns each image by one of these multiples of 90°, drawn per image.
    oe_quarter_turns: Annotated[tuple[Literal[1, 2, 3], ...], Field(min_length=1)] = (1, 2, 3)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    # Epochs without an improvement of the validation loss by more than `min_improvement` (relative)
    # before training stops.
    patience: int = Field(5, ge=1)
    min_improvement: float = Field(1e-3, ge=0, lt=1)
    # Random flips of the good images while training, none by default: a mirrored part is a defect for
    # objects, text and digits. A set of flips that composes to an outlier-exposure turn is rejected.
    augmentations: tuple[Augmentation, ...] = ()
    seed: int = 0
    # Gaussian σ in pixels of the anomaly map, so one noisy pixel does not decide the image score.
    smoothing_sigma: float = Field(4.0, ge=0)
    # Image score from the smoothed map: its maximum, the mean of its top `score_top_fraction` pixels, or
    # its mean. The defaults were chosen on the texture protocol's validation crops (local defects).
    image_score: Literal["max", "top_k_mean", "mean"] = "top_k_mean"
    score_top_fraction: float = Field(0.01, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _upgrade_older_configs(cls, values: object) -> object:
        # Configs of models registered before `augmentations` and `image_score` existed still load, so
        # the gate can re-score an old champion. Their flips mattered for training only and are dropped
        # (hflip + vflip with every turn would be rejected below).
        if not isinstance(values, dict) or not {"hflip", "vflip", "score_top_k"} & values.keys():
            return values
        values = {key: value for key, value in values.items() if key not in ("hflip", "vflip")}
        if "score_top_k" not in values:
            return values
        top_k = values.pop("score_top_k")
        if top_k is None:
            values["image_score"] = "max"
        else:
            values.update(image_score="top_k_mean", score_top_fraction=min(1.0, top_k / values.get("image_size", 64) ** 2))
        return values

    @model_validator(mode="after")
    def _smoothing_fits_the_map(self) -> OeSdnConfig:
        # The map is blurred with reflect padding of ⌈3σ⌉ pixels, which must stay inside the map.
        if math.ceil(3 * self.smoothing_sigma) >= self.image_size:
            raise ValueError(f"smoothing_sigma {self.smoothing_sigma} is too wide for image_size {self.image_size}: "
                             f"3σ must stay below the map's side")
        return self

    @model_validator(mode="after")
    def _augmentations_keep_outliers_out(self) -> OeSdnConfig:
        if self.oe_lambda == 0:
            return self
        group = _generated_group([_FLIPS[name] for name in set(self.augmentations)])
        clashing = sorted(k for k in self.oe_quarter_turns if _TURNS[k] in group)
        if clashing:
            raise ValueError(
                f"augmentations {list(self.augmentations)} compose to a turn by "
                f"{', '.join(f'{90 * k}°' for k in clashing)}, which outlier exposure (oe_quarter_turns "
                f"{list(self.oe_quarter_turns)}) treats as an outlier to reproduce as it is; the SDN would be taught "
                f"both targets for the same images. Drop a flip or those turns (hflip + vflip = a 180° turn).")
        return self


def _registered(names: list[str], what: str) -> None:
    """Names that are not detectors of the registry (models/detectors.py) are refused, listing those that are."""
    # Imported here: the registry's detectors import this module for their settings.
    from patchline.models.detectors import DETECTORS

    unknown = [name for name in names if name not in DETECTORS]
    if unknown:
        raise ValueError(f"{what} {', '.join(map(repr, unknown))} is not a registered detector; use one of "
                         f"{', '.join(DETECTORS)}")


class EvaluationConfig(_Strict):
    # Good training images held out of every fit, to calibrate thresholds and fusion on good images only.
    calibration_fraction: float = Field(0.1, gt=0, lt=0.5)
    # A threshold from good images only: this percentile of held-out good scores.
    threshold_percentile: float = Field(99.0, gt=0, lt=100)
    # Registered detectors (models/detectors.py); "darkness" is the mean electroluminescence darkness of an
    # image (models/darkness.py).
    detectors: Annotated[tuple[str, ...], Field(min_length=1)] = ("patchcore", "oesdn", "ae")
    # Weight of each detector's normalised score in `fused`; None = every detector alike. A detector
    # missing here weighs 0 (it is still built, scored and reported on its own); weights of detectors
    # that a run leaves out (e.g. `patchline rebuild --detectors`) are ignored.
    fusion_weights: dict[str, Annotated[float, Field(ge=0)]] | None = None
    # The detector whose decisions the deployed model returns. "auto": the line's first version takes the
    # best image AUROC of its rebuild (chosen on the test split, so that figure is optimistic), and every
    # later one keeps its champion's; a person changes it here or by promoting a version that decides otherwise.
    decision_detector: str = "auto"
    # The self-check (models/scoring/self_check.py): a detector fitted on images whose image AUROC on the
    # held-out goods and painted copies of them is below this is left out of `fused` and of "auto"'s choice.
    # 0.6 sits about one standard error of a chance AUROC above 0.5 on 20 goods and 20 copies; 0 turns it off.
    self_check_min_auroc: float = Field(0.6, ge=0, le=1)
    # ... and one whose self-check AUROC is more than this below that of the detector it is built on (OE-SDN's
    # AE) is left out too; 1 turns that off. Chosen on the texture protocol's validation split
    # (benchmarks/README.md, "The self-check").
    self_check_max_gap: float = Field(0.02, ge=0, le=1)

    @field_validator("detectors")
    @classmethod
    def _known_detectors(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        _registered(list(names), "detector")
        if len(set(names)) < len(names):
            raise ValueError(f"detectors {list(names)} name one detector twice")
        return names

    @field_validator("fusion_weights")
    @classmethod
    def _known_weights(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        _registered(list(weights or {}), "fusion weight of")
        return weights

    @field_validator("decision_detector")
    @classmethod
    def _known_decision_detector(cls, name: str) -> str:
        if name not in ("auto", "fused"):
            _registered([name], "decision_detector")
        return name

    @model_validator(mode="after")
    def _some_weight(self) -> EvaluationConfig:
        if self.fusion_weights is not None and not any(self.fusion_weights.values()):
            raise ValueError("fusion_weights must give at least one detector a weight above 0")
        return self


# Every metric the gate can decide on, and which way is better (models/scoring/metrics.py computes them;
# the pixel metrics only for lines with ground-truth masks).
GATE_METRICS: dict[str, Literal["higher", "lower"]] = {
    "image_auroc": "higher", "image_f1_max": "higher", "pixel_auroc": "higher", "aupro_30": "higher",
    "fpr_at_threshold": "lower", "miss_rate_at_threshold": "lower",
}
# The gate metrics measured on anomaly maps against ground-truth masks.
MASK_METRICS = ("pixel_auroc", "aupro_30")


class PromotionConfig(_Strict):
    metric: str = "image_auroc"
    # The challenger may be worse than the champion by at most this much and still be promoted, and worse
    # by at most this much than the best champion the line ever had on the same test set (the floor), so
    # a run of slightly worse versions cannot walk the line down.
    tolerance: float = Field(0.005, ge=0)
    # Fewer test images (good + anomalous) than this are too little evidence to replace a champion: the
    # gate keeps it and says to promote by hand. The first version of a line is promoted regardless.
    min_test_images: int = Field(30, ge=0)
    # A detector of both versions whose metric worsens by more than this blocks promotion, even when the
    # deciding detector is fine: a detector collapsing is a sign of bad training images.
    max_detector_drop: float = Field(0.1, ge=0)
    # The operating point, each version at its own threshold on the same test set: the share of test
    # defects the challenger misses, and of test goods it flags, may exceed the champion's by at most these.
    max_miss_rate_increase: float = Field(0.02, ge=0)
    max_fpr_increase: float = Field(0.02, ge=0)
    # The deciding detector's threshold may rise above the champion's by at most this many good-score
    # spreads (1.4826 x MAD of the champion's held-out good scores): defects among the new "good"
    # images lift the threshold before they show in any metric.
    max_threshold_rise: float = Field(1.0, ge=0)
    # "manual": a challenger that passes every rule waits, paused in the Prefect UI, for a person to approve
    # or reject it; no answer within `approval_timeout_hours` keeps the champion. A line's first version
    # needs no approval.
    approval: Literal["auto", "manual"] = "auto"
    approval_timeout_hours: float = Field(24.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _drop_history_window(cls, values: object) -> object:
        # `history` (a window of recent champions) was replaced by the floor over every champion; configs
        # and registered models that still name it keep loading.
        if isinstance(values, dict) and "history" in values:
            return {key: value for key, value in values.items() if key != "history"}
        return values

    @field_validator("metric")
    @classmethod
    def _gate_metric(cls, metric: str) -> str:
        if metric not in GATE_METRICS:
            raise ValueError(f"promotion metric {metric!r} is not one a rebuild produces; use one of "
                             f"{', '.join(GATE_METRICS)}")
        return metric


class ScheduleConfig(_Strict):
    cron: str = "0 2 * * *"
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, cron: str) -> str:
        # Prefect's scheduler reads a sixth field as seconds ("0 0 2 * * *": every second of 00:00 on the
        # 2nd), where other cron dialects read it otherwise; only the five fields both read alike pass.
        fields = len(cron.split())
        if fields != 5:
            raise ValueError(f"cron {cron!r} has {fields} fields; a line's schedule takes exactly 5 (minute hour "
                             "day-of-month month day-of-week), as Prefect's scheduler reads them")
        try:
            CronSim(cron, datetime(2026, 1, 1))
        except CronSimError as error:
            raise ValueError(f"cron {cron!r} is not a valid 5-field cron expression: {error}") from None
        return cron

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, timezone: str) -> str:
        try:
            ZoneInfo(timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone {timezone!r} is not an IANA time zone name (e.g. UTC, Europe/Berlin)") from None
        return timezone


class LineConfig(_Strict):
    # The name becomes file names (locks, stores, work folders) and MLflow names: short enough for all of them.
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$", max_length=64)]
    description: str = ""
    source: ElpvSource | MvtecSource = Field(discriminator="kind")
    # "fail" stops ingest at the first bad file; "skip" records it in the manifest report and goes on.
    on_bad_input: Literal["fail", "skip"] = "fail"
    image_size: int = Field(256, ge=32)
    patchcore: PatchCoreConfig = PatchCoreConfig()
    oesdn: OeSdnConfig = OeSdnConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    promotion: PromotionConfig = PromotionConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    # Scheduler address of an existing Dask cluster; None = a LocalCluster sized to the machine.
    dask_address: str | None = None
    # Each rebuild also exports its model to ONNX (`patchline export`), checked for parity before the
    # model is logged, and logs it inside the MLflow model (artifact `export`), which then scores on the
    # fastest runtime that passed.
    export_onnx: bool = False
    # The settings of registered detectors that bring a section of their own (`DetectorSpec.settings`), by
    # detector name; the built-in detectors' settings are `patchcore` and `oesdn` above.
    detector_settings: dict[str, Any] = {}

    @field_validator("detector_settings", mode="before")
    @classmethod
    def _detector_sections(cls, sections: object) -> dict[str, BaseModel]:
        from patchline.models.detectors import DETECTORS

        if not isinstance(sections, dict):
            raise ValueError("detector_settings maps detector names to their settings")
        checked = {}
        for name, values in sections.items():
            spec = DETECTORS.get(name)
            if spec is None or spec.settings is None:
                raise ValueError(f"detector_settings names {name!r}, which is not a registered detector with a "
                                 "settings section of its own")
            checked[name] = values if isinstance(values, spec.settings) else spec.settings.model_validate(values)
        return checked

    def settings_of(self, detector: str) -> BaseModel:
        """A registered detector's own settings: its `detector_settings` section, or its defaults."""
        from patchline.models.detectors import DETECTORS

        return self.detector_settings.get(detector) or DETECTORS[detector].settings()

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, size: int) -> int:
        if size % 32:
            raise ValueError(f"image_size must be a multiple of 32 (backbone strides), got {size}")
        return size
