"""The self-check: can a detector see defects on this line at all? Answered from good images alone.

Each held-out good image (never fitted on) gets a copy with one painted defect, a scratch or a blob in a
tone far from the image's mean; a detector's image AUROC of the copies against the goods is its
self-check. A detector at chance on defects this plain cannot work on the line's kind of images, and one
that sees them clearly worse than the simpler detector it is built on (OE-SDN against the AE it distils)
does not earn its place; either is left out of the line's decisions: weight 0 in `fused`, and never the
deciding detector that "auto" picks. It is still fitted, scored and reported, so a person sees what it
would have done.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from patchline.models.scoring.metrics import image_auroc

PAINTED_KINDS = ("scratch", "blob")
# Fewer held-out goods than this give a self-check AUROC too noisy to leave a detector out on; more than
# MAX_IMAGES add scoring time and no decision.
MIN_IMAGES, MAX_IMAGES = 8, 200


def paint_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A copy of uint8 `image` ((H, W) or (H, W, C)) with one defect of `kind` painted in, and its bool mask.

    scratch: a straight line 2–3 px wide, 15–30 % of the shorter side long each way from its centre;
    blob: a filled ellipse, radii 6–14 % of each side; both in a tone far from the image's mean (dark on
    bright images, bright on dark ones), blended at 85 % into every channel alike."""
    if image.ndim not in (2, 3) or image.dtype != np.uint8:
        raise ValueError(f"paint_defect needs a uint8 (H, W) or (H, W, C) image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    rows, cols = np.mgrid[0:height, 0:width]
    centre = rng.uniform((0.25 * height, 0.25 * width), (0.75 * height, 0.75 * width))
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half_length = rng.uniform(0.15, 0.3) * min(height, width)
        along = (cols - centre[1]) * np.cos(angle) + (rows - centre[0]) * np.sin(angle)
        across = -(cols - centre[1]) * np.sin(angle) + (rows - centre[0]) * np.cos(angle)
        mask = (np.abs(along) <= half_length) & (np.abs(across) <= rng.uniform(1.0, 1.5))
    elif kind == "blob":
        radii = rng.uniform(0.06, 0.14, 2) * (height, width)
        mask = ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1.0
    else:
        raise ValueError(f"unknown painted defect kind {kind!r}; expected one of {', '.join(PAINTED_KINDS)}")
    tone = 25.0 if image.mean() > 127 else 230.0
    defective = image.astype(np.float32)
    defective[mask] = 0.15 * defective[mask] + 0.85 * tone
    return np.clip(np.round(defective), 0, 255).astype(np.uint8), mask


def painted_copies(goods: Sequence[np.ndarray], seed: int) -> list[np.ndarray]:
    """One painted copy of each good image, scratches and blobs in turn; the same goods and seed paint alike."""
    rng = np.random.default_rng(seed)
    return [paint_defect(np.asarray(image), PAINTED_KINDS[index % 2], rng)[0] for index, image in enumerate(goods)]


@dataclass(frozen=True)
class SelfCheck:
    """Per detector, the image AUROC of painted copies against the held-out goods, and why any is left out."""

    aurocs: dict[str, float]
    left_out: dict[str, str]  # detector → one line saying why
    images: int


def judge_self_check(good_scores: Mapping[str, np.ndarray], painted_scores: Mapping[str, np.ndarray],
                     min_auroc: float, detectors: Sequence[str], baselines: Mapping[str, Sequence[str]] | None = None,
                     max_gap: float = 1.0) -> SelfCheck:
    """The self-check of each detector in `painted_scores`. One is left out below `min_auroc`, or when it
    trails a detector it is built on (its `baselines`, also checked) by more than `max_gap`; unless that
    would leave none of the line's `detectors`: a line keeps the detectors it has rather than none."""
    images = min((len(scores) for scores in good_scores.values()), default=0)
    if images < MIN_IMAGES:
        return SelfCheck({}, {}, images)
    aurocs = {name: image_auroc(np.concatenate([good_scores[name], painted_scores[name]]),
                                np.r_[np.zeros(len(good_scores[name]), bool), np.ones(len(painted_scores[name]), bool)])
              for name in painted_scores}
    on = f"on {images} held-out goods and painted copies of them (a scratch or a blob each)"
    left_out = {}
    for name, auroc in aurocs.items():
        beaten = [base for base in (baselines or {}).get(name, ()) if base in aurocs and aurocs[base] - auroc > max_gap]
        if auroc < min_auroc:
            left_out[name] = (f"left out: self-check image AUROC {auroc:.3f} < {min_auroc:g} {on}; it cannot see "
                              "defects on these images")
        elif beaten:
            left_out[name] = (f"left out: self-check image AUROC {auroc:.3f}, more than {max_gap:g} below that of "
                              f"{beaten[0]} ({aurocs[beaten[0]]:.3f}), the detector it is built on, {on}")
    if not set(detectors) - set(left_out):
        return SelfCheck(aurocs, {}, images)
    return SelfCheck(aurocs, left_out, images)
