"""Scoring with an exported line (`patchline export`) where PyTorch, Prefect, MLflow and Zarr are not
installed: NumPy and ONNX Runtime or OpenVINO only.

    from patchline.runtime import ExportedLine
    line = ExportedLine("export/elpv-mono")          # the graph + line.json
    result = line.score([pixels, ...])                 # uint8 (H, W) / (H, W, C) arrays
    line.runtime                                       # "openvino" or "onnxruntime": the one scoring

`result` holds what the line's MLflow model returns: `score`, `decision`, `threshold`, `anomaly_map`
of the deciding detector, `score_<detector>` for each, and the 0..1 scores `score_unit`,
`score_unit_<detector>` (0.5 at the threshold).

The export's line.json lists each runtime that was checked against the version's PyTorch scoring, with
its parity and speed; `ExportedLine` takes the fastest one that passed and is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from patchline.models.image_arrays import colour_channels
from patchline.models.scoring.unit_scale import line_output

FORMAT = "patchline-export/3"
# Exports from before line.json carried digests still load, unchecked.
_UNCHECKED_FORMAT = "patchline-export/2"
METADATA = "line.json"
# The graph's files in each export format, and the runtimes that can run that format.
MODEL_FILES = {"onnx": ["model.onnx"], "openvino": ["model.xml", "model.bin"]}
# Each runtime is also the name of its Python module and of its distribution.
FORMAT_RUNTIMES = {"onnx": ["onnxruntime", "openvino"], "openvino": ["openvino"]}

Session = Callable[[np.ndarray], list[np.ndarray]]


class ExportedLine:
    """A line exported by `patchline export`, scored on the CPU by `runtime` (default: the fastest
    installed runtime that passed the export's parity check)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None, runtime: str | None = None) -> None:
        folder = Path(folder)
        if not (folder / METADATA).is_file():
            raise ValueError(f"{folder}: not an exported patchline line (no {METADATA})")
        try:
            self.metadata = json.loads((folder / METADATA).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{folder / METADATA}: not valid JSON ({error}); the export is damaged, export the "
                             "version again") from None
        if not isinstance(self.metadata, dict) or self.metadata.get("format") not in (FORMAT, _UNCHECKED_FORMAT):
            found = self.metadata.get("format") if isinstance(self.metadata, dict) else type(self.metadata).__name__
            raise ValueError(f"{folder / METADATA}: format {found!r}, expected {FORMAT!r}")
        model_format = self.metadata["model_format"]
        missing = [name for name in MODEL_FILES[model_format] if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"{folder}: the {model_format} export lacks {', '.join(missing)}")
        if self.metadata["format"] == FORMAT:
            _check_digests(folder, self.metadata)
        if runtime is not None and runtime not in FORMAT_RUNTIMES[model_format]:
            raise ValueError(f"{folder}: the {model_format} export runs on {' or '.join(FORMAT_RUNTIMES[model_format])}, "
                             f"not {runtime!r}")
        self.runtime = runtime or fastest_runtime(self.metadata)
        if self.runtime is None:
            raise ValueError(f"{folder}: none of the runtimes that passed its parity check is installed "
                             f"({', '.join(passed_runtimes(self.metadata)) or 'none passed'}); "
                             "install patchline's export extra")
        model = folder / MODEL_FILES[model_format][0]
        self._run = _onnxruntime_session(model, threads) if self.runtime == "onnxruntime" else _openvino_session(model, threads)

    def detections(self, images: Sequence[np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per detector (and `fused` where the line fuses): image scores (N,) and maps (N, S, S)."""
        outputs = self.metadata["outputs"]
        per_image = [dict(zip(outputs, self._run(as_pixels(image, index)))) for index, image in enumerate(images)]
        names = [name.removeprefix("score_") for name in outputs if name.startswith("score_")]
        return {name: (np.concatenate([run[f"score_{name}"] for run in per_image]).astype(np.float32),
                       np.concatenate([run[f"map_{name}"] for run in per_image]).astype(np.float32))
                for name in names}

    def score(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        detections = self.detections(images)
        decider = self.metadata["decision_detector"]
        return line_output({name: found[0] for name, found in detections.items()}, decider, detections[decider][1],
                           self.metadata["thresholds"], self.metadata.get("unit_slopes"))


def passed_runtimes(metadata: dict) -> list[str]:
    """The runtimes that passed the export's parity check, fastest first."""
    checked = metadata.get("runtimes", {})
    passed = [name for name, found in checked.items() if found.get("passed")]
    return sorted(passed, key=lambda name: -checked[name]["img_s"])


def installed(runtime: str) -> bool:
    return importlib.util.find_spec(runtime) is not None


def fastest_runtime(metadata: dict) -> str | None:
    """The fastest runtime that passed the export's parity check and is installed here, if any."""
    return next((name for name in passed_runtimes(metadata) if installed(name)), None)


def as_pixels(image: np.ndarray, index: int = 0) -> np.ndarray:
    """A uint8 image (H, W) or (H, W, 1|3|4) → the graph's input (1, 3, H, W): grey replicated, alpha dropped."""
    array = colour_channels(image, index)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def _onnxruntime_session(model: Path, threads: int | None) -> Session:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or 0
    session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(None, {"pixels": pixels})


def _openvino_session(model: Path, threads: int | None) -> Session:
    import openvino

    # float32 throughout: on CPUs with bfloat16 units OpenVINO's default precision is bfloat16, which
    # moves PatchCore's scores by percents (fails the parity check).
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = openvino.Core().compile_model(str(model), "CPU", config)
    request = compiled.create_infer_request()
    return lambda pixels: [np.array(value) for value in request.infer({0: pixels}).values()]


def metadata_digest(metadata: dict) -> str:
    """SHA-256 of line.json's content without its own `digest` entry (keys sorted), which line.json records."""
    body = {key: value for key, value in metadata.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_digests(folder: Path, metadata: dict) -> None:
    """An export whose line.json or model files changed after it was written is refused, naming the file:
    line.json binds the thresholds and the deciding detector to the graph they were checked with."""
    if metadata.get("digest") != metadata_digest(metadata):
        raise ValueError(f"{folder / METADATA}: changed since it was exported (its content does not match its "
                         "digest); export the version again")
    for name, digest in metadata["model_digests"].items():
        if file_digest(folder / name) != digest:
            raise ValueError(f"{folder / name}: damaged or changed since it was exported; export the version again")
