"""Reading the pixels behind a manifest row, whatever source it came from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from patchline.storage.image_files import decode_image, decode_mask
from patchline.storage.manifest import ManifestRow
from patchline.storage.sources import PIXEL_READERS


def read_pixels(source: str) -> np.ndarray:
    """uint8 (H, W, C) pixels of a manifest source: an image file's path or "<scheme>:<reference>"."""
    scheme, separator, _ = source.partition(":")
    if separator and scheme in PIXEL_READERS:
        return PIXEL_READERS[scheme](source)
    return decode_image(Path(source))


def read_mask(row: ManifestRow) -> np.ndarray:
    """Boolean (H, W) ground truth of a row; all False for rows without a mask."""
    if row.mask is None:
        return np.zeros((row.height, row.width), dtype=bool)
    return decode_mask(Path(row.mask))


class PixelRows(Sequence[np.ndarray]):
    """The uint8 pixels of manifest rows, read when asked for: a detector that fits nothing reads nothing."""

    def __init__(self, rows: Sequence[ManifestRow]) -> None:
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):  # noqa: ANN001 (an int or a slice, as any sequence)
        if isinstance(index, slice):
            return [read_pixels(row.source) for row in self.rows[index]]
        return read_pixels(self.rows[index].source)
