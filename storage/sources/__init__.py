"""Data source readers, one module per kind of source; a line config's `source.kind` picks the reader.

Adding a source means its module (a `scan(source_config) -> SourceScan`, and for sources that are not
image files a `SCHEME` with `read_pixels(reference)`), its entry here and its config section
(`models/config.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from patchline.storage.manifest import SourceScan
from patchline.storage.sources import elpv, mvtec

READERS: dict[str, Callable[..., SourceScan]] = {"mvtec": mvtec.scan, "elpv": elpv.scan}

# Manifest sources of the form "<scheme>:<reference>"; every other source is an image file's path.
PIXEL_READERS: dict[str, Callable[[str], np.ndarray]] = {elpv.SCHEME: elpv.read_pixels}
