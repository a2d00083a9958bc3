"""The Dask client parallel work runs on: an existing cluster by scheduler address, else a local one."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

log = logging.getLogger(__name__)

ADDRESS_ENV = "PATCHLINE_DASK_ADDRESS"


def machine_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def dask_client(address: str | None = None, n_workers: int | None = None) -> Iterator[Client]:
    """A client, set as Dask's default scheduler while the block runs; what it started is closed after.

    `address` (e.g. a line config's `dask_address`), else `$PATCHLINE_DASK_ADDRESS`, names an existing
    scheduler; with neither, a `LocalCluster` of one single-threaded worker process per core starts
    (`n_workers` overrides the count). Workers get one BLAS/OpenMP thread each (Dask's default
    environment), so torch inside tasks does not oversubscribe the cores.
    """
    address = address or os.environ.get(ADDRESS_ENV) or None
    if n_workers is not None and n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    if address:
        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError) as error:
            raise ConnectionError(f"cannot reach the Dask scheduler at {address!r}: {error}") from error
        log.info("dask: connected to %s (%d workers)", address, len(client.scheduler_info()["workers"]))
        try:
            yield client
        finally:
            client.close()
        return
    workers = n_workers or machine_cores()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        log.info("dask: local cluster of %d workers, dashboard %s", workers, client.dashboard_link)
        yield client
