"""What a stage measures and gives back of its own process: its wall time, and the heap memory it freed."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def stopwatch() -> Iterator[list[float]]:
    """Yields a one-element list that holds the elapsed seconds once the block ends."""
    elapsed = [0.0]
    start = time.perf_counter()
    try:
        yield elapsed
    finally:
        elapsed[0] = time.perf_counter() - start


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> None:
    """`malloc_trim(0)` where the C library is glibc; nothing elsewhere.

    glibc keeps what large temporaries freed (a batch's activations, the coreset's routed rows) in
    its per-thread heaps, so a process's RSS stays at every earlier stage's high-water mark. Making
    glibc unmap large blocks at once (`MALLOC_MMAP_THRESHOLD_`) lowered the peak too but slowed
    extraction with page faults on every batch (benchmarks/README.md, "Figures behind settings in the code").
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
