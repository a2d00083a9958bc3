"""A line's whole scoring path as one ONNX graph: uint8 pixels of one image in, every detector's image
score and anomaly map out, the fused detector's too, as `LineDetector.score` computes them.

Input `pixels`: uint8 (1, 3, H, W), any H and W (grey replicated to three channels, alpha dropped:
`patchline.runtime` does both). Outputs: `score_<detector>` (1,) and `map_<detector>` (1, S, S) for
each detector in `output_names`, S = the line's image size. Thresholds, the deciding detector and the
0..1 scales are not in the graph: the runtime reads them from the export's JSON.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from patchline.models.line_detector import LineDetector
from patchline.models.scoring.calibration import FUSED

# The ONNX opset written; ONNX Runtime and OpenVINO of the export extra's versions read it.
OPSET = 18
# A side of at most this many pixels, the decoder's own limit on image size aside.
MAX_SIDE = 16384


class LineGraph(nn.Module):
    """The detectors' graphs side by side on one input, and their fusion as `fuse` computes it."""

    def __init__(self, detector: LineDetector) -> None:
        super().__init__()
        self.names = list(detector.detectors)
        self.parts = nn.ModuleList(detector.detectors[name].graph() for name in self.names)
        calibration = detector.calibration
        self.fusion: list[tuple[int, float, float, float]] = []
        if calibration is not None and len(self.names) > 1:
            weights = calibration.fusion_weights or {name: 1.0 for name in self.names}
            total = sum(weights.get(name, 0.0) for name in self.names)
            self.fusion = [(index, weights.get(name, 0.0) / total, calibration.normalisers[name]["center"],
                            calibration.normalisers[name]["scale"])
                           for index, name in enumerate(self.names) if weights.get(name, 0.0) > 0]

    @property
    def output_names(self) -> list[str]:
        names = self.names + ([FUSED] if self.fusion else [])
        return [f"{kind}_{name}" for name in names for kind in ("score", "map")]

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = pixels.float() / 255.0
        results = [part(batch) for part in self.parts]
        if self.fusion:
            # `fuse`: the weighted mean of scores (and maps) normalised with the goods' statistics.
            results.append(tuple(sum(weight * (results[index][k] - center) / scale
                                     for index, weight, center, scale in self.fusion) for k in (0, 1)))
        return tuple(tensor for score_and_map in results for tensor in score_and_map)


def export_onnx(detector: LineDetector, path: Path) -> list[str]:
    """Write the line's graph (on the CPU, float32) to `path`; returns its output names."""
    graph = LineGraph(detector).eval()
    example = torch.zeros((1, 3, 64, 64), dtype=torch.uint8)
    side = {2: torch.export.Dim("height", min=2, max=MAX_SIDE), 3: torch.export.Dim("width", min=2, max=MAX_SIDE)}
    with torch.inference_mode():
        program = torch.onnx.export(graph, (example,), dynamo=True, dynamic_shapes=(side,), opset_version=OPSET,
                                    input_names=["pixels"], output_names=graph.output_names, verbose=False)
    program.save(str(path))
    return graph.output_names
