"""The MLflow pyfunc that a registered patchline model version is: images in, scores and maps out.

The model carries its code (`code_paths`: the `patchline` package as it was when the model was built)
and pins the third-party packages that scoring imports, so `mlflow models serve` can build its
environment from public packages and scores with the code that fitted the model.
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

from patchline.models.scoring.unit_scale import line_output
from patchline.runtime import METADATA, ExportedLine, fastest_runtime, installed, passed_runtimes
from patchline.storage.image_files import decode_image_bytes, encoded_image_pixels
from patchline.storage.pixels import read_pixels
from patchline.storage.serving import MAX_REQUEST_PIXELS_ENV, PATH_ROOT_ENV, SERVING_ENV, RequestTooLargeError

BUNDLE_ARTIFACT, EXPORT_ARTIFACT = "bundle", "export"
TORCH = "torch"
# Names a runtime for every model loaded in this process, over the fastest one: torch, onnxruntime or openvino.
RUNTIME_VARIABLE = "PATCHLINE_RUNTIME"
logger = logging.getLogger(__name__)
# Distributions that scoring imports, pinned to the versions installed here: exact pins also keep MLflow
# from inferring requirements (slow, and it reaches for the network).
SCORING_DISTRIBUTIONS = ["torch", "torchvision", "numpy", "safetensors", "pydantic", "pyyaml", "pillow", "scipy",
                         "scikit-learn", "tqdm", "efficientnet-lite-pytorch", "mlflow"]
ENTRY_POINT = Path(__file__).with_name("pyfunc_entry.py")
# The folders that make up the `patchline` package (one folder each in a checkout, ARCHITECTURE.md).
_PACKAGE_PARTS = ["models", "storage", "tasks", "flows", "deployments"]


class PatchlineModel(PythonModel):
    """Scores a batch of images; returns a dict of arrays: `score` and `decision` of the line's deciding
    detector, `threshold`, `anomaly_map` (N, S, S) when asked (`params={"maps": True}`; versions logged
    before the parameter always return it), `score_<detector>` for every detector that ran, and each of
    those scores on the 0..1 scale (0.5 at its threshold) as `score_unit`, `score_unit_<detector>` (NaN for
    versions calibrated before the 0..1 scale). On PyTorch the detectors that ran are those the decision
    reads (the deciding one, or those `fused` weighs), or all of the line's with
    `params={"all_detectors": True}`; an exported graph runs all of them.

    It scores with the fastest of PyTorch and the runtimes its export (a line's `export_onnx`) passed the
    parity check on, as measured when it was exported (`choose_runtime`); `runtime` says which.

    Inputs (in process, or as the JSON body MLflow's `/invocations` parses):
    - pixels: a uint8 array (N, H, W) / (N, H, W, C), or a list of uint8 images; integer arrays with
      values in 0..255 (what a JSON list of pixel rows becomes) are taken as uint8;
    - encoded image files: `{"image": [<bytes or base64 text of a PNG/JPEG/… file>, …]}` (a dict or a
      DataFrame column);
    - image files on the scoring machine: `{"path": [...]}`, or a list of paths.
    """

    def load_context(self, context) -> None:
        export = context.artifacts.get(EXPORT_ARTIFACT)
        self.runtime = choose_runtime(Path(export) if export else None)
        if self.runtime == TORCH:
            from patchline.storage.model_bundle import load_bundle

            self.exported, self.detector = None, load_bundle(Path(context.artifacts[BUNDLE_ARTIFACT]))
        else:
            self.exported = ExportedLine(export, runtime=self.runtime)
        logger.info("scoring with %s", self.runtime)

    # MLflow reads this hint: np.ndarray is one it neither validates nor converts against, so every input
    # form above reaches `as_images` as sent (with no hint it warns when the class is defined).
    def predict(self, context, model_input: np.ndarray, params=None) -> dict[str, np.ndarray]:
        images = as_images(model_input)
        if self.exported is not None:
            output = self.exported.score(images)
        else:
            # Detectors the decision does not read are not run unless asked: on a line decided by PatchCore
            # the networks would cost more than the indexed search.
            every = (params or {}).get(ALL_DETECTORS_PARAM)
            detections = self.detector.score(images, only=None if every else self.detector.decision_reads())
            calibration = self.detector.calibration
            decider = calibration.decision_detector
            output = line_output({name: d.scores for name, d in detections.items()}, decider,
                                 detections[decider].maps, calibration.thresholds, calibration.unit_slopes)
        if not (params or {}).get(MAPS_PARAM):
            # A map is S x S floats per image: over REST that is most of the answer, for a caller who
            # mostly wants the decision.
            del output["anomaly_map"]
        return output


# Outputs only: an input schema would make MLflow validate inputs against one form. Every line's model
# also returns `score_<detector>` and `score_unit_<detector>` per detector that ran (all of them with
# params {"all_detectors": true}), and `anomaly_map` when the call asks for maps (params {"maps": true}).
MAPS_PARAM = "maps"
ALL_DETECTORS_PARAM = "all_detectors"
SIGNATURE = ModelSignature(outputs=Schema([
    TensorSpec(np.dtype(np.float32), (-1,), "score"), TensorSpec(np.dtype(bool), (-1,), "decision"),
    TensorSpec(np.dtype(np.float32), (-1,), "threshold"), TensorSpec(np.dtype(np.float32), (-1, -1, -1), "anomaly_map"),
    TensorSpec(np.dtype(np.float32), (-1,), "score_unit")]),
    params=ParamSchema([ParamSpec(MAPS_PARAM, "boolean", False), ParamSpec(ALL_DETECTORS_PARAM, "boolean", False)]))


class _PixelBudget:
    """The pixels a served request may still decode; no limit in process (`PATCHLINE_SERVING` unset)."""

    def __init__(self) -> None:
        self.limit = int(os.environ[MAX_REQUEST_PIXELS_ENV]) if os.environ.get(SERVING_ENV) else None
        self.used = 0

    def take(self, pixels: int, name: str) -> None:
        self.used += pixels
        if self.limit is not None and self.used > self.limit:
            raise RequestTooLargeError(f"{name}: the request's images come to more than the server's limit of "
                                       f"{self.limit:,} decoded pixels ({MAX_REQUEST_PIXELS_ENV}); send fewer "
                                       "or smaller images per request")


def _served_path(path) -> str:
    """A `path` input: any path in process; on a server only paths under its allowed root, and the same
    answer for one outside it whether or not it exists."""
    if not os.environ.get(SERVING_ENV):
        return str(path)
    root = os.environ.get(PATH_ROOT_ENV)
    if not root:
        raise ValueError("path inputs are off on this server: send the images themselves ({'image': [...]}), or "
                         "start the server with --allow-path-root DIR to score image files under DIR")
    if not Path(os.path.abspath(path)).resolve().is_relative_to(root):
        raise ValueError(f"path {str(path)[:200]!r} is outside the folder this server may read")
    return str(path)


def as_images(model_input) -> list[np.ndarray]:
    """Every accepted model input (see `PatchlineModel`) → a list of uint8 images."""
    budget = _PixelBudget()
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        model_input = {column: list(model_input[column]) for column in model_input.columns}
    if isinstance(model_input, dict):
        if "image" in model_input:
            return [_decoded(item, index, budget) for index, item in enumerate(_items(model_input["image"]))]
        if "path" in model_input:
            return [read_pixels(_served_path(path)) for path in _items(model_input["path"])]
        raise ValueError(f"model input as a mapping needs an 'image' or a 'path' entry, got {sorted(model_input)}")
    if isinstance(model_input, np.ndarray) and model_input.dtype.kind in "USO":
        model_input = list(model_input)
    if isinstance(model_input, np.ndarray):
        if model_input.ndim not in (3, 4):
            raise ValueError(f"a pixel array must be (N, H, W) or (N, H, W, C), got shape {model_input.shape}")
        return list(_uint8(model_input, "the input"))
    if isinstance(model_input, (list, tuple)) and all(isinstance(p, (str, Path)) for p in model_input):
        return [read_pixels(_served_path(p)) for p in model_input]
    if isinstance(model_input, (list, tuple)):
        return [_uint8(np.asarray(image), f"image {index}") for index, image in enumerate(model_input)]
    raise ValueError("model input must be pixels (a uint8 array or a list of images), {'image': [encoded files]} "
                     f"or {{'path': [image paths]}}; got {type(model_input).__name__}")


def _items(values) -> list:
    return list(values) if isinstance(values, (list, tuple, np.ndarray)) else [values]


def _uint8(pixels: np.ndarray, what: str) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype.kind not in "iu":
        raise ValueError(f"{what}: pixels must be integers in 0..255 (uint8), got {pixels.dtype}")
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise ValueError(f"{what}: pixel values must lie in 0..255, got {pixels.min()}..{pixels.max()}")
    return pixels.astype(np.uint8)


def _decoded(item, index: int, budget: _PixelBudget) -> np.ndarray:
    name = f"image {index}"
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{name}: not base64 text of an image file") from None
    if not isinstance(item, (bytes, bytearray)):
        raise ValueError(f"{name}: expected the bytes (or base64 text) of an image file, got {type(item).__name__}")
    budget.take(encoded_image_pixels(bytes(item), name), name)
    return decode_image_bytes(bytes(item), name)


def choose_runtime(export: Path | None) -> str:
    """`PATCHLINE_RUNTIME` if set (it must be one the export passed on, or torch), else the fastest
    installed runtime that passed the export's parity check if it beat PyTorch there, else torch."""
    metadata = json.loads((export / METADATA).read_text()) if export is not None else {}
    wanted = os.environ.get(RUNTIME_VARIABLE)
    if wanted:
        if wanted != TORCH and wanted not in passed_runtimes(metadata):
            raise ValueError(f"{RUNTIME_VARIABLE}={wanted}: this model runs on {TORCH}"
                             + "".join(f", {name}" for name in passed_runtimes(metadata)))
        return wanted
    fastest = fastest_runtime(metadata)
    if fastest is None or metadata["runtimes"][fastest]["img_s"] <= metadata["torch_img_s"]:
        return TORCH
    return fastest


def scoring_requirements(export: Path | None = None) -> list[str]:
    """Pins of what scoring imports, with the installed runtimes that the `export` passed on."""
    names = list(SCORING_DISTRIBUTIONS)
    if export is not None:
        names += [name for name in passed_runtimes(json.loads((export / METADATA).read_text())) if installed(name)]
    return [f"{name}=={version(name)}" for name in names]


def _package_copy(folder: Path) -> Path:
    """The `patchline` package as one folder tree under `folder`, whether installed or a checkout."""
    target = folder / "patchline"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(importlib.util.find_spec("patchline").origin).parent, target, ignore=ignore)
    for part in _PACKAGE_PARTS:
        source = importlib.util.find_spec(f"patchline.{part}").submodule_search_locations[0]
        shutil.copytree(source, target / part, ignore=ignore, dirs_exist_ok=True)
    return target


def log_line_model(bundle: Path, export: Path | None = None) -> ModelInfo:
    """Log the bundle, and its checked `export` where there is one, as this run's pyfunc model `model`
    (from code: no pickled Python objects)."""
    with tempfile.TemporaryDirectory(prefix="patchline-code-") as scratch, warnings.catch_warnings():
        # An input example would be scored at every log to check it (minutes on a big line); the
        # accepted inputs are documented on `PatchlineModel` instead.
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        return mlflow.pyfunc.log_model(name="model", python_model=str(ENTRY_POINT),
                                       artifacts={BUNDLE_ARTIFACT: str(bundle),
                                                  **({EXPORT_ARTIFACT: str(export)} if export else {})},
                                       code_paths=[str(_package_copy(Path(scratch)))], signature=SIGNATURE,
                                       pip_requirements=scoring_requirements(export))
