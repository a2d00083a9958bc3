"""The manifest: one row per ingested image, plus the report of every file that was skipped."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

import numpy as np

Split = Literal["train", "test"]
Label = Literal["good", "anomaly", "ambiguous"]

# Fit images for the detectors plus at least two held out for calibration (`hold_out_calibration`).
MIN_GOOD_TRAIN_IMAGES = 4


def content_hash(pixels: np.ndarray) -> str:
    """Identity of an image by its decoded pixels, so a re-encoded copy is still recognised."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ManifestRow:
    id: str
    source: str  # a file path, or "elpv:<index>" for the bundled set
    split: Split
    label: Label
    defect_type: str
    mask: str | None
    width: int
    height: int
    channels: int


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


@dataclass
class SourceScan:
    """What a source reader found: the usable rows, every bad entry (a problem) and every entry it ignored
    on purpose (hidden ones), each with why."""

    rows: list[ManifestRow]
    problems: list[SkippedFile]
    ignored: list[SkippedFile] = field(default_factory=list)
    # Symbolic links that leave the line's folder: used, and their rows name the target.
    linked: list[SkippedFile] = field(default_factory=list)


@dataclass
class Manifest:
    line: str
    rows: list[ManifestRow]
    skipped: list[SkippedFile] = field(default_factory=list)
    ignored: list[SkippedFile] = field(default_factory=list)
    # Good training images the champion called anomalous: not fitted or calibrated on (tasks/screening.py).
    quarantined: list[SkippedFile] = field(default_factory=list)
    # Symbolic links that leave the line's folder: used, and their rows name the target.
    linked: list[SkippedFile] = field(default_factory=list)

    def without(self, ids: set[str], reasons: dict[str, str]) -> Manifest:
        """The manifest with the rows of `ids` moved to `quarantined`, each with its reason by id."""
        moved = [SkippedFile(row.source, reasons[row.id]) for row in self.rows if row.id in ids]
        return Manifest(self.line, [row for row in self.rows if row.id not in ids], self.skipped, self.ignored,
                        self.quarantined + moved, self.linked)

    def select(self, split: Split | None = None, label: Label | None = None) -> list[ManifestRow]:
        """Rows of one split and/or label, in manifest order."""
        return [row for row in self.rows
                if (split is None or row.split == split) and (label is None or row.label == label)]

    def counts(self) -> dict[str, int]:
        """Row counts keyed "<split>/<label>", the numbers a run logs and the summary prints."""
        counter = Counter(f"{row.split}/{row.label}" for row in self.rows)
        return dict(sorted(counter.items()))

    def fingerprint(self) -> str:
        """Changes whenever any image, its split or its label changes; keys feature stores and runs."""
        digest = hashlib.blake2b(digest_size=16)
        for row in sorted(self.rows, key=lambda r: r.id):
            digest.update(f"{row.id}|{row.split}|{row.label}|{row.defect_type}\n".encode())
        return digest.hexdigest()

    def summary(self) -> str:
        """A short human-readable table of the manifest."""
        lines = [f"line {self.line}: {len(self.rows)} images, fingerprint {self.fingerprint()[:12]}"]
        lines += [f"  {key:<20} {count:>6}" for key, count in self.counts().items()]
        defects = Counter(row.defect_type for row in self.rows if row.label != "good")
        if defects:
            lines.append("  defect types: " + ", ".join(f"{name} {n}" for name, n in sorted(defects.items())))
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} bad files:")
            lines += [f"    {item.path}: {item.reason}" for item in self.skipped]
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} entries:")
            lines += [f"    {item.path}: {item.reason}" for item in self.ignored]
        if self.quarantined:
            lines.append(f"  quarantined {len(self.quarantined)} training images:")
            lines += [f"    {item.path}: {item.reason}" for item in self.quarantined]
        if self.linked:
            lines.append(f"  {len(self.linked)} links leave the line's folder (used; the manifest names the target):")
            lines += [f"    {item.path}: {item.reason}" for item in self.linked]
        return "\n".join(lines)

    def write_csv(self, path: Path) -> Path:
        """Write the rows as CSV, and every entry not used beside it as `<stem>.skipped.csv`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(ManifestRow)])
            writer.writeheader()
            writer.writerows(asdict(row) for row in self.rows)
        skipped_path = path.with_suffix(".skipped.csv")
        with skipped_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "reason", "kind"])
            writer.writeheader()
            writer.writerows({**asdict(item), "kind": "bad input"} for item in self.skipped)
            writer.writerows({**asdict(item), "kind": "ignored"} for item in self.ignored)
            writer.writerows({**asdict(item), "kind": "quarantined"} for item in self.quarantined)
            writer.writerows({**asdict(item), "kind": "linked"} for item in self.linked)
        return path


def hold_out_calibration(rows: list[ManifestRow], fraction: float, seed: int = 0) -> tuple[list[ManifestRow], list[ManifestRow]]:
    """Good training rows → (fit, calibration): about `fraction` of them (at least two) that no model sees.

    Scores of images a model was fitted on are biased low (PatchCore's bank holds their own patches),
    so thresholds and fusion statistics come from these held-out good images instead. A row is held out
    when a seeded hash of its id falls below `fraction`, so an image keeps its role as the line grows:
    an incremental rebuild can add new images to the champion's fit set without moving old ones.
    """
    if len(rows) < MIN_GOOD_TRAIN_IMAGES:
        raise ValueError(f"need at least {MIN_GOOD_TRAIN_IMAGES} good training images to hold some out for calibration, got {len(rows)}")
    draws = np.array([_uniform_draw(row.id, seed) for row in rows])
    held = draws < fraction
    # Few rows can leave fewer than two on either side; then the rank of the draw decides.
    if not 2 <= held.sum() <= len(rows) - 2:
        held = np.zeros(len(rows), bool)
        held[np.argsort(draws, kind="stable")[:min(len(rows) - 2, max(2, round(len(rows) * fraction)))]] = True
    return [row for row, h in zip(rows, held) if not h], [row for row, h in zip(rows, held) if h]


def _uniform_draw(row_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by the row id and the seed."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
