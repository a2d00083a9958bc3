"""What a new line's folder holds, and the settings of its first config that follow from it (`init-line`).

Only facts of the data decide here: how large the images are (a line is not scaled up past its images),
whether the training images are colour, how many good images there are to fit on, and whether defects
come with masks. Settings that need measuring (budgets, depths, which detectors) keep their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from patchline.models.config import LineConfig
from patchline.storage.manifest import Manifest

# PatchCore's backbones need an 8 × 8 grid of stride-8 features at least; sizes are multiples of their
# largest stride, 32.
SMALLEST_IMAGE_SIZE, SIZE_STEP = 64, 32
FEW_TRAINING_IMAGES = 20


@dataclass(frozen=True)
class LineSurvey:
    train_good: int
    short_sides: tuple[int, int, int]  # smallest, median, largest short side of the training images, px
    sizes: tuple[tuple[int, int], tuple[int, int]]  # the smallest and largest (width, height) of all images
    colour: bool  # the training images have three channels
    defective: int
    with_masks: int

    @classmethod
    def of(cls, manifest: Manifest) -> LineSurvey:
        train = manifest.select("train", "good")
        if not train:
            raise ValueError("no good training images to survey")
        short = np.array([min(row.width, row.height) for row in train])
        areas = sorted((row.width * row.height, (row.width, row.height)) for row in manifest.rows)
        defective = [row for row in manifest.rows if row.label == "anomaly"]
        return cls(len(train), (int(short.min()), int(np.median(short)), int(short.max())),
                   (areas[0][1], areas[-1][1]), any(row.channels == 3 for row in train), len(defective),
                   sum(1 for row in defective if row.mask))


def fitted_config(config: LineConfig, survey: LineSurvey) -> tuple[LineConfig, list[str]]:
    """`config` with the settings that follow from `survey`, and one line per setting saying why."""
    reasons = []
    median = survey.short_sides[1]
    size = max(SMALLEST_IMAGE_SIZE, min(config.image_size, median // SIZE_STEP * SIZE_STEP))
    (small_w, small_h), (large_w, large_h) = survey.sizes
    varying = "" if survey.sizes[0] == survey.sizes[1] else (
        f"; sizes vary from {small_w}×{small_h} to {large_w}×{large_h}, each image is resized")
    if size > median:
        reasons.append(f"image_size: {size} (the least PatchCore's backbones take; the training images' median "
                       f"short side is {median} px{varying})")
    elif size < config.image_size:
        reasons.append(f"image_size: {size} (the training images' median short side is {median} px; a line is "
                       f"not scaled up past its images{varying})")
    else:
        reasons.append(f"image_size: {size} (the default; the training images' median short side is {median} px"
                       f"{varying})")
    channels = 3 if survey.colour else 1
    reasons.append(f"oesdn.channels: {channels} (the training images are {'colour' if survey.colour else 'grey'})")
    oesdn = config.oesdn.model_copy(update={"channels": channels})
    # At least two are held out (storage/manifest.py, `hold_out_calibration`).
    held = max(2, round(survey.train_good * config.evaluation.calibration_fraction))
    reasons.append(f"{survey.train_good} good training images, about {held} of them held "
                   "out for calibration" + (f"; fewer than {FEW_TRAINING_IMAGES} make thresholds coarse and "
                                            "the networks weak" if survey.train_good < FEW_TRAINING_IMAGES else ""))
    reasons.append(f"masks for {survey.with_masks} of {survey.defective} defective test images"
                   + (": pixel AUROC is reported" if survey.with_masks else ": image metrics only"))
    updated = config.model_copy(update={"image_size": size, "oesdn": oesdn})
    return LineConfig.model_validate(updated.model_dump()), reasons
