"""Ingest of both sources, and every kind of bad input named in the foundation issue."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from patchline.models.config import ElpvSource, LineConfig, MvtecSource
from patchline.storage.image_files import BadImageError, decode_image
from patchline.storage.ingest import IngestError, build_manifest
from patchline.storage.pixels import read_mask, read_pixels
from patchline.storage.sources.mvtec import MvtecLayoutError
from tests.conftest import textured, write_image


def mvtec_line(root: Path, on_bad_input: str = "fail") -> LineConfig:
    return LineConfig(name="widget", source=MvtecSource(root=root), on_bad_input=on_bad_input)


def test_elpv_protocol_counts_match_the_published_split():
    manifest = build_manifest(LineConfig(name="elpv", source=ElpvSource()))
    assert manifest.counts() == {"test/ambiguous": 401, "test/anomaly": 715, "test/good": 377, "train/good": 1131}
    assert len({row.id for row in manifest.rows}) == len(manifest.rows)
    train_ids = {row.id for row in manifest.select(split="train")}
    assert not train_ids & {row.id for row in manifest.select(split="test")}


@pytest.mark.parametrize("cell_type, train, test_good, anomalies", [("mono", 441, 147, 313), ("poly", 690, 230, 402)])
def test_elpv_split_is_within_the_cell_type(cell_type, train, test_good, anomalies):
    manifest = build_manifest(LineConfig(name=f"elpv-{cell_type}", source=ElpvSource(cell_type=cell_type)))
    assert len(manifest.select("train", "good")) == train
    assert len(manifest.select("test", "good")) == test_good
    assert len(manifest.select("test", "anomaly")) == anomalies
    first = manifest.rows[0]
    assert read_pixels(first.source).shape == (300, 300, 1) and first.channels == 1


def test_elpv_limit_keeps_a_small_deterministic_subset():
    source = ElpvSource(cell_type="mono", limit_per_class=5)
    first = build_manifest(LineConfig(name="s", source=source))
    again = build_manifest(LineConfig(name="s", source=source))
    assert first.counts() == {"test/ambiguous": 5, "test/anomaly": 5, "test/good": 5, "train/good": 5}
    assert first.fingerprint() == again.fingerprint()


def test_mvtec_layout_gives_splits_labels_masks_and_both_colour_kinds(mvtec_root):
    manifest = build_manifest(mvtec_line(mvtec_root))
    assert manifest.counts() == {"test/anomaly": 2, "test/good": 2, "train/good": 4}
    scratch = manifest.select(label="anomaly")
    assert {row.defect_type for row in scratch} == {"scratch"} and all(row.channels == 3 for row in scratch)
    assert all(row.channels == 1 for row in manifest.select(split="train"))
    mask = read_mask(scratch[0])
    assert mask.shape == (32, 32) and mask.sum() == 40
    assert not read_mask(manifest.select("test", "good")[0]).any()


def test_fingerprint_changes_when_an_image_changes(mvtec_root):
    before = build_manifest(mvtec_line(mvtec_root)).fingerprint()
    write_image(mvtec_root / "train" / "good" / "000.png", textured(999))
    assert build_manifest(mvtec_line(mvtec_root)).fingerprint() != before


def _corrupt(root: Path) -> tuple[Path, str]:
    path = root / "test" / "good" / "garbage.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    return path, "corrupt"


def _truncated(root: Path) -> tuple[Path, str]:
    path = write_image(root / "train" / "good" / "cut.png", textured(50, size=64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "truncated"


def _zero_bytes(root: Path) -> tuple[Path, str]:
    path = root / "train" / "good" / "empty.png"
    path.write_bytes(b"")
    return path, "0 bytes"


def _not_an_image(root: Path) -> tuple[Path, str]:
    path = root / "test" / "scratch" / "notes.txt"
    path.write_text("operator notes, not an image")
    return path, "not an image"


def _mask_size(root: Path) -> tuple[Path, str]:
    path = write_image(root / "ground_truth" / "scratch" / "001_mask.png", np.zeros((16, 16), np.uint8))
    return path, "mask is 16x16 but its image"


def _orphan_mask(root: Path) -> tuple[Path, str]:
    path = write_image(root / "ground_truth" / "scratch" / "007_mask.png", np.zeros((32, 32), np.uint8))
    return path, "mask without an image"


def _duplicate(root: Path) -> tuple[Path, str]:
    path = write_image(root / "test" / "good" / "copy.png", textured(0))
    return path, "duplicate image: same pixels as"


BAD_INPUTS = [_corrupt, _truncated, _zero_bytes, _not_an_image, _mask_size, _orphan_mask, _duplicate]


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_stops_with_a_message_naming_the_file(mvtec_root, make_bad):
    path, reason = make_bad(mvtec_root)
    with pytest.raises(IngestError) as caught:
        build_manifest(mvtec_line(mvtec_root))
    message = str(caught.value)
    assert str(path) in message and reason in message and "on_bad_input: skip" in message


@pytest.mark.parametrize("make_bad", BAD_INPUTS, ids=lambda f: f.__name__.strip("_"))
def test_bad_input_is_skipped_and_recorded_when_the_line_allows(mvtec_root, make_bad):
    clean = build_manifest(mvtec_line(mvtec_root))
    path, reason = make_bad(mvtec_root)
    manifest = build_manifest(mvtec_line(mvtec_root, on_bad_input="skip"))
    assert [(item.path, reason in item.reason) for item in manifest.skipped] == [(str(path), True)]
    assert str(path) in manifest.summary()
    if make_bad is _mask_size:  # the image itself is fine; only its mask is bad, so the row goes
        assert len(manifest.rows) == len(clean.rows) - 1
    else:
        assert {row.id for row in manifest.rows} == {row.id for row in clean.rows}


def test_empty_train_folder_is_fatal_even_when_skipping(mvtec_root):
    for path in (mvtec_root / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(MvtecLayoutError, match="train/good: empty folder"):
        build_manifest(mvtec_line(mvtec_root, on_bad_input="skip"))


def test_train_folder_with_only_bad_files_is_fatal(mvtec_root):
    for path in (mvtec_root / "train" / "good").iterdir():
        path.write_bytes(b"")
    with pytest.raises(MvtecLayoutError, match="no usable good images"):
        build_manifest(mvtec_line(mvtec_root, on_bad_input="skip"))


def test_missing_layout_is_named(tmp_path):
    with pytest.raises(MvtecLayoutError, match="train/good: missing"):
        build_manifest(mvtec_line(tmp_path))


def test_sixteen_bit_images_decode_to_the_full_eight_bit_range(tmp_path):
    from PIL import Image

    wide = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    pixels = decode_image(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 64, 1)
    assert pixels.min() == 0 and pixels.max() == 255


def test_decode_error_carries_path_and_reason(tmp_path):
    with pytest.raises(BadImageError) as caught:
        decode_image(tmp_path / "nope.png")
    assert caught.value.path.endswith("nope.png") and caught.value.reason == "file not found"
