"""Ingest of both sources, and every kind of bad input named in the foundation issue."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from patchline.models.config import ElpvSource, LineConfig, MvtecSource
from patchline.storage.image_files import MAX_PIXELS_ENV, BadImageError, decode_image, decode_image_bytes
from patchline.storage.ingest import IngestError, build_manifest
from patchline.storage.manifest import ManifestRow, hold_out_calibration
from patchline.storage.pixels import read_mask, read_pixels
from patchline.storage.sources.mvtec import MvtecLayoutError
from tests.conftest import png_claiming, textured, without_root_override, write_image


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


def _bomb(root: Path) -> tuple[Path, str]:
    path = root / "train" / "good" / "bomb.png"
    path.write_bytes(png_claiming(14_000, 14_000))
    return path, "image too large: 14000x14000 is 196,000,000 pixels"


def _dangling_link(root: Path) -> tuple[Path, str]:
    path = root / "train" / "good" / "gone.png"
    path.symlink_to(root / "nowhere.png")
    return path, "broken symbolic link"


def _link_loop(root: Path) -> tuple[Path, str]:
    path = root / "test" / "good" / "loop.png"
    path.symlink_to(path)
    return path, "symbolic link loop"


def _fifo(root: Path) -> tuple[Path, str]:
    path = root / "train" / "good" / "camera.png"
    os.mkfifo(path)
    return path, "not a regular file (a named pipe)"


def _folder_named_like_an_image(root: Path) -> tuple[Path, str]:
    path = root / "test" / "scratch" / "more.png"
    path.mkdir()
    return path, "a folder, not an image file"


def _file_directly_in_test(root: Path) -> tuple[Path, str]:
    path = write_image(root / "test" / "stray.png", textured(300))
    return path, "a file directly in test/"


def _black_mask(root: Path) -> tuple[Path, str]:
    path = write_image(root / "ground_truth" / "scratch" / "000_mask.png", np.zeros((32, 32), np.uint8))
    return path, "mask has no defect pixels"


BAD_INPUTS = [_corrupt, _truncated, _zero_bytes, _not_an_image, _mask_size, _orphan_mask, _duplicate, _bomb,
              _dangling_link, _link_loop, _fifo, _folder_named_like_an_image, _file_directly_in_test, _black_mask]
# A bad mask leaves its image out too, and both are listed.
MASK_PROBLEMS = {_mask_size: "001", _black_mask: "000"}


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
    listed = [(item.path, reason in item.reason) for item in manifest.skipped]
    assert str(path) in manifest.summary()
    if make_bad in MASK_PROBLEMS:
        image = mvtec_root / "test" / "scratch" / f"{MASK_PROBLEMS[make_bad]}.png"
        assert listed == [(str(path), True), (str(image), False)]
        assert "image left out: its mask" in manifest.skipped[1].reason
        assert {row.source for row in clean.rows} - {row.source for row in manifest.rows} == {str(image)}
    else:
        assert listed == [(str(path), True)]
        assert {row.id for row in manifest.rows} == {row.id for row in clean.rows}


def test_empty_train_folder_is_fatal_even_when_skipping(mvtec_root):
    for path in (mvtec_root / "train" / "good").iterdir():
        path.unlink()
    with pytest.raises(MvtecLayoutError, match="train/good: empty folder"):
        build_manifest(mvtec_line(mvtec_root, on_bad_input="skip"))


def test_train_folder_with_only_bad_files_is_fatal_and_names_them(mvtec_root):
    for path in (mvtec_root / "train" / "good").iterdir():
        path.unlink()
    (mvtec_root / "train" / "good" / "only.png").write_bytes(b"")
    with pytest.raises(MvtecLayoutError, match="no usable good images") as caught:
        build_manifest(mvtec_line(mvtec_root, on_bad_input="skip"))
    assert "only.png: empty file (0 bytes)" in str(caught.value)


def test_the_mask_of_an_image_left_out_is_listed_too(mvtec_root):
    image = mvtec_root / "test" / "scratch" / "001.png"
    image.write_bytes(b"")
    manifest = build_manifest(mvtec_line(mvtec_root, on_bad_input="skip"))
    assert [(item.path, item.reason) for item in manifest.skipped] == [(str(image), "empty file (0 bytes)")]
    assert [(item.path, item.reason) for item in manifest.ignored] == [
        (str(mvtec_root / "ground_truth" / "scratch" / "001_mask.png"), "mask of an image left out (test/scratch/001.*)")]


def test_hidden_entries_are_reported_as_ignored_not_as_bad_input(mvtec_root):
    (mvtec_root / "train" / "good" / ".DS_Store").write_bytes(b"finder")
    (mvtec_root / "test" / ".thumbs").mkdir()
    (mvtec_root / "readme.txt").write_text("category notes")
    write_image(mvtec_root / "train" / "scratch" / "000.png", textured(500))
    manifest = build_manifest(mvtec_line(mvtec_root))  # on_bad_input: fail, and still no error
    assert [(Path(item.path).name, item.reason.split(" (")[0]) for item in manifest.ignored] == [
        ("readme.txt", "not part of the MVTec layout"), ("scratch", "training uses train/good/ only"),
        (".DS_Store", "hidden entry"), (".thumbs", "hidden entry")]
    assert "ignored 4 entries" in manifest.summary() and not manifest.skipped


def test_links_that_leave_the_line_folder_are_used_and_reported_with_their_target(mvtec_root, tmp_path):
    """Issue 35: a link in train/good to a file elsewhere was followed silently and the manifest recorded
    the link; a link within the line's folder is an ordinary entry."""
    outside = write_image(tmp_path / "elsewhere" / "cell.png", textured(600))
    (mvtec_root / "train" / "good" / "linked.png").symlink_to(outside)
    (mvtec_root / "train" / "good" / "inside.png").symlink_to(mvtec_root / "test" / "good" / "000.png")
    manifest = build_manifest(mvtec_line(mvtec_root, on_bad_input="skip"))
    assert [(Path(item.path).name, item.reason.split(",")[0]) for item in manifest.linked] == [
        ("linked.png", f"symbolic link to {outside}")]
    assert str(outside) in {row.source for row in manifest.rows}
    assert not any(row.source.endswith("linked.png") for row in manifest.rows)
    assert "1 links leave the line's folder" in manifest.summary()
    written = manifest.write_csv(tmp_path / "manifest.csv").with_suffix(".skipped.csv").read_text()
    assert "linked.png" in written and ",linked" in written


@pytest.mark.parametrize("spoil, missing", [
    (lambda root: (root / "train" / "good" / "000.png").unlink(), "3 usable good training image(s); at least 4"),
    (lambda root: shutil.rmtree(root / "test" / "scratch"), "the test split has no defective parts"),
    (lambda root: shutil.rmtree(root / "test" / "good"), "the test split has no good parts"),
    # Under skip, black masks take their images out: no defective part is left to measure on.
    (lambda root: [write_image(path, np.zeros((32, 32), np.uint8))
                   for path in (root / "ground_truth" / "scratch").iterdir()], "the test split has no defective"),
], ids=["three-goods", "no-anomalies", "no-test-goods", "all-masks-black"])
def test_what_the_rebuild_needs_is_checked_at_ingest(mvtec_root, spoil, missing):
    spoil(mvtec_root)
    with pytest.raises(IngestError, match="nothing was trained") as caught:
        build_manifest(mvtec_line(mvtec_root, on_bad_input="skip"))
    assert missing in str(caught.value)


def test_a_pixel_metric_gate_needs_masks(mvtec_root):
    shutil.rmtree(mvtec_root / "ground_truth")
    config = LineConfig(name="widget", source=MvtecSource(root=mvtec_root), promotion={"metric": "pixel_auroc"})
    with pytest.raises(IngestError, match="pixel_auroc is a pixel metric, but no test image has a ground-truth mask"):
        build_manifest(config)
    assert build_manifest(mvtec_line(mvtec_root)).counts()["test/anomaly"] == 2


def test_unreadable_files_and_folders_say_permission_denied(mvtec_root):
    """Run without root's permission override (the tests may run as root), as a user would meet it."""
    write_image(mvtec_root / "train" / "good" / "004.png", textured(4))
    write_image(mvtec_root / "test" / "dent" / "000.png", textured(400))
    (mvtec_root / "train" / "good" / "003.png").chmod(0)
    (mvtec_root / "test" / "dent").chmod(0)
    script = ("import json, sys; from patchline.models.config import LineConfig, MvtecSource; "
              "from patchline.storage.ingest import build_manifest; "
              "m = build_manifest(LineConfig(name='w', source=MvtecSource(root=sys.argv[1]), on_bad_input='skip')); "
              "print(json.dumps([[i.path, i.reason] for i in m.skipped]))")
    try:
        result = subprocess.run([*without_root_override(), sys.executable, "-c", script, str(mvtec_root)],
                                capture_output=True, text=True, timeout=120)
    finally:
        (mvtec_root / "test" / "dent").chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == [
        [str(mvtec_root / "train" / "good" / "003.png"), "permission denied"],
        [str(mvtec_root / "test" / "dent"), "permission denied: the folder cannot be listed"]]
    (mvtec_root / "train" / "good").chmod(0)
    try:
        result = subprocess.run([*without_root_override(), sys.executable, "-c", script, str(mvtec_root)],
                                capture_output=True, text=True, timeout=120)
    finally:
        (mvtec_root / "train" / "good").chmod(0o755)
    assert result.returncode == 1 and "train/good: permission denied" in result.stderr


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


def test_the_pixel_limit_is_read_from_the_environment(tmp_path, monkeypatch):
    path = write_image(tmp_path / "a.png", textured(1, size=40))
    bomb = png_claiming(50_000, 50_000)
    with pytest.raises(BadImageError, match="image too large: 50000x50000"):
        decode_image_bytes(bomb, "upload")
    monkeypatch.setenv(MAX_PIXELS_ENV, "1_000")
    with pytest.raises(BadImageError, match=f"above the limit of 1,000 \\(set {MAX_PIXELS_ENV}"):
        decode_image(path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "2000")
    assert decode_image(path).shape == (40, 40, 1)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MAX_PIXELS_ENV}='lots': expected a positive whole number"):
        decode_image(path)


def test_the_calibration_hold_out_keeps_each_image_in_its_role_as_the_line_grows() -> None:
    """An incremental rebuild adds new images to the champion's fit set: no old image may change sides."""
    rows = [ManifestRow(id=f"image-{i}", source=f"{i}.png", split="train", label="good", defect_type="good",
                        mask=None, width=8, height=8, channels=1) for i in range(600)]
    fit, calibration = hold_out_calibration(rows[:500], 0.1)
    grown_fit, grown_calibration = hold_out_calibration(rows, 0.1)
    assert {r.id for r in fit} <= {r.id for r in grown_fit}
    assert {r.id for r in calibration} <= {r.id for r in grown_calibration}
    assert sorted(r.id for r in grown_fit + grown_calibration) == sorted(r.id for r in rows)
    assert 0.07 < len(grown_calibration) / len(rows) < 0.13
    assert hold_out_calibration(rows[:500], 0.1, seed=1)[1] != calibration, "the seed draws another hold-out"
    # Too few rows for the draw to leave two on each side: the lowest draws are held out.
    few_fit, few_calibration = hold_out_calibration(rows[:5], 0.1)
    assert len(few_calibration) == 2 and len(few_fit) == 3
    with pytest.raises(ValueError, match="at least 4 good training images"):
        hold_out_calibration(rows[:3], 0.1)
