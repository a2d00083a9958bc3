"""Each scored image's patch distances to one memory bank, kept per bank in a line's feature folder.

A bank grown from the champion's (tasks/incremental.py) begins with the champion's rows unchanged, so an
image's distance to its nearest row of the grown bank is the smaller of its cached distance to the
champion's bank and its distance to the added rows: scoring measures the added rows only.

Layout: `<root>/<line>/nearest/<bank digest>-<search>.safetensors` (exact and indexed distances apart),
a tensor `distances` (images, patches) and the
image ids and a SHA-256 of both in its metadata. Files are written whole and renamed into place, so a
killed writer leaves none half written; the most recent `KEEP` per line are kept. A file whose digest does
not match (damaged on disk, or written before digests) is not used: its distances are measured again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

KEEP = 4
log = logging.getLogger(__name__)


def bank_digest(features: np.ndarray) -> str:
    """Identity of a bank by its rows' values and shape."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(features.shape).encode())
    digest.update(np.ascontiguousarray(features, dtype=np.float32).tobytes())
    return digest.hexdigest()


def bank_key(features: np.ndarray, search: str) -> str:
    """The file name of the distances to a bank by one search: indexed distances are partly upper bounds,
    so they are kept apart from exact ones."""
    return f"{bank_digest(features)}-{search}"


class NearestCache:
    """Patch distances of scored images, by bank digest, in one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def load(self, digest: str) -> dict[str, np.ndarray]:
        """Image id → its patch distances to the bank `digest` (a file name, `bank_key`); empty when none
        are kept (or unreadable)."""
        path = self.folder / f"{digest}.safetensors"
        try:
            with safe_open(str(path), framework="np") as file:
                metadata = file.metadata() or {}
                ids, recorded = json.loads(metadata["ids"]), metadata.get("sha256")
                distances = file.get_tensor("distances")
        except (OSError, SafetensorError, KeyError, ValueError):
            return {}
        if recorded != _content_digest(metadata["ids"], distances) or len(ids) != len(distances):
            log.warning("%s: damaged or written before it carried a digest; its distances are measured again", path)
            return {}
        return dict(zip(ids, distances))

    def save(self, digest: str, distances: dict[str, np.ndarray]) -> None:
        """Add `distances` (image id → patch distances) to what is kept for the bank `digest`."""
        merged = {**self.load(digest), **distances}
        if not merged:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        ids = list(merged)
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".writing-", suffix=".safetensors")
        os.close(handle)
        try:
            distances = np.stack([merged[i] for i in ids]).astype(np.float32)
            listed = json.dumps(ids)
            save_file({"distances": distances}, temporary,
                      metadata={"ids": listed, "sha256": _content_digest(listed, distances)})
            os.replace(temporary, self.folder / f"{digest}.safetensors")
        finally:
            Path(temporary).unlink(missing_ok=True)
        # One rebuild of a line at a time (its lock), so another writer's temporary file is a killed one's.
        files = [p for p in self.folder.glob("*.safetensors") if not p.name.startswith(".")]
        debris = [p for p in self.folder.glob(".writing-*")]
        for old in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)[KEEP:] + debris:
            old.unlink(missing_ok=True)


def _content_digest(ids: str, distances: np.ndarray) -> str:
    digest = hashlib.sha256(ids.encode())
    digest.update(np.ascontiguousarray(distances, dtype=np.float32).tobytes())
    return digest.hexdigest()
