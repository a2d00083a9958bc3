"""Reading a product line kept in the MVTec AD folder layout.

    <root>/train/good/*.png
    <root>/test/<defect or good>/*.png
    <root>/ground_truth/<defect>/<name>_mask.png

Every entry of these folders is either used or reported with the reason: bad files (unreadable,
not an image, links that lead nowhere, entries that are not files) as problems, which a line with
`on_bad_input: fail` stops on; hidden entries (names starting with ".") and entries outside the
layout (files at the root, `train/<anything but good>/`) as ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

from patchline.models.config import MvtecSource

from patchline.storage.image_files import BadImageError, decode_image, decode_mask, entry_problem, folder_entries
from patchline.storage.manifest import ManifestRow, SkippedFile, SourceScan, content_hash


class MvtecLayoutError(ValueError):
    """The folder is not usable as an MVTec-layout line at all (no bad file can be skipped past this)."""


def scan(source: MvtecSource) -> SourceScan:
    return _Scan(source.root).run()


class _Scan:
    """Decode every image and mask under `root` once, collecting the good rows and every unused entry."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.result = SourceScan([], [], [])
        self.first_seen: dict[str, str] = {}
        self.test_stems: dict[str, set[str]] = {}
        # Masks used with their image, or reported as a problem with it.
        self.masks_seen: set[Path] = set()

    def problem(self, path: Path | str, reason: str) -> None:
        self.result.problems.append(SkippedFile(str(path), reason))

    def run(self) -> SourceScan:
        train_dir = self.root / "train" / "good"
        if not self.root.is_dir():
            raise MvtecLayoutError(f"{self.root}: data folder not found")
        if not train_dir.is_dir():
            raise MvtecLayoutError(f"{train_dir}: missing; an MVTec-layout line needs train/good/ with good images")
        try:
            os.listdir(train_dir)
        except PermissionError:
            raise MvtecLayoutError(f"{train_dir}: permission denied; the good training images cannot be listed") from None
        self.report_unused(self.root, {"train", "test", "ground_truth"},
                           "not part of the MVTec layout (train/good/, test/, ground_truth/)")
        self.report_unused(self.root / "train", {"good"}, "training uses train/good/ only (images of good parts)")
        # Images go straight to `add`: decoding reports a bad entry with the same reason `files` would.
        train_entries = self.entries(train_dir)
        for path in train_entries:
            self.add(path, "train", "good", None)
        defects = self.defect_folders()
        for defect in defects:
            self.add_test_folder(defect)
        self.report_stray_masks(defects)
        if not any(row.split == "train" for row in self.result.rows):
            if not train_entries:
                raise MvtecLayoutError(f"{train_dir}: empty folder; training needs good images")
            listed = "\n".join(f"  {p.path}: {p.reason}" for p in self.result.problems
                               if Path(p.path).parent == train_dir)
            raise MvtecLayoutError(f"{train_dir}: no usable good images; every entry is bad:\n{listed}")
        return self.result

    def entries(self, folder: Path) -> list[Path]:
        """The visible entries of `folder`, sorted; hidden ones are reported as ignored."""
        try:
            names = folder_entries(folder)
        except BadImageError as error:
            self.problem(error.path, error.reason)
            return []
        visible = []
        for name in names:
            if name.startswith("."):
                self.result.ignored.append(SkippedFile(str(folder / name), "hidden entry (name starts with '.')"))
            else:
                visible.append(folder / name)
        return visible

    def report_unused(self, folder: Path, used: set[str], reason: str) -> None:
        for path in self.entries(folder):
            if path.name not in used:
                self.result.ignored.append(SkippedFile(str(path), reason))

    def files(self, entries: list[Path]) -> list[Path]:
        """The regular files among a folder's entries (masks, which are decoded only with their image);
        every other entry is a problem."""
        usable = []
        for path in entries:
            problem = entry_problem(path)
            if problem is None:
                usable.append(path)
            else:
                self.problem(path, problem)
        return usable

    def subfolders(self, folder: Path, what: str) -> list[str]:
        """Names of the folders in `folder`; a file there is a problem (it belongs in one of them)."""
        names = []
        for path in self.entries(folder):
            if path.is_dir():
                names.append(path.name)
            else:
                self.problem(path, entry_problem(path) or f"a file directly in {folder.name}/; {what}")
        return names

    def defect_folders(self) -> list[str]:
        test_dir = self.root / "test"
        if not test_dir.is_dir():
            return []
        return self.subfolders(test_dir, "test images go in test/good/ or test/<defect>/")

    def add_test_folder(self, defect: str) -> None:
        truth = self.root / "ground_truth" / defect
        entries = self.entries(self.root / "test" / defect)
        self.test_stems[defect] = {path.stem for path in entries}
        for path in entries:
            mask = truth / f"{path.stem}_mask.png"
            self.add(path, "test", defect, mask if defect != "good" and mask.is_file() else None)

    def add(self, path: Path, split: str, defect: str, mask: Path | None) -> None:
        try:
            pixels = decode_image(path)
        except BadImageError as error:
            self.problem(error.path, error.reason)
            return
        if mask is not None:
            self.masks_seen.add(mask)
        if mask is not None:
            try:
                marked = decode_mask(mask)
                if marked.shape != pixels.shape[:2]:
                    raise BadImageError(mask, f"mask is {marked.shape[1]}x{marked.shape[0]} but its image "
                                              f"{path} is {pixels.shape[1]}x{pixels.shape[0]}")
                if not marked.any():
                    raise BadImageError(mask, "mask has no defect pixels (all black); a defect image's mask "
                                              "must mark where the defect is")
            except BadImageError as error:
                self.problem(error.path, error.reason)
                self.problem(path, f"image left out: its mask {mask.name} is unusable")
                return
        image_id = content_hash(pixels)
        if image_id in self.first_seen:
            self.problem(path, f"duplicate image: same pixels as {self.first_seen[image_id]}")
            self.masks_seen.discard(mask)
            return
        self.first_seen[image_id] = str(path)
        source = path
        if path.is_symlink() and not path.resolve().is_relative_to(self.root.resolve()):
            source = path.resolve()
            self.result.linked.append(SkippedFile(str(path), f"symbolic link to {source}, outside the line's folder "
                                                             f"{self.root}: used, and the manifest names the target"))
        self.result.rows.append(ManifestRow(
            id=image_id, source=str(source), split=split, label="good" if defect == "good" else "anomaly",
            defect_type=defect, mask=str(mask) if mask else None,
            width=pixels.shape[1], height=pixels.shape[0], channels=pixels.shape[2]))

    def report_stray_masks(self, defects: list[str]) -> None:
        """Masks under ground_truth/ that belong to no test image."""
        truth_dir = self.root / "ground_truth"
        if not truth_dir.is_dir():
            return
        for folder in self.subfolders(truth_dir, "masks go in ground_truth/<defect>/"):
            if folder not in defects:
                for mask in self.files(self.entries(truth_dir / folder)):
                    self.problem(mask, f"mask without an image: no test/{folder}/ folder")
                continue
            for mask in self.files(self.entries(truth_dir / folder)):
                stem = mask.stem.removesuffix("_mask")
                if mask in self.masks_seen:
                    continue
                if mask.suffix.lower() != ".png" or not mask.stem.endswith("_mask"):
                    self.problem(mask, "not a mask name: masks are named <image name>_mask.png")
                elif stem not in self.test_stems[folder]:
                    self.problem(mask, f"mask without an image: no test/{folder}/{stem}.* exists")
                else:
                    self.result.ignored.append(SkippedFile(str(mask), f"mask of an image left out "
                                                                      f"(test/{folder}/{stem}.*)"))
