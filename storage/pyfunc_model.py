"""The MLflow pyfunc that a registered patchline model version is: images in, scores and maps out."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModel

from storage.pixels import read_pixels

BUNDLE_ARTIFACT = "bundle"
# Exact pins keep MLflow from inferring requirements (slow, and it reaches for the network).
PIP_REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "numpy", "safetensors", "pydantic", "pyyaml",
                    "pillow", "scipy", "efficientnet-lite-pytorch", "mlflow==3.17.2", "patchline"]
ENTRY_POINT = Path(__file__).with_name("pyfunc_entry.py")


class PatchlineModel(PythonModel):
    """Scores a batch of images: a uint8 array (N, H, W[, C]), a list of uint8 images or of image file paths.

    Returns a dict of arrays: `score` and `decision` of the line's deciding detector, `threshold`,
    `anomaly_map` (N, S, S), and `score_<detector>` for every detector of the line.
    """

    def load_context(self, context) -> None:
        from storage.model_bundle import load_bundle

        self.detector = load_bundle(Path(context.artifacts[BUNDLE_ARTIFACT]))

    def predict(self, context, model_input, params=None) -> dict[str, np.ndarray]:
        images = _as_images(model_input)
        detections = self.detector.score(images)
        chosen, decisions, threshold = self.detector.decide(detections)
        output = {"score": chosen.scores, "decision": decisions,
                  "threshold": np.full(len(images), threshold, np.float32), "anomaly_map": chosen.maps}
        output.update({f"score_{name}": d.scores for name, d in detections.items()})
        return output


def _as_images(model_input) -> list[np.ndarray]:
    if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8 and model_input.ndim in (3, 4):
        return list(model_input)
    if hasattr(model_input, "columns") and "path" in model_input.columns:  # a pandas DataFrame of paths
        model_input = list(model_input["path"])
    if isinstance(model_input, (list, tuple)) and all(isinstance(p, (str, Path)) for p in model_input):
        return [read_pixels(str(p)) for p in model_input]
    if isinstance(model_input, (list, tuple)) and all(isinstance(a, np.ndarray) and a.dtype == np.uint8 for a in model_input):
        return list(model_input)
    raise ValueError("model input must be a uint8 array (N, H, W) / (N, H, W, C), a list of uint8 images or image paths, "
                     f"or a DataFrame with a 'path' column; got {type(model_input).__name__}")


def log_line_model(bundle: Path) -> ModelInfo:
    """Log the bundle as this run's pyfunc model `model` (from code: no pickled Python objects)."""
    return mlflow.pyfunc.log_model(name="model", python_model=str(ENTRY_POINT),
                                   artifacts={BUNDLE_ARTIFACT: str(bundle)}, pip_requirements=PIP_REQUIREMENTS)
