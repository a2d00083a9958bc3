"""Peak resident memory of a process tree: the process itself plus every descendant (Dask workers,
subprocesses), summed per sample, as a background thread samples it."""

from __future__ import annotations

import os
import resource
import sys
import threading
from types import TracebackType

import psutil


class PeakRss:
    """Context manager; after the block, `peak_mb` is the largest summed RSS of the tree seen in it.

    Pages shared between processes count once per process, so the figure errs high, never low.
    """

    def __init__(self, interval_s: float = 0.1, pid: int | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self._root = psutil.Process(pid or os.getpid())
        self._peak_bytes = 0
        self._own_peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._own_peak_bytes = _own_lifetime_peak_bytes()

    @property
    def peak_mb(self) -> float:
        """Peak summed RSS in MB (2**20 bytes); at least this process's own peak up to the end of the
        block, which the kernel records exactly, in case a short spike fell between samples."""
        own_bytes = self._own_peak_bytes if self._own_peak_bytes is not None else _own_lifetime_peak_bytes()
        return max(self._peak_bytes, own_bytes) / 2**20

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        total = 0
        try:
            processes = [self._root, *self._root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                total += process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                # A worker that exits between listing and reading holds no memory any more.
                continue
        self._peak_bytes = max(self._peak_bytes, total)


def _own_lifetime_peak_bytes() -> int:
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    return own_peak if sys.platform == "darwin" else own_peak * 1024
