"""Greedy k-center coresets: the exact greedy against a plain reference, the Dask mode on a real LocalCluster."""

from __future__ import annotations

from collections.abc import Iterator

import dask.array as da
import numpy as np
import psutil
import pytest
import torch
from distributed import Client

from patchline.models.patchcore.coreset import (coreset_size, coverage_radius, coverage_radius_dask, extend_coreset,
                                                greedy_coreset, greedy_coreset_dask, project_features)
from patchline.storage.dask_cluster import ADDRESS_ENV, dask_client

CPU = torch.device("cpu")


def reference_greedy(rows: np.ndarray, size: int, first: int) -> tuple[list[int], float]:
    """Farthest-first traversal written plainly: every step recomputes all distances in float64."""
    rows = rows.astype(np.float64)
    picks = [first]
    while len(picks) < size:
        nearest = np.array([min(np.linalg.norm(row - rows[p]) for p in picks) for row in rows])
        picks.append(int(np.argmax(nearest)))
    radius = max(min(np.linalg.norm(row - rows[p]) for p in picks) for row in rows)
    return picks, float(radius)


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """A seeded Gaussian mixture with clusters of very different sizes and spreads, rows shuffled."""
    rng = np.random.default_rng(seed)
    clusters = 30
    sizes = rng.multinomial(n, rng.dirichlet(np.full(clusters, 0.7)))
    spreads = np.exp(rng.uniform(np.log(0.05), np.log(1.0), clusters))
    centres = rng.standard_normal((clusters, dim)) * 3
    rows = np.concatenate([c + s * rng.standard_normal((m, dim)) for c, s, m in zip(centres, spreads, sizes)])
    return rows[rng.permutation(n)].astype(np.float32)


def test_exact_greedy_equals_the_reference() -> None:
    rows = np.random.default_rng(0).standard_normal((150, 12)).astype(np.float32)
    coreset = greedy_coreset(rows, 25, seed=3, device=CPU)
    picks, radius = reference_greedy(rows, 25, int(coreset.indices[0]))
    assert coreset.indices.dtype == np.int64
    assert coreset.indices.tolist() == picks
    assert coreset.radius == pytest.approx(radius, rel=1e-5)
    assert coverage_radius(rows, coreset.indices, device=CPU) == pytest.approx(radius, rel=1e-5)


def test_exact_greedy_runs_on_the_seeded_projection() -> None:
    rows = np.random.default_rng(1).standard_normal((120, 300)).astype(np.float32)
    coreset = greedy_coreset(rows, 15, projection_dim=16, seed=5, device=CPU)
    projected = project_features(rows, projection_dim=16, seed=5)
    assert projected.shape == (120, 16)
    picks, radius = reference_greedy(projected, 15, int(coreset.indices[0]))
    assert coreset.indices.tolist() == picks
    assert coreset.radius == pytest.approx(radius, rel=1e-5)
    # Another seed is another projection (and start), so another selection.
    assert greedy_coreset(rows, 15, projection_dim=16, seed=6, device=CPU).indices.tolist() != picks


def test_coverage_radius_is_exact_in_the_full_space() -> None:
    rows = clustered(800, 100, seed=2)
    picks = np.random.default_rng(0).choice(800, 40, replace=False)
    brute = np.sqrt(((rows[:, None, :].astype(np.float64) - rows[picks][None]) ** 2).sum(-1).min(1).max())
    assert coverage_radius(rows, picks, device=CPU) == pytest.approx(brute, rel=1e-5)


def test_bad_input_is_refused_with_the_reason() -> None:
    rows = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"size must be in \[1, 20\]"):
        greedy_coreset(rows, 21, device=CPU)
    with pytest.raises(ValueError, match=r"size must be in \[1, 20\]"):
        greedy_coreset(rows, 0, device=CPU)
    with pytest.raises(ValueError, match="2-D array"):
        greedy_coreset(rows[:, 0], 2, device=CPU)
    with pytest.raises(ValueError, match="floating point"):
        greedy_coreset(rows.astype(np.int32), 2, device=CPU)
    poisoned = rows.copy()
    poisoned[7, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        greedy_coreset(poisoned, 2, device=CPU)
    with pytest.raises(ValueError, match="2-D dask array"):
        greedy_coreset_dask(rows, 2)
    with pytest.raises(ValueError, match="oversample"):
        greedy_coreset_dask(da.from_array(rows), 2, oversample=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 20\)"):
        coverage_radius(rows, [3, 20], device=CPU)
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        coreset_size(100, 0.0)
    assert coreset_size(1000, 0.01) == 10 and coreset_size(10, 0.01) == 1


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with dask_client(threads=2) as started:
        yield started


def test_dask_coreset_covers_every_row_within_its_radius(client: Client) -> None:
    rows = clustered(6000, 24, seed=0)
    size = coreset_size(len(rows), 0.05)
    coreset = greedy_coreset_dask(da.from_array(rows, chunks=(700, 24)), size, partitions=6)
    assert len(coreset.indices) == size and len(np.unique(coreset.indices)) == size
    assert coreset.indices.dtype == np.int64 and 0 <= coreset.indices.min() and coreset.indices.max() < len(rows)
    # No projection at 24 dims: the reported radius is the true one in the data's own space.
    centres = rows[coreset.indices].astype(np.float64)
    nearest = np.concatenate([np.sqrt(((block[:, None, :] - centres[None]) ** 2).sum(-1).min(1))
                              for block in np.array_split(rows.astype(np.float64), 10)])
    assert nearest.max() <= coreset.radius * (1 + 1e-5)
    assert nearest.max() == pytest.approx(coreset.radius, rel=1e-5)

    exact = greedy_coreset(rows, size, device=CPU)
    assert coreset.radius <= 1.10 * exact.radius
    random = np.random.default_rng(0).choice(len(rows), size, replace=False)
    assert coverage_radius(rows, random, device=CPU) > 2 * coreset.radius


def test_dask_coreset_radius_is_measured_in_the_projected_space(client: Client) -> None:
    rows = clustered(3000, 160, seed=1)
    coreset = greedy_coreset_dask(da.from_array(rows, chunks=(500, 160)), 90, projection_dim=32, seed=4)
    assert len(coreset.indices) == 90
    projected = project_features(rows, projection_dim=32, seed=4)
    assert coverage_radius(projected, coreset.indices, device=CPU) == pytest.approx(coreset.radius, rel=1e-5)


def test_extended_coreset_covers_every_old_and_new_row_within_its_radius(client: Client) -> None:
    """Merge-reduce: the old coreset's rows stay, new picks come from the new rows, farthest first; with
    the old radius, the result covers old and new rows, and a far new cluster is picked before anything
    else (the drift an incremental rebuild must notice)."""
    rows = clustered(4000, 160, seed=7)
    old, new = rows[:3000], rows[3000:].copy()
    new[:40] += 25.0  # a new cluster far from every old row
    base = greedy_coreset(old, 150, projection_dim=32, seed=2, device=CPU)
    projected = project_features(rows, projection_dim=32, seed=2)
    candidates = da.from_array(new, chunks=(300, 160))
    for partitions in (1, 4):
        extended = extend_coreset(old[base.indices], candidates, 50, projection_dim=32, seed=2, partitions=partitions)
        assert len(extended.indices) == 50 and len(np.unique(extended.indices)) == 50
        assert extended.indices.min() >= 0 and extended.indices.max() < len(new)
        assert extended.indices[0] < 40, "the first pick is in the far new cluster"
        # Every new row lies within the reported radius of an old centre or a pick (exactly that radius
        # with one partition; an upper bound with more, where a row's nearest pick may be a neighbour's).
        new_rows = np.concatenate([projected[3000:], projected[base.indices]])
        exact = coverage_radius(new_rows, np.concatenate([extended.indices, 1000 + np.arange(150)]), device=CPU)
        assert exact <= extended.radius * (1 + 1e-5)
        if partitions == 1:
            assert exact == pytest.approx(extended.radius, rel=1e-5)
        together = coverage_radius(projected, np.concatenate([base.indices, 3000 + extended.indices]), device=CPU)
        assert together <= max(base.radius, extended.radius) * (1 + 1e-5)
        # Picking from the far cluster first, the extension covers it about as well as one greedy would.
        union = np.concatenate([projected[base.indices], projected[3000:]])
        assert extended.radius <= 1.5 * greedy_coreset(union, 200, projection_dim=32, device=CPU).radius
    untouched = extend_coreset(old[base.indices], candidates, 0, projection_dim=32, seed=2)
    assert len(untouched.indices) == 0 and untouched.radius > 10.0, "without picks the far cluster stays uncovered"
    with pytest.raises(ValueError, match="picks must be in"):
        extend_coreset(old[base.indices], candidates, len(new) + 1)


def test_dask_coverage_radius_equals_the_in_memory_one_for_any_rows(client: Client) -> None:
    rows = clustered(5000, 160, seed=5)
    # 50 blocks: routed rows reach the partitions through more than one merged group.
    features = da.from_array(rows, chunks=(100, 160))
    projected = project_features(rows, projection_dim=32, seed=2)
    for picks in (np.random.default_rng(1).choice(len(rows), 60, replace=False), np.arange(0, 5000, 7)):
        expected = coverage_radius(projected, picks, device=CPU)
        radius = coverage_radius_dask(features, picks, projection_dim=32, seed=2, partitions=5)
        assert radius == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"within \[0, 5000\)"):
        coverage_radius_dask(features, [4, 5000])


def test_dask_client_connects_to_a_running_scheduler_by_address(client: Client,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADDRESS_ENV, client.scheduler.address)
    rows = clustered(1000, 8, seed=3)
    with dask_client() as remote:
        assert remote.scheduler.address == client.scheduler.address
        coreset = greedy_coreset_dask(da.from_array(rows, chunks=(250, 8)), 20)
    assert len(coreset.indices) == 20
    # Leaving the block closed only the connection, not the cluster it found.
    assert client.submit(sum, [1, 2]).result() == 3


def test_the_local_cluster_listens_on_loopback_only(client: Client) -> None:
    """Its dashboards are unauthenticated: nothing of it may be reachable from another machine."""
    listening = [conn.laddr for conn in psutil.Process().net_connections("inet") if conn.status == psutil.CONN_LISTEN]
    assert listening, "the scheduler's and the worker's dashboards listen"
    assert {address.ip for address in listening} == {"127.0.0.1"}, listening
    assert client.submit(sum, [1, 2]).result() == 3
