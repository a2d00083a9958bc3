"""Reading a product line kept in the MVTec AD folder layout.

    <root>/train/good/*.png
    <root>/test/<defect or good>/*.png
    <root>/ground_truth/<defect>/<name>_mask.png
"""

from __future__ import annotations

from pathlib import Path

from patchline.models.config import MvtecSource

from patchline.storage.image_files import IMAGE_SUFFIXES, BadImageError, decode_image
from patchline.storage.manifest import ManifestRow, SkippedFile, SourceScan, content_hash


class MvtecLayoutError(ValueError):
    """The folder is not usable as an MVTec-layout line at all (no bad file can be skipped past this)."""


def _image_files(folder: Path) -> list[Path]:
    # Dot-files (.DS_Store, editor swap files) are folder furniture, not candidate images.
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def scan(source: MvtecSource) -> SourceScan:
    return _scan(source.root)


def _scan(root: Path) -> SourceScan:
    """Decode every image and mask under `root` once; return good rows and every problem found."""
    train_dir = root / "train" / "good"
    if not root.is_dir():
        raise MvtecLayoutError(f"{root}: data folder not found")
    if not train_dir.is_dir():
        raise MvtecLayoutError(f"{train_dir}: missing; an MVTec-layout line needs train/good/ with good images")
    rows: list[ManifestRow] = []
    problems: list[SkippedFile] = []
    first_seen: dict[str, str] = {}

    def add(path: Path, split: str, defect: str, mask: Path | None) -> None:
        try:
            pixels = decode_image(path)
            if mask is not None:
                mask_pixels = decode_image(mask)
                if mask_pixels.shape[:2] != pixels.shape[:2]:
                    raise BadImageError(mask, f"mask is {mask_pixels.shape[1]}x{mask_pixels.shape[0]} but its image "
                                              f"{path} is {pixels.shape[1]}x{pixels.shape[0]}")
        except BadImageError as error:
            problems.append(SkippedFile(error.path, error.reason))
            return
        image_id = content_hash(pixels)
        if image_id in first_seen:
            problems.append(SkippedFile(str(path), f"duplicate image: same pixels as {first_seen[image_id]}"))
            return
        first_seen[image_id] = str(path)
        rows.append(ManifestRow(
            id=image_id, source=str(path), split=split, label="good" if defect == "good" else "anomaly",
            defect_type=defect, mask=str(mask) if mask else None,
            width=pixels.shape[1], height=pixels.shape[0], channels=pixels.shape[2]))

    for path in _image_files(train_dir):
        add(path, "train", "good", None)
    test_dir, truth_dir = root / "test", root / "ground_truth"
    defects = sorted(d.name for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []
    for defect in defects:
        images = _image_files(test_dir / defect)
        for path in images:
            mask = truth_dir / defect / f"{path.stem}_mask.png"
            add(path, "test", defect, mask if defect != "good" and mask.is_file() else None)
        stems = {path.stem for path in images}
        if (truth_dir / defect).is_dir():
            for mask in _image_files(truth_dir / defect):
                if mask.stem.removesuffix("_mask") not in stems:
                    problems.append(SkippedFile(str(mask), f"mask without an image: no test/{defect}/"
                                                           f"{mask.stem.removesuffix('_mask')}.* exists"))
    if truth_dir.is_dir():
        for folder in sorted(d for d in truth_dir.iterdir() if d.is_dir() and d.name not in defects):
            for mask in _image_files(folder):
                problems.append(SkippedFile(str(mask), f"mask without an image: no test/{folder.name}/ folder"))
    if not any(row.split == "train" for row in rows):
        reason = "no usable good images" if _image_files(train_dir) else "empty folder"
        raise MvtecLayoutError(f"{train_dir}: {reason}; training needs at least one good image")
    return SourceScan(rows, problems)
