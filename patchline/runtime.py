"""Scoring with an exported line (`patchline export`) where PyTorch, Prefect, MLflow and Zarr are not
installed: NumPy and ONNX Runtime only.

    from patchline.runtime import ExportedLine
    line = ExportedLine("export/elpv-mono")          # model.onnx + line.json
    result = line.score([pixels, ...])                 # uint8 (H, W) / (H, W, C) arrays

`result` holds what the line's MLflow model returns: `score`, `decision`, `threshold`, `anomaly_map`
of the deciding detector, `score_<detector>` for each, and the 0..1 scores `score_unit`,
`score_unit_<detector>` (0.5 at the threshold).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from patchline.models.image_arrays import colour_channels
from patchline.models.scoring.unit_scale import detector_unit_scores

FORMAT = "patchline-export/1"
MODEL, METADATA = "model.onnx", "line.json"


class ExportedLine:
    """A line exported by `patchline export`, scored with ONNX Runtime on the CPU."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime

        folder = Path(folder)
        if not (folder / METADATA).is_file() or not (folder / MODEL).is_file():
            raise ValueError(f"{folder}: not an exported patchline line (needs {MODEL} and {METADATA})")
        self.metadata = json.loads((folder / METADATA).read_text())
        if self.metadata.get("format") != FORMAT:
            raise ValueError(f"{folder / METADATA}: format {self.metadata.get('format')!r}, expected {FORMAT!r}")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0
        self.session = onnxruntime.InferenceSession(str(folder / MODEL), options, providers=["CPUExecutionProvider"])
        self.outputs = [output.name for output in self.session.get_outputs()]

    @property
    def detectors(self) -> list[str]:
        return [name.removeprefix("score_") for name in self.outputs if name.startswith("score_")]

    def detections(self, images: Sequence[np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per detector: image scores (N,) and maps (N, S, S)."""
        per_image = [dict(zip(self.outputs, self.session.run(None, {"pixels": as_pixels(image, index)})))
                     for index, image in enumerate(images)]
        return {name: (np.concatenate([run[f"score_{name}"] for run in per_image]).astype(np.float32),
                       np.concatenate([run[f"map_{name}"] for run in per_image]).astype(np.float32))
                for name in self.detectors}

    def score(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        detections = self.detections(images)
        meta = self.metadata
        decider = meta["decision_detector"]
        scores, maps = detections[decider]
        threshold = meta["thresholds"][decider]
        result = {"score": scores, "decision": scores >= threshold,
                  "threshold": np.full(len(scores), threshold, np.float32), "anomaly_map": maps,
                  "score_unit": self._unit(decider, scores)}
        result.update({f"score_{name}": found[0] for name, found in detections.items()})
        result.update({f"score_unit_{name}": self._unit(name, found[0]) for name, found in detections.items()})
        return result

    def _unit(self, name: str, scores: np.ndarray) -> np.ndarray:
        return detector_unit_scores(name, scores, self.metadata["thresholds"], self.metadata.get("unit_slopes"))


def as_pixels(image: np.ndarray, index: int = 0) -> np.ndarray:
    """A uint8 image (H, W) or (H, W, 1|3|4) → the graph's input (1, 3, H, W): grey replicated, alpha dropped."""
    array = colour_channels(image, index)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])
