"""PatchCore scoring (Roth et al., CVPR 2022): nearest memory-bank distances, eq. 7 image scores, heat maps.

The memory bank is saved as safetensors (no pickle) with the `PatchCoreConfig` and image size in its
metadata, so one file rebuilds both the feature extractor and the scorer.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from patchline.models.config import PatchCoreConfig
from patchline.models.images import pick_device
from patchline.models.patchcore.nearest import nearest_distances_sq, reweighted_scores, squared_norms
from patchline.models.patchcore.nearest_index import CellIndex, IndexedSearch, exact_maxima
from patchline.models.scoring.detection import Detections
from patchline.models.tensor_files import write_tensor_file

_FORMAT = "patchline-memory-bank/1"

# Exact k = 1 search as GEMM tiles, ‖q‖² + ‖b‖² − 2 q·b, each tile's row minimum taken while it is in
# cache. `benchmarks/throughput.py --compare-knn`, 65,536 real Lite0 patch features (64 ELPV images, D =
# 152), 2-core CPU shared with other jobs (load average 4.7-6.0), wall s / CPU s:
#   bank rows   faiss IndexFlatL2   torch tiles (this)   torch addmm 1024 x bank   torch.cdist 1024 x bank
#   4,515       3.82 / 2.49         2.01 / 1.32          6.21 / 4.06               11.49 / 7.51
#   11,581      9.61 / 6.27         5.67 / 3.70          14.48 / 9.44              19.46 / 12.69
# Other tile shapes tried (256-2,048 queries x 512-2,048 rows) were no faster: 14-18 images per CPU-second.
CPU_TILES = (1024, 1024)
# A GPU is fastest on the whole bank at once.
CUDA_TILES = (16384, 1 << 30)
# Queries per thread in the indexed search: each cell's GEMM then has hundreds of queries, not a few dozen
# (benchmarks/README.md, "Indexed scoring").
INDEXED_CPU_TILE = 8192


@dataclass(frozen=True)
class MemoryBank:
    """The coreset's patch features (M, D) float32, with the settings that produced them and the cells of
    its nearest-row index (built from the rows when not given)."""

    features: np.ndarray
    config: PatchCoreConfig
    image_size: int
    index: CellIndex | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.features.ndim != 2 or len(self.features) == 0 or self.features.dtype != np.float32:
            raise ValueError(f"memory bank features must be a non-empty float32 (M, D) array, "
                             f"got {self.features.dtype} {self.features.shape}")
        if not np.isfinite(self.features).all():
            raise ValueError("memory bank features contain NaN or infinity")
        if self.index is None:
            object.__setattr__(self, "index", CellIndex.build(self.features))
        self.index.check(*self.features.shape)

    def save(self, path: Path) -> Path:
        """Write the bank as a safetensors file; `MemoryBank.load` reads back an equal bank."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": np.ascontiguousarray(self.features), "cell_centroids": self.index.centroids,
                   "cell_order": self.index.order, "cell_offsets": self.index.offsets}
        return write_tensor_file(path, save(tensors, metadata={
            "format": _FORMAT, "config": self.config.model_dump_json(), "image_size": str(self.image_size)}))

    @classmethod
    def load(cls, path: Path) -> MemoryBank:
        """Read a bank written by `MemoryBank.save`."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"memory bank file {path} does not exist")
        try:
            with safe_open(str(path), framework="np") as file:
                metadata = file.metadata() or {}
                if metadata.get("format") != _FORMAT:
                    raise ValueError(f"{path} is not a patchline memory bank (format {metadata.get('format')!r})")
                features = file.get_tensor("features")
                # Banks saved before the index have none: it is built from their rows.
                index = (CellIndex(*(file.get_tensor(f"cell_{name}") for name in ("centroids", "order", "offsets")))
                         if "cell_order" in file.keys() else None)
            config = PatchCoreConfig.model_validate(json.loads(metadata["config"]))
        except (SafetensorError, KeyError, json.JSONDecodeError, ValidationError) as error:
            raise ValueError(f"cannot read memory bank {path}: {error}") from error
        try:
            return cls(features, config, int(metadata["image_size"]), index)
        except ValueError as error:
            raise ValueError(f"memory bank {path}: {error}") from error


class PatchCoreScorer:
    """Scores patch features against a memory bank: eq. 7 image scores and smoothed anomaly maps."""

    def __init__(self, bank: MemoryBank, device: torch.device | None = None) -> None:
        self.device = device or pick_device()
        self.reweight_neighbours = bank.config.reweight_neighbours
        self.smoothing_sigma = bank.config.smoothing_sigma
        self.bank = torch.from_numpy(bank.features).to(self.device)
        self.bank_sq_norms = squared_norms(self.bank)
        self.search = bank.config.search
        self._indexed = (IndexedSearch(bank.index, self.bank, self.bank_sq_norms)
                         if self.search == "indexed" else None)
        self._query_tile, self._bank_tile = CUDA_TILES if self.device.type == "cuda" else CPU_TILES
        self._indexed_tile = CUDA_TILES[0] if self.device.type == "cuda" else INDEXED_CPU_TILE
        self._map_operators: dict[tuple[int, int], torch.Tensor] = {}

    def patch_distances(self, queries: torch.Tensor, first_row: int = 0) -> torch.Tensor:
        """(Q, D) queries → (Q,) Euclidean distance to the nearest bank row from `first_row` on."""
        rows, sq_norms = self.bank[first_row:], self.bank_sq_norms[first_row:]
        return self._by_chunks(queries, lambda chunk: nearest_distances_sq(
            chunk, rows, sq_norms, self._query_tile, self._bank_tile).sqrt_(), self._query_tile)

    def _by_chunks(self, queries: torch.Tensor, search: Callable[[torch.Tensor], torch.Tensor],
                   tile: int) -> torch.Tensor:
        queries = queries.to(self.device, torch.float32)

        def run(chunk: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return search(chunk)

        chunks = queries.split(tile)
        if self.device.type == "cpu" and len(chunks) > 1:
            # Whole query chunks per thread, not OpenMP inside each small GEMM: on shared cores the
            # latter spent most of its CPU spinning at barriers (benchmarks/README.md, "PatchCore throughput").
            with ThreadPoolExecutor(torch.get_num_threads()) as pool:
                found = list(pool.map(run, chunks))
        else:
            found = [run(chunk) for chunk in chunks]
        with torch.inference_mode():
            return torch.cat(found) if found else torch.empty(0, device=self.device)

    def score(self, features: np.ndarray | torch.Tensor, grid: tuple[int, int], image_size: int) -> Detections:
        """(N, H*W, D) patch features on `grid` (H, W) → image scores and (N, S, S) maps, S = `image_size`."""
        features = self.checked(features, grid)
        return self.detections(features, self.distances(features), grid, image_size)

    def checked(self, features: np.ndarray | torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The (N, H*W, D) patch features on `grid` as a float32 tensor on the scorer's device."""
        features = torch.as_tensor(features, dtype=torch.float32, device=self.device)
        height, width = grid
        if (features.ndim != 3 or len(features) == 0 or features.shape[1] != height * width
                or features.shape[2] != self.bank.shape[1]):
            raise ValueError(f"expected features (N ≥ 1, {height * width}, {self.bank.shape[1]}) for grid {grid} "
                             f"and this bank, got {tuple(features.shape)}")
        return features

    def distances(self, features: torch.Tensor, known: tuple[np.ndarray, int] | None = None) -> torch.Tensor:
        """Checked (N, P, D) features → (N, P) distance of each patch to its nearest bank row: exact with
        `search: exact`; with `search: indexed` each image's largest distance (and where it is) exact and
        the others upper bounds, mostly exact too (models/patchcore/nearest_index.py).

        `known` = (the patches' distances (N, P) to the bank's first R rows, R, as this scorer's search
        gave them): then only the rows after those are searched (a bank grown from an earlier one, whose
        distances were kept)."""
        queries = features.reshape(-1, features.shape[2])
        if known is None:
            if self._indexed is None:
                return self.patch_distances(queries).view(len(features), -1)
            bounds = self._by_chunks(queries, self._indexed.upper_bounds, self._indexed_tile).view(len(features), -1)
        else:
            bounds = torch.as_tensor(known[0], dtype=torch.float32, device=self.device).reshape(len(features), -1)
            if known[1] < len(self.bank):
                bounds = torch.minimum(bounds, self.patch_distances(queries, known[1]).view(len(features), -1))
            if self._indexed is None:
                return bounds
        with torch.inference_mode():
            return exact_maxima(features, bounds, self.patch_distances)[0]

    def detections(self, features: torch.Tensor, distances: torch.Tensor, grid: tuple[int, int],
                   image_size: int) -> Detections:
        """Eq. 7 image scores and smoothed (N, S, S) maps from checked features and their patch distances."""
        height, width = grid
        with torch.inference_mode():
            worst = features[torch.arange(len(features), device=self.device), distances.argmax(1)]
            scores = reweighted_scores(worst, self.bank, self.bank_sq_norms, self.reweight_neighbours)
            maps = (self.map_operator(height, image_size) @ distances.view(-1, height, width)
                    @ self.map_operator(width, image_size).T)
        return Detections(scores.cpu().numpy(), maps.cpu().numpy())

    def map_operator(self, cells: int, size: int) -> torch.Tensor:
        """(size, cells): bilinear upsampling of `cells` values to `size`, then a Gaussian blur (σ =
        `smoothing_sigma`, truncated at 4σ, edges replicated). Both are linear and separable, so a whole
        map is two small matrix products instead of a wide convolution over S x S pixels."""
        if (cells, size) not in self._map_operators:
            identity = torch.eye(cells, device=self.device)[None, None]
            operator = F.interpolate(identity, size=(size, cells), mode="bilinear", align_corners=False)[0, 0]
            if self.smoothing_sigma > 0:
                radius = int(4 * self.smoothing_sigma + 0.5)
                offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=self.device)
                kernel = torch.exp(-0.5 * (offsets / self.smoothing_sigma) ** 2)
                columns = F.pad(operator.T[:, None], (radius, radius), mode="replicate")
                operator = F.conv1d(columns, (kernel / kernel.sum()).view(1, 1, -1))[:, 0].T
            self._map_operators[cells, size] = operator.contiguous()
        return self._map_operators[cells, size]
