"""What a new line's folder holds, and the settings of its first config that follow from it (`init-line`).

Only facts of the data decide here: how large the images are (a line is not scaled up past its images),
how fine their detail is (images scaled up from small originals train the networks at the originals' scale),
whether the training images are colour, how many bits their pixels were stored with, how many good
images there are to fit on, and whether defects come with masks. Every setting written comes with one
line saying why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from patchline.models.config import LineConfig
from patchline.models.images import images_to_tensor
from patchline.storage.image_files import bits_per_sample
from patchline.storage.manifest import Manifest, ManifestRow, hold_out_calibration
from patchline.storage.pixels import read_pixels
from patchline.storage.sources import PIXEL_READERS

T = TypeVar("T")

# PatchCore's backbones need an 8 × 8 grid of stride-8 features at least; sizes are multiples of their
# largest stride, 32.
SMALLEST_IMAGE_SIZE, SIZE_STEP = 64, 32
# The networks' four stride-2 stages need multiples of 16 (models/oesdn/autoencoder.py).
NETWORK_SIZE_STEP = 16
FEW_TRAINING_IMAGES = 20
# Each epoch takes at least this many optimizer steps, so early stopping compares epochs that each
# moved the weights; batches stay between 2 images and the default 16.
STEPS_PER_EPOCH = 8
# The networks' epoch cap is a budget of image passes at 64 px (images × epochs × (size / 64)²), about
# what the bundled `elpv` line's AE is capped at (40 epochs over its 924 fit cells at 64 px); a larger or
# higher-resolution line gets fewer epochs, never fewer than MIN_EPOCHS.
IMAGE_PASSES_AT_64 = 40_000
MIN_EPOCHS = 10
# The networks train at the least of these sizes at which the training images, taken at 64 px, scaled
# down and back up, lose at most DETAIL_LOSS of their contrast (squared deviation from their mean): images
# scaled up from small originals lose little, photographs and textures far more (benchmarks/README.md,
# "Training at the images' detail").
DETAIL_SIZES, DETAIL_REFERENCE, DETAIL_LOSS = (16, 32), 64, 0.03
# Contrast loss is measured on this many fit images, evenly spaced (the median decides).
DETAIL_SAMPLE = 32


@dataclass(frozen=True)
class LineSurvey:
    train_good: int
    fit_good: int  # the good training images a model fits on (the rest calibrate thresholds)
    short_sides: tuple[int, int, int]  # smallest, median, largest short side of the training images, px
    sizes: tuple[tuple[int, int], tuple[int, int]]  # the smallest and largest (width, height) of all images
    colour: bool  # the training images have three channels
    bits: int  # 8, or 16 when any training image was stored with more than 8 bits per pixel
    defective: int
    with_masks: int
    contrast_lost: tuple[tuple[int, float], ...]  # (size, median share of contrast lost at it), DETAIL_SIZES

    @classmethod
    def of(cls, manifest: Manifest, calibration_fraction: float) -> LineSurvey:
        train = manifest.select("train", "good")
        if not train:
            raise ValueError("no good training images to survey")
        fit, _ = hold_out_calibration(train, calibration_fraction)
        short = np.array([min(row.width, row.height) for row in train])
        areas = sorted((row.width * row.height, (row.width, row.height)) for row in manifest.rows)
        defective = [row for row in manifest.rows if row.label == "anomaly"]
        sample = [read_pixels(row.source) for row in detail_sample(fit)]
        return cls(len(train), len(fit), (int(short.min()), int(np.median(short)), int(short.max())),
                   (areas[0][1], areas[-1][1]), any(row.channels == 3 for row in train),
                   max(_bits(row) for row in train), len(defective), sum(1 for row in defective if row.mask),
                   contrast_lost(sample))


def detail_sample(items: Sequence[T]) -> list[T]:
    """Up to DETAIL_SAMPLE of `items`, evenly spaced: the images whose contrast loss is measured."""
    return list(items[::max(1, len(items) // DETAIL_SAMPLE)][:DETAIL_SAMPLE])


def contrast_lost(images: Sequence[np.ndarray]) -> tuple[tuple[int, float], ...]:
    """For each of DETAIL_SIZES, the median share of the images' contrast (at DETAIL_REFERENCE px, grey)
    that scaling them down to that size and back up loses: how much detail the networks would miss there."""
    if not images:
        return tuple((size, 1.0) for size in DETAIL_SIZES)
    batch = images_to_tensor(images, DETAIL_REFERENCE, channels=1)
    contrast = (batch - batch.mean(dim=(2, 3), keepdim=True)).square().sum(dim=(1, 2, 3))
    lost = []
    for size in DETAIL_SIZES:
        small = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        back = F.interpolate(small, size=(DETAIL_REFERENCE, DETAIL_REFERENCE), mode="bilinear", align_corners=False)
        # A flat image has no detail to lose.
        share = (batch - back).square().sum(dim=(1, 2, 3)) / contrast.clamp_min(torch.finfo(batch.dtype).tiny)
        lost.append((size, round(float(share.median()), 4)))
    return tuple(lost)


def _bits(row: ManifestRow) -> int:
    scheme, separator, _ = row.source.partition(":")
    # Bundled sets (ELPV) are 8-bit arrays; everything else is an image file whose header says.
    return 8 if separator and scheme in PIXEL_READERS else bits_per_sample(Path(row.source))


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
    oesdn = config.oesdn
    network_size = max(NETWORK_SIZE_STEP, min(oesdn.image_size, median // NETWORK_SIZE_STEP * NETWORK_SIZE_STEP))
    coarse = next(((size, lost) for size, lost in survey.contrast_lost if size < network_size and lost <= DETAIL_LOSS),
                  None)
    if coarse is not None:
        network_size = coarse[0]
        reasons.append(f"oesdn.image_size: {network_size} (scaled to {network_size} px and back, the training images "
                       f"lose {coarse[1]:.1%} of their contrast: their detail is that coarse)")
    else:
        reasons.append(f"oesdn.image_size: {network_size} (" + (
            "the default" if network_size == oesdn.image_size
            else f"the training images' median short side is {median} px") + ")")
    # The map's smoothing covers the same share of the image at any network size.
    sigma = oesdn.smoothing_sigma * network_size / oesdn.image_size
    if sigma != oesdn.smoothing_sigma:
        reasons.append(f"oesdn.smoothing_sigma: {sigma:g} ({oesdn.smoothing_sigma:g} px at {oesdn.image_size} px, "
                       "the same share of the image)")
    channels = 3 if survey.colour else 1
    reasons.append(f"oesdn.channels: {channels} (the training images are {'colour' if survey.colour else 'grey'})")
    if survey.bits > 8:
        reasons.append("16-bit training images: each image is scaled to 8 bits between its own darkest and "
                       "brightest pixel, so brightness is compared within an image, not between images")
    trained = max(2, survey.fit_good - round(survey.fit_good * oesdn.val_fraction))
    batch = max(2, min(oesdn.batch_size, trained // STEPS_PER_EPOCH))
    reasons.append(f"oesdn.batch_size: {batch} ({trained} images train the networks"
                   + (f": at least {STEPS_PER_EPOCH} steps per epoch)" if batch < oesdn.batch_size else ")"))
    passes = trained * (network_size / 64) ** 2
    epochs = max(MIN_EPOCHS, min(oesdn.epochs, math.floor(IMAGE_PASSES_AT_64 / passes)))
    reasons.append(f"oesdn.epochs, oesdn.sdn_epochs: {epochs} (" + (
        "the default cap; training stops earlier when the held-out loss stops falling" if epochs == oesdn.epochs
        else f"a budget of {IMAGE_PASSES_AT_64:,} image passes at 64 px over {trained} images at {network_size} px")
        + ")")
    oesdn = oesdn.model_copy(update={"image_size": network_size, "channels": channels, "batch_size": batch,
                                     "epochs": epochs, "sdn_epochs": epochs, "smoothing_sigma": sigma})
    reasons.append(f"{survey.train_good} good training images, {survey.train_good - survey.fit_good} of them held "
                   "out for calibration" + (f"; fewer than {FEW_TRAINING_IMAGES} make thresholds coarse and "
                                            "the networks weak" if survey.train_good < FEW_TRAINING_IMAGES else ""))
    reasons.append(f"masks for {survey.with_masks} of {survey.defective} defective test images"
                   + (": pixel AUROC is reported" if survey.with_masks else ": image metrics only"))
    updated = config.model_copy(update={"image_size": size, "oesdn": oesdn})
    return LineConfig.model_validate(updated.model_dump()), reasons
