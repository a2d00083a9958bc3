"""The bundled ELPV solar-cell set (elpv-dataset package) under the published anomaly-detection protocol.

Protocol (DRA, CVPR 2022; AHL and InCTRL, CVPR 2024): normal = defect probability 0, anomaly =
probability 1; the 1/3 and 2/3 cells are kept aside as "ambiguous"; the normals are split 3:1 with
`train_test_split(..., test_size=0.25, random_state=42)`, within the cell type for mono/poly lines.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from patchline.models.config import ElpvSource
from patchline.storage.manifest import ManifestRow, SourceScan, content_hash

# Manifest rows point at a cell by its index in the set: "elpv:<index>".
SCHEME = "elpv"
SOURCE_PREFIX = f"{SCHEME}:"
_AMBIGUOUS_NAMES = {1: "ambiguous_p1_3", 2: "ambiguous_p2_3"}


@lru_cache(maxsize=1)
def elpv_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N, 300, 300), defect level 0..3, cell type) of the whole set, read once per process."""
    from elpv_dataset.utils import load_dataset

    images, probabilities, types = load_dataset()
    images.setflags(write=False)
    return images, np.round(probabilities * 3).astype(int), np.asarray(types)


def elpv_rows(source: ElpvSource) -> list[ManifestRow]:
    """Manifest rows for the ELPV cells of `source`: train normals, then test normals, anomalies, ambiguous."""
    # Imported here: scikit-learn takes seconds to import, and commands that read no ELPV cells need none.
    from sklearn.model_selection import train_test_split

    images, levels, types = elpv_arrays()
    in_line = np.ones(len(images), bool) if source.cell_type is None else types == source.cell_type
    normal = np.flatnonzero(in_line & (levels == 0))
    train, test = train_test_split(normal, test_size=source.test_size, random_state=source.seed)
    groups = [
        (train, "train", "good", lambda _: "good"),
        (test, "test", "good", lambda _: "good"),
        (np.flatnonzero(in_line & (levels == 3)), "test", "anomaly", lambda _: "defect"),
        (np.flatnonzero(in_line & np.isin(levels, (1, 2))), "test", "ambiguous", lambda i: _AMBIGUOUS_NAMES[levels[i]]),
    ]
    rows = []
    for indices, split, label, defect_type in groups:
        indices = indices[: source.limit_per_class]
        if split == "train":
            indices = indices[: max(1, round(len(indices) * source.train_share))]
        for index in indices:
            pixels = images[index]
            rows.append(ManifestRow(
                id=content_hash(pixels[:, :, None]), source=f"{SOURCE_PREFIX}{index}", split=split,
                label=label, defect_type=defect_type(index), mask=None,
                width=pixels.shape[1], height=pixels.shape[0], channels=1))
    return rows


def scan(source: ElpvSource) -> SourceScan:
    return SourceScan(elpv_rows(source), [])


def read_pixels(reference: str) -> np.ndarray:
    """uint8 (300, 300, 1) pixels of the cell an "elpv:<index>" reference names."""
    return elpv_arrays()[0][int(reference.removeprefix(SOURCE_PREFIX))][:, :, None]
