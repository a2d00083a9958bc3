"""Reading the pixels behind a manifest row, whatever source it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from storage.elpv import SOURCE_PREFIX, elpv_arrays
from storage.image_files import decode_image, decode_mask
from storage.manifest import ManifestRow


def read_pixels(source: str) -> np.ndarray:
    """uint8 (H, W, C) pixels of a manifest source: a file path or "elpv:<index>"."""
    if source.startswith(SOURCE_PREFIX):
        return elpv_arrays()[0][int(source.removeprefix(SOURCE_PREFIX))][:, :, None]
    return decode_image(Path(source))


def read_mask(row: ManifestRow) -> np.ndarray:
    """Boolean (H, W) ground truth of a row; all False for rows without a mask."""
    if row.mask is None:
        return np.zeros((row.height, row.width), dtype=bool)
    return decode_mask(Path(row.mask))
