"""The one check of an image array before any detector sees it; NumPy only, so the runtime scorer of
exported lines (patchline.runtime) shares it without PyTorch."""

from __future__ import annotations

import numpy as np


def colour_channels(image: np.ndarray, index: int) -> np.ndarray:
    """A uint8 image (H, W) or (H, W, 1|3|4) → (H, W, 1|3), alpha dropped; ValueError naming image `index`."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image {index}: expected uint8 pixels, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image {index}: expected (H, W) or (H, W, 1|3|4), got {array.shape}")
    return array[:, :, :3]
