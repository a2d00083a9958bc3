"""Exclusive locks between processes on one machine: a rebuild per line, a writer per feature store.

`fcntl.flock` locks belong to the open file: the kernel drops them when the holder exits, however it
exits, so a killed run never leaves a lock that blocks the next one. The file keeps the holder's
description, so a second rebuild can name the running one, and a later holder can say in the log that
it took over from one that is gone.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)


class LockBusyError(RuntimeError):
    """The lock is held by another live process and the caller chose not to wait."""


def _holder(handle) -> dict:
    handle.seek(0)
    try:
        return json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} ({holder.get('what')})"


@contextmanager
def exclusive_lock(path: Path, what: str, wait: bool = True, details: dict | None = None) -> Iterator[dict]:
    """Hold the lock at `path` inside the block, recording `details` with the holder. Busy: wait for it, or
    `LockBusyError` naming the holder. Yields the description a holder that died left behind ({} if none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_holder(handle))
            if not wait:
                raise LockBusyError(f"{what}: already running, {holder}; wait for it or stop it "
                                    f"(lock file {path})") from None
            log.info("%s: waiting for %s", what, holder)
            started = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("%s: lock free after %.0f s", what, time.monotonic() - started)
        previous = _holder(handle)
        if previous:
            # Holders clear the file when they let go; a description left behind is a holder that died.
            log.warning("%s: taking over the lock of %s, which is gone", what, _describe(previous))
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                 "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 **(details or {})}))
        handle.flush()
        try:
            yield previous
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)
