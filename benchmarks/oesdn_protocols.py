"""The data of the OE-SDN protocol benchmarks: one-class digits, real textures and real objects with
painted defects.

All install offline: scikit-learn's 8×8 digits (1,797 images) and scikit-image's texture and object
photographs. Every split is fixed by a seed and keeps validation and test apart, so settings are
chosen on validation images and the test split is reported once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from patchline.models.scoring.self_check import paint_defect as paint_painted_defect

TEXTURES = ("brick", "grass", "gravel")
# Colour photographs of one object each; a line of one is many shots of that object, each framed a
# little differently, a little brighter or darker, with sensor noise.
OBJECTS = ("coffee", "chelsea", "rocket")
CROP = 64
OBJECT_CROP = 128
# Each shot's frame moves by up to this many pixels, its exposure by up to ±5 %, its noise σ is 2 grey levels.
_OBJECT_SHIFT, _EXPOSURE, _NOISE = 12, 0.05, 2.0
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


def digits_protocols(seed: int = 0, image_size: int | None = None) -> list[Protocol]:
    """Each digit class in turn as the only normal class; the other nine are anomalies.

    All 1,797 digits are split 60/20/20 (stratified, `seed`) once; a class trains on its own training
    images and is validated and tested on every image of the validation and test splits. `image_size`
    scales the 8 × 8 digits up (bilinear, rounded to uint8), as a user's folder of them would hold.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    if image_size is not None:
        images = resized(images, image_size)
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
    val = _defect_split(lambda: _crop(image, _VAL_ROWS, rng), donors, rng, eval_crops)
    return Protocol(name, train, val, _defect_split(lambda: _crop(image, _TEST_ROWS, rng), donors, rng, eval_crops))


def resized(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) uint8 images → (N, size, size) uint8, bilinear with antialiasing."""
    import torch

    batch = torch.from_numpy(images[:, None].astype(np.float32))
    scaled = torch.nn.functional.interpolate(batch, size=(size, size), mode="bilinear", antialias=True,
                                             align_corners=False)
    return np.clip(np.round(scaled[:, 0].numpy()), 0, 255).astype(np.uint8)


def object_image(name: str) -> np.ndarray:
    """scikit-image's bundled colour photograph `name` (uint8, H × W × 3)."""
    from skimage import data

    if name not in OBJECTS:
        raise ValueError(f"unknown object {name!r}; expected one of {', '.join(OBJECTS)}")
    return np.asarray(getattr(data, name)(), dtype=np.uint8)


def object_protocol(name: str, seed: int = 0, train_shots: int = 160, eval_shots: int = 40) -> Protocol:
    """Shots of object `name` to train on (128 px, colour); validation and test shots, half of them with
    one painted defect each (exact masks). Every shot is framed, exposed and noised on its own draw."""
    photo = object_image(name)
    donors = [object_image(other) for other in OBJECTS if other != name]
    rng = np.random.default_rng(seed)
    train = [_shot(photo, rng) for _ in range(train_shots)]
    val = _defect_split(lambda: _shot(photo, rng), donors, rng, eval_shots)
    return Protocol(name, train, val, _defect_split(lambda: _shot(photo, rng), donors, rng, eval_shots))


def _shot(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # The photo scaled so its short side leaves room for the frame to move, then one framing of it.
    side = OBJECT_CROP + _OBJECT_SHIFT
    height, width = photo.shape[:2]
    scale = side / min(height, width)
    import torch

    small = torch.nn.functional.interpolate(
        torch.from_numpy(photo).permute(2, 0, 1)[None].float(), size=(round(height * scale), round(width * scale)),
        mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    top = (small.shape[0] - side) // 2 + int(rng.integers(0, _OBJECT_SHIFT + 1))
    left = (small.shape[1] - side) // 2 + int(rng.integers(0, _OBJECT_SHIFT + 1))
    shot = small[top:top + OBJECT_CROP, left:left + OBJECT_CROP] * rng.uniform(1 - _EXPOSURE, 1 + _EXPOSURE)
    shot = shot + rng.normal(0.0, _NOISE, shot.shape)
    return np.clip(np.round(shot), 0, 255).astype(np.uint8)


def paint_defect(image: np.ndarray, kind: str, rng: np.random.Generator,
                 donor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A copy of a square uint8 `image` (grey, or colour H × W × 3) with one defect of `kind` painted in,
    and its exact bool mask.

    scratch and blob: painted as the line's self-check paints them (models/scoring/self_check.py).
    transplant: a square patch cut from `donor` (another photograph, of the image's channels), pasted as it is.
    """
    size = image.shape[0]
    if image.ndim not in (2, 3) or image.shape[1] != size or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"paint_defect needs a square grey or colour image, got shape {image.shape}")
    if kind != "transplant":
        if kind not in DEFECT_KINDS:
            raise ValueError(f"unknown defect kind {kind!r}; expected one of {', '.join(DEFECT_KINDS)}")
        return paint_painted_defect(image, kind, rng)
    if donor is None:
        raise ValueError("a transplant defect needs a donor image")
    centre = rng.uniform(0.25 * size, 0.75 * size, 2)
    side = int(rng.integers(size // 6, size // 3))
    top, left = (int(c - side / 2) for c in centre)
    patch = donor[rng.integers(0, donor.shape[0] - side):, rng.integers(0, donor.shape[1] - side):][:side, :side]
    defective = image.copy()
    defective[top:top + side, left:left + side] = patch
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[top:top + side, left:left + side] = True
    return defective, mask


def _crop(image: np.ndarray, rows: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    top = int(rng.integers(rows[0], rows[1] - CROP + 1))
    left = int(rng.integers(0, image.shape[1] - CROP + 1))
    return image[top:top + CROP, left:left + CROP].copy()


def _defect_split(draw: Callable[[], np.ndarray], donors: list[np.ndarray], rng: np.random.Generator,
                  count: int) -> Split:
    images, masks, labels = [], [], []
    for index in range(count):
        crop = draw()
        if index % 2:
            kind = DEFECT_KINDS[(index // 2) % len(DEFECT_KINDS)]
            crop, mask = paint_defect(crop, kind, rng, donors[int(rng.integers(len(donors)))])
        else:
            mask = np.zeros(crop.shape[:2], dtype=bool)
        images.append(crop)
        masks.append(mask)
        labels.append(int(mask.any()))
    return Split(images, np.array(labels), np.stack(masks))
