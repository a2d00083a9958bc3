"""Greedy k-center (minimax facility location) coresets: exact on one device, or partitioned over Dask.

The greedy ("farthest first", Gonzalez 1985) picks, at each step, the row farthest from every row
picked so far; after k picks every row lies within the returned radius of a picked row, at most twice
the best radius any k rows can achieve. As in PatchCore (Roth et al. 2022, sec. 3.2) distances are
taken after a seeded Johnson-Lindenstrauss projection. `Coreset.radius` is measured in that
projected space (`project_features` gives it), where the selection was made.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import torch
from tqdm.auto import tqdm

from patchline.models.config import PatchCoreConfig
from patchline.models.images import pick_device
from patchline.models.patchcore.nearest import nearest_distances_sq, squared_norms

log = logging.getLogger(__name__)

# One default: the line config's (`patchcore.projection_dim`), for callers without a line config.
DEFAULT_PROJECTION_DIM = PatchCoreConfig.model_fields["projection_dim"].default
# Every chunked distance computation holds at most this many row-to-centre distances at once.
_TILE = 1 << 22
_PROJECTION_ROWS = 1 << 16
# Against more centres than this, distances are taken in square tiles of this side (`_min_sq`).
_CENTRE_TILE = 1024
# Coverage checks screen candidates in this few dimensions before measuring exact distances.
_SCREEN_DIM = 32
# The largest partition (its work grows with rows squared) sets the parallel run time.
_MAX_PARTITION = 1.5


@dataclass(frozen=True)
class Coreset:
    """Selected row indices (int64, into the full array, in pick order) and the coverage radius achieved."""

    indices: np.ndarray
    radius: float


def coreset_size(n_rows: int, ratio: float) -> int:
    """How many of `n_rows` rows a coreset of `ratio` keeps (at least one)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    if n_rows < 1:
        raise ValueError(f"cannot take a coreset of {n_rows} rows")
    return max(1, min(n_rows, round(n_rows * ratio)))


def jl_matrix(in_dim: int, out_dim: int = DEFAULT_PROJECTION_DIM, seed: int = 0) -> np.ndarray | None:
    """Seeded Gaussian projection (in_dim, out_dim) preserving distances in expectation; None if in_dim <= out_dim."""
    if out_dim < 1:
        raise ValueError(f"projection dim must be >= 1, got {out_dim}")
    if in_dim <= out_dim:
        return None
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((in_dim, out_dim)) / math.sqrt(out_dim)).astype(np.float32)


def project_features(features: np.ndarray | torch.Tensor, projection_dim: int = DEFAULT_PROJECTION_DIM,
                     seed: int = 0) -> np.ndarray:
    """The rows (n, D) as the greedy sees them: float32 (n, min(D, projection_dim))."""
    _check_rows(features, "features")
    columns = _projected_columns(features, jl_matrix(features.shape[1], projection_dim, seed), torch.device("cpu"))
    return columns.T.contiguous().numpy()


def greedy_coreset(features: np.ndarray | torch.Tensor, size: int, *, projection_dim: int = DEFAULT_PROJECTION_DIM,
                   seed: int = 0, device: torch.device | None = None) -> Coreset:
    """Exact greedy k-center of `size` rows of `features` (n, D) on one device (GPU when present).

    The first pick is a seeded random row; each later pick is the row farthest from all earlier picks.
    Memory: the projected rows plus a few vectors of length n, never an n x n or n x D temporary.
    """
    _check_rows(features, "features")
    _check_size(size, len(features))
    device = device or pick_device()
    columns = _projected_columns(features, jl_matrix(features.shape[1], projection_dim, seed), device)
    first = int(np.random.default_rng(seed).integers(len(features)))
    picks, _, nearest_sq = _farthest_first(columns, size, first, progress=True)
    return Coreset(indices=picks.cpu().numpy().astype(np.int64), radius=math.sqrt(float(nearest_sq.max())))


SCRATCH_PREFIX = "coreset-"


def greedy_coreset_dask(features: da.Array, size: int, *, projection_dim: int = DEFAULT_PROJECTION_DIM,
                        seed: int = 0, partitions: int | None = None, oversample: float = 1.25,
                        scratch: str | os.PathLike | None = None) -> Coreset:
    """Greedy k-center of `size` rows of a row-chunked Dask array (n, D), in parallel on the active Dask scheduler.

    Rows are projected block by block and routed to the nearest of `partitions` pivots (k-means
    centres of a sample), so each partition is a region of feature space (oversized ones are split
    again). Every partition runs
    its own greedy in parallel for `oversample` times its share of picks, recording each pick's gap
    (its distance to the earlier picks). The `size` largest gaps over all partitions are kept, a prefix
    of each partition's sequence: what one greedy would pick if the regions did not interact, and
    exactly `size` rows with no second round. A partition whose own rows are still farther from its
    picks than the smallest kept gap continues for more picks. A last distributed pass over all rows
    measures the true radius against every kept row. Runs on whatever Dask scheduler is active: open a
    distributed client (storage.dask_cluster.dask_client) to use a cluster.

    Routed rows and partitions live in files under a temporary folder in `scratch` (default: the
    system's temp dir; with a remote cluster, a folder its workers share), deleted at the end: memory
    then holds a few blocks and partitions at a time, whatever the size of the features.
    """
    if not isinstance(features, da.Array) or features.ndim != 2:
        raise ValueError(f"features must be a 2-D dask array (rows, dim), got {type(features).__name__} "
                         f"with shape {getattr(features, 'shape', None)}")
    n, dim = features.shape
    if math.isnan(n) or n < 1:
        raise ValueError(f"features must have a known, positive number of rows, got {n}")
    if not np.issubdtype(features.dtype, np.floating):
        raise ValueError(f"features must be floating point, got {features.dtype}")
    _check_size(size, n)
    if oversample < 1:
        raise ValueError(f"oversample must be >= 1, got {oversample}")
    if partitions is not None and partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    started = time.perf_counter()
    # The pid in the name lets a later run remove the folder of one that was killed (tasks/patchcore.py).
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=scratch,
                                     ignore_cleanup_errors=True) as folder:
        parts, part_rows = _partitions(features.rechunk({1: -1}), min(partitions or default_partitions(n), size, n),
                                       jl_matrix(dim, projection_dim, seed), seed, folder)
        log.info("dask coreset: %d rows routed to %d partitions of %d..%d rows in %.1f s",
                 n, len(parts), min(part_rows), max(part_rows), time.perf_counter() - started)
        traces, counts = _partition_picks(parts, part_rows, size, oversample, seed)
        log.info("dask coreset: %d picks taken at %.1f s; measuring coverage", size, time.perf_counter() - started)
        kept = [trace.local[:count] for trace, count in zip(traces, counts)]
        radius_sq, rows = _coverage(parts, kept)
    gaps_sq = np.concatenate([trace.gaps_sq[:count] for trace, count in zip(traces, counts)])
    coreset = Coreset(indices=rows[np.argsort(-gaps_sq, kind="stable")].astype(np.int64), radius=math.sqrt(radius_sq))
    log.info("dask coreset: radius %.4f, done in %.1f s", coreset.radius, time.perf_counter() - started)
    return coreset


def coverage_radius_dask(features: da.Array, indices: Sequence[int] | np.ndarray, *,
                         projection_dim: int = DEFAULT_PROJECTION_DIM, seed: int = 0,
                         partitions: int | None = None, scratch: str | os.PathLike | None = None) -> float:
    """Largest distance from any row of a Dask array (n, D) to its nearest row among `indices`, in the
    projected space `greedy_coreset_dask` with the same `seed` selects in; for arrays too large for
    `coverage_radius`. Rows are routed as the coreset routes them, and each partition measures exactly
    only the rows its own selected rows do not already bound below the running maximum.
    """
    n, dim = features.shape
    chosen = np.unique(np.asarray(indices, dtype=np.int64))
    if len(chosen) == 0 or chosen[0] < 0 or chosen[-1] >= n:
        raise ValueError(f"indices must be non-empty and within [0, {n}), got {len(chosen)} indices")
    with tempfile.TemporaryDirectory(prefix="coverage-", dir=scratch, ignore_cleanup_errors=True) as folder:
        parts, _ = _partitions(features.rechunk({1: -1}), min(partitions or default_partitions(n), n),
                               jl_matrix(dim, projection_dim, seed), seed, folder)
        local = dask.compute(*[dask.delayed(_local_positions, pure=True)(part, chosen) for part in parts])
        return math.sqrt(_coverage(parts, list(local))[0])


def extend_coreset(centres: np.ndarray, candidates: da.Array, picks: int, *,
                   projection_dim: int = DEFAULT_PROJECTION_DIM, seed: int = 0, partitions: int | None = None,
                   oversample: float = 1.25, scratch: str | os.PathLike | None = None) -> Coreset:
    """Greedy k-center continued from rows already chosen: `picks` rows of `candidates` (n, D), each the
    candidate farthest from the `centres` (m, D) and from the earlier picks, on the active Dask scheduler.

    This is the farthest-first traversal of centres ∪ candidates whose first m picks are the centres:
    the merge-reduce step that grows a coreset by new rows. Keeping every centre keeps whatever they
    covered within the radius they covered it, so only the candidates are measured. The candidates are
    routed to partitions as `greedy_coreset_dask` routes rows; each partition starts from its rows'
    distances to the centres and the `picks` largest gaps over all partitions are kept. Returns the
    picked candidates (indices in pick order) and a radius that every candidate lies within, of a centre
    or of a pick of its own partition, in the projected space `greedy_coreset_dask` with the same `seed`
    selects in.
    """
    if not isinstance(candidates, da.Array) or candidates.ndim != 2:
        raise ValueError(f"candidates must be a 2-D dask array (rows, dim), got {type(candidates).__name__}")
    _check_rows(centres, "centres")
    n, dim = candidates.shape
    if centres.shape[1] != dim:
        raise ValueError(f"centres have {centres.shape[1]} columns but candidates {dim}")
    if not 0 <= picks <= n:
        raise ValueError(f"picks must be in [0, {n}] (the number of candidates), got {picks}")
    started = time.perf_counter()
    matrix = jl_matrix(dim, projection_dim, seed)
    # One graph key for the projected centres, so a cluster ships them to each worker once.
    projected = dask.delayed(_project_block(centres, matrix), pure=True)
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-", dir=scratch,
                                     ignore_cleanup_errors=True) as folder:
        parts, part_rows = _partitions(candidates.rechunk({1: -1}), min(partitions or default_partitions(n), n),
                                       matrix, seed, folder)
        initial = list(dask.compute(*[dask.delayed(_initial_trace, pure=True)(part, projected) for part in parts]))
        log.info("dask coreset extension: %d candidates in %d partitions measured against %d centres in %.1f s",
                 n, len(parts), len(centres), time.perf_counter() - started)
        if picks:
            traces, counts = _partition_picks(parts, part_rows, picks, oversample, seed, initial)
        else:
            traces, counts = initial, [0] * len(parts)
        kept = [trace.local[:count] for trace, count in zip(traces, counts)]
        radii_sq, rows = dask.compute(
            [dask.delayed(_extended_radius_sq, pure=True)(part, start.nearest_sq, local)
             for part, start, local in zip(parts, initial, kept)],
            [dask.delayed(_global_rows, pure=True)(part, local) for part, local in zip(parts, kept)])
    gaps_sq = np.concatenate([trace.gaps_sq[:count] for trace, count in zip(traces, counts)])
    indices = np.concatenate(rows)[np.argsort(-gaps_sq, kind="stable")].astype(np.int64)
    log.info("dask coreset extension: %d picks, radius %.4f, done in %.1f s", picks, math.sqrt(max(radii_sq)),
             time.perf_counter() - started)
    return Coreset(indices=indices, radius=math.sqrt(max(radii_sq)))


def _initial_trace(part: str, centres: np.ndarray) -> _Trace:
    """A partition's greedy before its first pick: every row's squared distance to its nearest centre."""
    rows = torch.from_numpy(_load_part(part)[0])
    return _Trace(local=np.empty(0, np.int64), gaps_sq=np.empty(0, np.float32),
                  nearest_sq=_min_sq(rows, torch.from_numpy(centres)).numpy())


def _extended_radius_sq(part: str, start_sq: np.ndarray, local: np.ndarray) -> float:
    """Largest squared distance from a row of this partition to the centres or the partition's kept picks."""
    nearest_sq = torch.from_numpy(start_sq)
    if len(local):
        rows = torch.from_numpy(_load_part(part)[0])
        nearest_sq = torch.minimum(nearest_sq, _min_sq(rows, rows[torch.from_numpy(local)]))
    return float(nearest_sq.max())


def default_partitions(n_rows: int) -> int:
    """Partitions for `n_rows`: about 16,000 rows each.

    A partition's greedy costs (rows x picks), both a 1/p share, so more partitions are quadratically
    cheaper; but picks near partition boundaries duplicate a neighbour's coverage. On real ELPV patch
    features about 16,000 rows kept the radius close to the exact greedy's, a quarter of that did not
    (benchmarks/README.md, "Figures behind settings in the code").
    """
    return max(1, min(256, round(n_rows / 16384)))


def coverage_radius(features: np.ndarray | torch.Tensor, indices: Sequence[int] | np.ndarray,
                    device: torch.device | None = None) -> float:
    """Max over rows of `features` (n, D) of the Euclidean distance to the nearest row in `indices`, exactly.

    Each row gets an upper bound from the candidate nearest in a cheap low-dimensional screen; exact
    distances are then computed only for rows, largest bound first, until no bound exceeds the
    largest exact distance found.
    """
    _check_rows(features, "features")
    indices = np.asarray(indices, dtype=np.int64)
    if indices.ndim != 1 or len(indices) == 0:
        raise ValueError(f"indices must be a non-empty 1-D list of rows, got shape {indices.shape}")
    if indices.min() < 0 or indices.max() >= len(features):
        raise ValueError(f"indices must lie in [0, {len(features)}), got {indices.min()}..{indices.max()}")
    device = device or pick_device()
    rows = _projected_columns(features, None, device).T
    centres = rows[torch.from_numpy(indices).to(device)]
    screen = jl_matrix(rows.shape[1], _SCREEN_DIM, seed=0)
    screen = None if screen is None else torch.from_numpy(screen).to(device)
    nearest = _nearest_centre(rows if screen is None else rows @ screen,
                              centres if screen is None else centres @ screen)
    # The distance to the screen's candidate is a true distance to a selected row: an upper bound.
    bounds_sq = torch.empty(len(rows), device=device)
    for s in range(0, len(rows), _PROJECTION_ROWS):
        bounds_sq[s:s + _PROJECTION_ROWS] = (rows[s:s + _PROJECTION_ROWS]
                                             - centres[nearest[s:s + _PROJECTION_ROWS]]).square().sum(1)
    return math.sqrt(_max_min_sq(rows, centres, bounds_sq))


@dataclass(frozen=True)
class _Trace:
    """One partition's greedy so far: local picks, squared distance of each pick to the earlier ones when
    taken, and every row's squared distance to its nearest pick (to continue from)."""

    local: np.ndarray
    gaps_sq: np.ndarray
    nearest_sq: np.ndarray

    @property
    def final_sq(self) -> float:
        return float(self.nearest_sq.max())


def _partitions(features: da.Array, count: int, matrix: np.ndarray | None, seed: int,
                folder: str) -> tuple[list[str], list[int]]:
    """Projected rows grouped by nearest pivot, one partition file pair per group (`_load_part`) in
    `folder`: the non-empty partitions' path prefixes and row counts."""
    starts = np.concatenate([[0], np.cumsum(features.chunks[0])]).astype(np.int64)
    blocks = list(features.to_delayed().ravel())
    pivots = _sample_pivots(starts, blocks, matrix, count, np.random.default_rng(seed))
    routed = os.path.join(folder, "routed")
    os.makedirs(routed)
    block_parts = [os.path.join(routed, str(i)) for i in range(len(blocks))]
    # Each block's rows go to disk sorted by pivot; a partition then reads its slice of every block.
    # Only the bounds travel through Dask, so no task holds more than one block or one partition.
    bounds = np.stack(dask.compute(*[dask.delayed(_route_block, pure=True)(block, int(start), matrix, pivots, path)
                                     for block, start, path in zip(blocks, starts[:-1], block_parts)]))
    parts = [os.path.join(folder, f"p{j}") for j in range(count)]
    rows = dask.compute(*[dask.delayed(_gather_partition, pure=True)(block_parts, bounds[:, j], bounds[:, j + 1], part)
                          for j, part in enumerate(parts)])
    shutil.rmtree(routed)
    return _balanced(parts, list(rows), features.shape[0] / count, seed)


def _coverage(parts: list, kept: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """(Largest squared distance from any row to the rows `kept` (local positions per partition), the
    kept rows' global numbers in partition order)."""
    centres = dask.delayed(np.concatenate)([dask.delayed(_take_rows, pure=True)(part, local)
                                            for part, local in zip(parts, kept)])
    radii_sq, rows = dask.compute(
        [dask.delayed(_partition_radius_sq, pure=True)(part, local, centres) for part, local in zip(parts, kept)],
        [dask.delayed(_global_rows, pure=True)(part, local) for part, local in zip(parts, kept)])
    return max(radii_sq), np.concatenate(rows)


def _partition_picks(parts: list, part_rows: list[int], size: int, oversample: float, seed: int,
                     initial: list[_Trace] | None = None) -> tuple[list[_Trace], list[int]]:
    """Each partition's greedy, run in parallel until the `size` largest gaps over all partitions are
    known, from a seeded first pick or continuing `initial`; returns the traces and how many leading
    picks of each are kept."""
    n = sum(part_rows)
    steps = {j: min(rows, math.ceil(oversample * size * rows / n)) for j, rows in enumerate(part_rows)}
    traces: list[_Trace | None] = list(initial) if initial else [None] * len(parts)
    while steps:
        results = dask.compute(*[dask.delayed(_partition_greedy, pure=True)(parts[j], more, seed, j, traces[j])
                                 for j, more in steps.items()])
        for j, trace in zip(steps, results):
            traces[j] = trace
        counts, cut_sq = _merge_traces(traces, size)
        # A partition whose own rows are still farther than the cut would contribute more picks: it
        # continues for as many steps again as it has taken.
        steps = {j: min(part_rows[j], 2 * len(trace.local)) - len(trace.local) for j, trace in enumerate(traces)
                 if trace.final_sq > cut_sq and len(trace.local) < part_rows[j]}
        if steps:
            log.info("dask coreset: %d partitions need more picks, continuing them", len(steps))
    return traces, counts


def _check_rows(features: object, name: str) -> None:
    shape = getattr(features, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty 2-D array (rows, dim), got shape {shape}")


def _check_size(size: int, n_rows: int) -> None:
    if not 1 <= size <= n_rows:
        raise ValueError(f"coreset size must be in [1, {n_rows}] (the number of rows), got {size}")


def _projected_columns(features: np.ndarray | torch.Tensor, matrix: np.ndarray | None,
                       device: torch.device) -> torch.Tensor:
    """(n, D) rows, projected chunk by chunk, as a float32 (d, n) tensor: a pick's distances to all rows
    are then one vector-matrix product over contiguous memory."""
    n = features.shape[0]
    weights = None if matrix is None else torch.from_numpy(matrix).to(device)
    out_dim = features.shape[1] if matrix is None else matrix.shape[1]
    columns = torch.empty((out_dim, n), dtype=torch.float32, device=device)
    for start in range(0, n, _PROJECTION_ROWS):
        chunk = features[start:start + _PROJECTION_ROWS]
        chunk = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.asarray(chunk))
        if not chunk.is_floating_point():
            raise ValueError(f"features must be floating point, got {chunk.dtype}")
        chunk = chunk.to(device=device, dtype=torch.float32)
        projected = chunk if weights is None else chunk @ weights
        # NaN and infinity survive a Gaussian projection, so checking the narrower rows is enough.
        if not torch.isfinite(projected).all():
            raise ValueError(f"features rows {start}..{start + len(chunk) - 1} contain NaN or infinite values")
        columns[:, start:start + len(chunk)] = projected.T
    return columns


def _farthest_first(columns: torch.Tensor, steps: int, first: int, nearest_sq: torch.Tensor | None = None,
                    progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy on (d, n) columns: (picks (steps,), squared gap of each pick when taken, squared distance of
    every column to its nearest pick). Starts at column `first`, or continues from an earlier `nearest_sq`.

    The squared distance to each new pick is |x|^2 - 2 x.c + |c|^2, one vector-matrix product, folded
    into the running minimum: O(n d) per step and no per-step (n, d) temporary. Indices stay on the
    device, so a GPU never waits on the host inside the loop.
    """
    n = columns.shape[1]
    device = columns.device
    norms = columns.square().sum(0)
    if nearest_sq is None:
        nearest_sq = torch.full((n,), math.inf, device=device)
        pick = torch.tensor(first, device=device)
    else:
        nearest_sq = nearest_sq.clone()
        pick = torch.argmax(nearest_sq)
    picks = torch.empty(steps, dtype=torch.long, device=device)
    gaps_sq = torch.empty(steps, device=device)
    for step in tqdm(range(steps), desc="greedy coreset", unit="pick", disable=None if progress else True,
                     mininterval=2.0):
        picks[step] = pick
        gaps_sq[step] = nearest_sq[pick]
        distance_sq = (columns[:, pick] * -2.0) @ columns
        distance_sq.add_(norms).add_(norms[pick])
        torch.minimum(nearest_sq, distance_sq, out=nearest_sq)
        pick = torch.argmax(nearest_sq)
    return picks, gaps_sq.clamp_(min=0.0), nearest_sq.clamp_(min=0.0)


def _nearest_centre(rows: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for every row, in tiles of bounded size."""
    tile = max(1, _TILE // len(centres))
    centre_norms = centres.square().sum(1, keepdim=True).T
    # Results go straight into one preallocated output: small per-tile tensors kept alive between the
    # large tile temporaries fragment the heap until it holds the whole rows x centres matrix.
    nearest = torch.empty(len(rows), dtype=torch.long, device=rows.device)
    for s in range(0, len(rows), tile):
        torch.argmin(torch.addmm(centre_norms, rows[s:s + tile], centres.T, alpha=-2.0), dim=1,
                     out=nearest[s:s + tile])
    return nearest


def _min_sq(rows: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared distance from every row to its nearest centre (PatchCore's one search,
    models/patchcore/nearest.py), in tiles of bounded size.

    Beyond `_CENTRE_TILE` centres the tiles are square, rows x centres: a tile's centres then stay in
    cache while a block of rows is measured against them, where a few rows against every centre would
    reread all centres from memory for each few rows."""
    centre_tile = min(len(centres), _CENTRE_TILE)
    row_tile = max(1, _TILE // len(centres)) if len(centres) <= _CENTRE_TILE else _CENTRE_TILE
    return nearest_distances_sq(rows, centres, squared_norms(centres), row_tile, centre_tile)


def _max_min_sq(rows: torch.Tensor, centres: torch.Tensor, bounds_sq: torch.Tensor) -> float:
    """Max over rows of the squared distance to the nearest centre, given an upper bound per row.

    Rows are measured exactly in order of decreasing bound; once the next bound is no larger than the
    largest exact value, no remaining row can exceed it.
    """
    order = torch.argsort(bounds_sq, descending=True)
    tile = max(256, _TILE // len(centres))
    best = 0.0
    for start in range(0, len(order), tile):
        if float(bounds_sq[order[start]]) <= best:
            break
        best = max(best, float(_min_sq(rows[order[start:start + tile]], centres).max()))
    return best


def _sample_pivots(starts: np.ndarray, blocks: list, matrix: np.ndarray | None,
                   count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` k-means centres of the projected rows of a few random blocks (at least four, and 64 rows
    per pivot)."""
    chosen, rows = [], 0
    for block in rng.permutation(len(blocks)):
        if rows >= 64 * count and len(chosen) >= 4:
            break
        chosen.append(int(block))
        rows += int(starts[block + 1] - starts[block])
    sample = np.concatenate(dask.compute(*[dask.delayed(_project_block, pure=True)(blocks[b], matrix)
                                           for b in sorted(chosen)]))
    return _kmeans(sample, count, rng)


def _kmeans(rows: np.ndarray, count: int, rng: np.random.Generator, iterations: int = 10) -> np.ndarray:
    """Lloyd's k-means centres from `count` random rows: cells that follow the data's clusters put fewer
    partition boundaries through dense regions than random pivots do, and boundaries cost picks."""
    points = torch.from_numpy(rows)
    centres = points[torch.from_numpy(rng.choice(len(rows), size=min(count, len(rows)), replace=False))].clone()
    for _ in range(iterations):
        labels = _nearest_centre(points, centres)
        sums = torch.zeros_like(centres).index_add_(0, labels, points)
        sizes = torch.bincount(labels, minlength=len(centres)).unsqueeze(1)
        centres = torch.where(sizes > 0, sums / sizes.clamp(min=1), centres)
    return centres.numpy()


def _project_block(block: np.ndarray, matrix: np.ndarray | None) -> np.ndarray:
    rows = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    projected = rows if matrix is None else rows @ torch.from_numpy(matrix)
    # NaN and infinity survive a Gaussian projection, so checking the narrower rows is enough.
    if not torch.isfinite(projected).all():
        raise ValueError("features contain NaN or infinite values")
    return projected.numpy()


def _route_block(block: np.ndarray, start: int, matrix: np.ndarray | None, pivots: np.ndarray,
                 path: str) -> np.ndarray:
    """Project one block, save its rows sorted by nearest pivot (with their global row numbers) as
    the part `path`, and return the bounds: pivot j's rows are at bounds[j]:bounds[j + 1]."""
    projected = _project_block(block, matrix)
    rows, numbers, bounds = _sorted_by_pivot(projected, np.arange(start, start + len(projected), dtype=np.int64),
                                             pivots)
    _save_part(path, rows, numbers)
    return bounds


def _sorted_by_pivot(rows: np.ndarray, numbers: np.ndarray,
                     pivots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = _nearest_centre(torch.from_numpy(rows), torch.from_numpy(pivots)).numpy()
    # Stable, so each pivot's rows keep their order (ascending row numbers within a block).
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(pivots) + 1))
    return rows[order], numbers[order], bounds


def _gather_partition(block_parts: Sequence[str], lows: np.ndarray, highs: np.ndarray, path: str) -> int:
    """Save rows lows[i]:highs[i] of every routed block i as the part `path`; returns its row count.

    Each slice is read straight into its place in one preallocated array: thousands of small
    temporaries per partition fragmented the heap until a 32 GB run's RSS grew by gigabytes.
    """
    taken = [(block, int(low), int(high)) for block, low, high in zip(block_parts, lows, highs) if high > low]
    if not taken:
        return 0
    dim = _part_shape(taken[0][0])[1]
    count = sum(high - low for _, low, high in taken)
    rows, numbers = np.empty((count, dim), dtype=np.float32), np.empty(count, dtype=np.int64)
    start = 0
    for block, low, high in taken:
        # Plain reads: memory-mapping thousands of block files counted their pages into the RSS.
        with open(block + ".rows", "rb") as rows_file, open(block + ".numbers", "rb") as numbers_file:
            rows_file.seek(low * dim * 4)
            numbers_file.seek(low * 8)
            rows_file.readinto(memoryview(rows[start:start + high - low]).cast("B"))
            numbers_file.readinto(memoryview(numbers[start:start + high - low]).cast("B"))
        start += high - low
    return _save_part(path, rows, numbers)


def _save_part(path: str, rows: np.ndarray, numbers: np.ndarray) -> int:
    # Raw files, not .npy: reading an .npy header parses it with `ast`, which CPython 3.11 does not
    # do safely from several threads at once ("AST constructor recursion depth mismatch").
    np.ascontiguousarray(rows, dtype=np.float32).tofile(path + ".rows")
    np.ascontiguousarray(numbers, dtype=np.int64).tofile(path + ".numbers")
    return len(numbers)


def _load_part(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(projected rows (m, d) float32, their global row numbers (m,) int64) of a saved part."""
    rows, numbers = _map_part(path)
    return np.array(rows), np.array(numbers)


def _part_shape(path: str) -> tuple[int, int]:
    """(rows, dim) of a saved part, from its files' sizes (float32 rows, int64 numbers)."""
    count = os.path.getsize(path + ".numbers") // 8
    return count, os.path.getsize(path + ".rows") // (4 * count)


def _map_part(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A saved part memory-mapped: slicing reads only the rows taken."""
    count, dim = _part_shape(path)
    return (np.memmap(path + ".rows", dtype=np.float32, mode="r", shape=(count, dim)),
            np.memmap(path + ".numbers", dtype=np.int64, mode="r", shape=(count,)))


def _balanced(parts: list[str], rows: list[int], target_rows: float, seed: int) -> tuple[list[str], list[int]]:
    """The non-empty partitions, none over `_MAX_PARTITION` x `target_rows`, and their row counts.

    A partition's work grows with its rows squared, so one that gathered too many rows (a broad
    cluster around one pivot) is split again around k-means centres of its own.
    """
    parts, rows = [p for p, r in zip(parts, rows) if r], [r for r in rows if r]
    for level in range(3):
        if max(rows) <= _MAX_PARTITION * target_rows:
            break
        oversized = [j for j, count in enumerate(rows) if count > _MAX_PARTITION * target_rows]
        pieces = {j: [f"{parts[j]}.{i}" for i in range(math.ceil(rows[j] / target_rows))] for j in oversized}
        counts = dict(zip(oversized, dask.compute(*[dask.delayed(_split_partition, pure=True)(
            parts[j], pieces[j], seed + 1000 * level + j) for j in oversized])))
        split = [(p, r) for j, (part, count) in enumerate(zip(parts, rows))
                 for p, r in (zip(pieces[j], counts[j]) if j in counts else [(part, count)]) if r]
        parts, rows = [p for p, _ in split], [r for _, r in split]
    return parts, rows


def _split_partition(part: str, pieces: list[str], seed: int) -> list[int]:
    """Split a part around k-means centres of its own rows into the parts `pieces`; their row counts."""
    rows, numbers = _load_part(part)
    rows, numbers, bounds = _sorted_by_pivot(rows, numbers, _kmeans(rows, len(pieces), np.random.default_rng(seed)))
    return [_save_part(piece, rows[bounds[i]:bounds[i + 1]], numbers[bounds[i]:bounds[i + 1]])
            for i, piece in enumerate(pieces)]


def _partition_greedy(part: str, steps: int, seed: int, index: int, earlier: _Trace | None) -> _Trace:
    """`steps` greedy picks in one partition, from a seeded random row or continuing `earlier`."""
    columns = torch.from_numpy(_load_part(part)[0]).T.contiguous()
    first = int(np.random.default_rng((seed, index)).integers(columns.shape[1]))
    picks, gaps_sq, nearest_sq = _farthest_first(
        columns, steps, first, None if earlier is None else torch.from_numpy(earlier.nearest_sq))
    if earlier is None:
        return _Trace(local=picks.numpy(), gaps_sq=gaps_sq.numpy(), nearest_sq=nearest_sq.numpy())
    return _Trace(local=np.concatenate([earlier.local, picks.numpy()]),
                  gaps_sq=np.concatenate([earlier.gaps_sq, gaps_sq.numpy()]), nearest_sq=nearest_sq.numpy())


def _merge_traces(traces: Sequence[_Trace], size: int) -> tuple[list[int], float]:
    """How many leading picks of each partition to keep so the `size` largest gaps are kept, and the cut."""
    gaps = np.concatenate([trace.gaps_sq for trace in traces])
    owner = np.concatenate([np.full(len(trace.gaps_sq), j) for j, trace in enumerate(traces)])
    position = np.concatenate([np.arange(len(trace.gaps_sq)) for trace in traces])
    # Ties go to earlier picks, so what is kept of each partition is a prefix of its greedy sequence.
    kept = np.lexsort((position, -gaps))[:size]
    counts = np.bincount(owner[kept], minlength=len(traces)).tolist()
    return counts, float(gaps[kept[-1]])


def _take_rows(part: str, local: np.ndarray) -> np.ndarray:
    return np.asarray(_map_part(part)[0][local])


def _global_rows(part: str, local: np.ndarray) -> np.ndarray:
    return np.asarray(_map_part(part)[1][local])


def _local_positions(part: str, chosen: np.ndarray) -> np.ndarray:
    """Positions in this partition of the rows whose global numbers are in the sorted `chosen`."""
    return np.flatnonzero(np.isin(_map_part(part)[1], chosen, assume_unique=True))


def _partition_radius_sq(part: str, local: np.ndarray, centres: np.ndarray) -> float:
    """Largest squared distance from a row of this partition to any kept row, bounded first by its own picks."""
    rows = torch.from_numpy(_load_part(part)[0])
    own = rows[torch.from_numpy(local)]
    bounds_sq = _min_sq(rows, own) if len(own) else torch.full((len(rows),), math.inf)
    return _max_min_sq(rows, torch.from_numpy(centres), bounds_sq)
