"""The data of the OE-SDN protocol benchmarks: one-class digits and real textures with painted defects.

Both install offline: scikit-learn's 8×8 digits (1,797 images) and scikit-image's 512×512 texture
photographs. Every split is fixed by a seed and keeps validation and test apart, so settings are
chosen on validation images and the test split is reported once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEXTURES = ("brick", "grass", "gravel")
CROP = 64
# Rows of each 512-row texture photograph: training crops come from the top, validation and test
# crops from two bands below it, so no test pixel was ever seen in training.
_TRAIN_ROWS, _VAL_ROWS, _TEST_ROWS = (0, 320), (320, 416), (416, 512)
DEFECT_KINDS = ("scratch", "blob", "transplant")


@dataclass(frozen=True)
class Split:
    """Images (uint8), labels (1 = anomaly) and, where the protocol has them, masks (bool, one per image)."""

    images: list[np.ndarray]
    labels: np.ndarray
    masks: np.ndarray | None = None


@dataclass(frozen=True)
class Protocol:
    name: str
    train: list[np.ndarray]
    val: Split
    test: Split


def digits_protocols(seed: int = 0) -> list[Protocol]:
    """Each digit class in turn as the only normal class; the other nine are anomalies.

    All 1,797 digits are split 60/20/20 (stratified, `seed`) once; a class trains on its own training
    images and is validated and tested on every image of the validation and test splits.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    classes = digits.target
    indices = np.arange(len(classes))
    train, rest = train_test_split(indices, test_size=0.4, random_state=seed, stratify=classes)
    val, test = train_test_split(rest, test_size=0.5, random_state=seed, stratify=classes[rest])
    protocols = []
    for normal in range(10):
        protocols.append(Protocol(
            name=f"digit-{normal}",
            train=[images[i] for i in train if classes[i] == normal],
            val=Split([images[i] for i in val], (classes[val] != normal).astype(int)),
            test=Split([images[i] for i in test], (classes[test] != normal).astype(int))))
    return protocols


def texture_image(name: str) -> np.ndarray:
    """scikit-image's bundled greyscale texture photograph `name` (uint8, 512 × 512)."""
    from skimage import data

    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; expected one of {', '.join(TEXTURES)}")
    return np.asarray(getattr(data, name)(), dtype=np.uint8)


def texture_protocol(name: str, seed: int = 0, train_crops: int = 240, eval_crops: int = 40) -> Protocol:
    """Good 64 × 64 crops of texture `name` to train on; validation and test crops from bands below
    the training rows, half of them with one painted defect each (exact masks)."""
    image = texture_image(name)
    donors = [texture_image(other) for other in TEXTURES if other != name]
    rng = np.random.default_rng(seed)
    train = [_crop(image, _TRAIN_ROWS, rng) for _ in range(train_crops)]
    return Protocol(name, train, _defect_split(image, _VAL_ROWS, donors, rng, eval_crops),
                    _defect_split(image, _TEST_ROWS, donors, rng, eval_crops))


def paint_defect(image: np.ndarray, kind: str, rng: np.random.Generator,
                 donor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A copy of a uint8 greyscale `image` with one defect of `kind` painted in, and its exact bool mask.

    scratch: a straight line 2–3 px wide; blob: a filled ellipse; both in a tone far from the image's
    mean (dark on bright images, bright on dark ones), blended at 85 %. transplant: a square patch cut
    from `donor` (another texture), pasted as it is.
    """
    size = image.shape[0]
    if image.ndim != 2 or image.shape[1] != size:
        raise ValueError(f"paint_defect needs a square greyscale image, got shape {image.shape}")
    rows, cols = np.mgrid[0:size, 0:size]
    centre = rng.uniform(0.25 * size, 0.75 * size, 2)
    if kind == "transplant":
        if donor is None:
            raise ValueError("a transplant defect needs a donor image")
        side = int(rng.integers(size // 6, size // 3))
        top, left = (int(c - side / 2) for c in centre)
        patch = donor[rng.integers(0, donor.shape[0] - side):, rng.integers(0, donor.shape[1] - side):][:side, :side]
        defective = image.copy()
        defective[top:top + side, left:left + side] = patch
        mask = np.zeros(image.shape, dtype=bool)
        mask[top:top + side, left:left + side] = True
        return defective, mask
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half_length = rng.uniform(0.15, 0.3) * size
        along = (cols - centre[1]) * np.cos(angle) + (rows - centre[0]) * np.sin(angle)
        across = -(cols - centre[1]) * np.sin(angle) + (rows - centre[0]) * np.cos(angle)
        mask = (np.abs(along) <= half_length) & (np.abs(across) <= rng.uniform(1.0, 1.5))
    elif kind == "blob":
        radii = rng.uniform(0.06, 0.14, 2) * size
        mask = ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1.0
    else:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {', '.join(DEFECT_KINDS)}")
    tone = 25.0 if image.mean() > 127 else 230.0
    defective = image.astype(np.float32)
    defective[mask] = 0.15 * defective[mask] + 0.85 * tone
    return np.clip(np.round(defective), 0, 255).astype(np.uint8), mask


def _crop(image: np.ndarray, rows: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    top = int(rng.integers(rows[0], rows[1] - CROP + 1))
    left = int(rng.integers(0, image.shape[1] - CROP + 1))
    return image[top:top + CROP, left:left + CROP].copy()


def _defect_split(image: np.ndarray, rows: tuple[int, int], donors: list[np.ndarray],
                  rng: np.random.Generator, count: int) -> Split:
    images, masks, labels = [], [], []
    for index in range(count):
        crop = _crop(image, rows, rng)
        if index % 2:
            kind = DEFECT_KINDS[(index // 2) % len(DEFECT_KINDS)]
            crop, mask = paint_defect(crop, kind, rng, donors[int(rng.integers(len(donors)))])
        else:
            mask = np.zeros(crop.shape, dtype=bool)
        images.append(crop)
        masks.append(mask)
        labels.append(int(mask.any()))
    return Split(images, np.array(labels), np.stack(masks))
