"""The Dask client parallel work runs on: an existing cluster by scheduler address, else a local one."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

log = logging.getLogger(__name__)

ADDRESS_ENV = "PATCHLINE_DASK_ADDRESS"
LOOPBACK = "127.0.0.1"


def machine_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def dask_client(address: str | None = None, threads: int | None = None) -> Iterator[Client]:
    """A client, set as Dask's default scheduler while the block runs; what it started is closed after.

    `address` (e.g. a line config's `dask_address`), else `$PATCHLINE_DASK_ADDRESS`, names an existing
    scheduler. With neither, a `LocalCluster` of one worker inside this process starts, running
    `threads` tasks at a time (default: one per core). In-process, the worker shares the torch this
    process has already loaded: a worker process imports torch again, ~500 MB apiece (elpv-mono's
    PatchCore fit peaked at 3.3 GB with worker processes, 2.4 GB with threads, same coreset), and the
    coreset's work is torch kernels that release the GIL.
    """
    address = address or os.environ.get(ADDRESS_ENV) or None
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
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
    threads = threads or machine_cores()
    # The dashboards (the scheduler's and the worker's) are unauthenticated: loopback only, like the
    # Prefect and MLflow servers patchline starts.
    with LocalCluster(n_workers=1, threads_per_worker=threads, processes=False, dashboard_address=f"{LOOPBACK}:0",
                      worker_dashboard_address=f"{LOOPBACK}:0") as cluster, Client(cluster) as client:
        port = client.scheduler_info()["services"].get("dashboard")
        log.info("dask: local cluster of %d threads, dashboard http://%s:%s/status", threads, LOOPBACK, port)
        yield client
