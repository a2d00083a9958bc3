"""The OE-SDN benchmark's data (digits, textures, painted defects) and its command line, on tiny settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks.oesdn_protocols import (DEFECT_KINDS, digits_protocols, object_image, object_protocol, paint_defect,
                                        texture_image, texture_protocol)

REPO = Path(__file__).resolve().parent.parent
# One seed, one epoch, narrow networks: the command line end to end in seconds.
TINY = ("--seeds", "0", "--threads", "1", "--set", "epochs=1", "--set", "sdn_epochs=1", "--set", "ae_base_width=4",
        "--set", "sdn_base_width=8")
# The metrics of the summary line of a protocol whose test images have masks, each a 4-decimal figure.
MASKED_METRICS = " ".join(f"{field}=[01]\\.\\d{{4}}" for field in (
    "auroc_ae", "auroc_sdn", "auroc_oesdn", "pixel_auroc_ae", "pixel_auroc_sdn", "pixel_auroc_oesdn", "aupro_ae",
    "aupro_oesdn"))


def test_digits_protocol_has_one_normal_class_and_disjoint_splits() -> None:
    protocols = digits_protocols()
    assert [p.name for p in protocols] == [f"digit-{d}" for d in range(10)]
    three = protocols[3]
    assert 90 <= len(three.train) <= 120 and all(image.shape == (8, 8) for image in three.train)
    # 60/20/20 of the 1,797 digits: each class trains on its own share of the training split and is
    # validated and tested on every image of the other two; about a tenth of those are its own class.
    assert sum(len(p.train) for p in protocols) + len(three.val.images) + len(three.test.images) == 1797
    assert {len(p.test.images) for p in protocols} == {360} and {len(p.val.images) for p in protocols} == {359}
    assert 0.85 < three.test.labels.mean() < 0.95
    assert all(0 < p.test.labels.sum() < len(p.test.labels) for p in protocols)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_a_painted_defect_changes_exactly_its_mask(kind: str) -> None:
    rng = np.random.default_rng(5)
    image = texture_image("brick")[:64, :64].copy()
    donor = texture_image("gravel")
    defective, mask = paint_defect(image, kind, rng, donor)
    assert defective.dtype == np.uint8 and mask.dtype == bool and 20 <= mask.sum() <= 0.25 * mask.size
    assert np.array_equal(defective[~mask], image[~mask])
    # Inside the mask the defect stands apart from the texture it covers.
    assert np.abs(defective[mask].astype(int) - image[mask].astype(int)).mean() > 30


def test_texture_protocol_keeps_train_and_test_rows_apart() -> None:
    protocol = texture_protocol("grass", train_crops=12, eval_crops=10)
    assert len(protocol.train) == 12 and all(crop.shape == (64, 64) for crop in protocol.train)
    assert protocol.test.labels.tolist() == [0, 1] * 5
    assert [bool(mask.any()) for mask in protocol.test.masks] == [bool(label) for label in protocol.test.labels]
    photo = texture_image("grass")
    # Every training crop lies in the top 320 rows, every test crop in the bottom 96.
    for crop in protocol.train[:3]:
        assert _rows_of(crop, photo).start + 64 <= 320
    good_test = protocol.test.images[0]
    assert _rows_of(good_test, photo).start >= 416
    with pytest.raises(ValueError, match="unknown texture"):
        texture_image("marble")


def test_digits_scale_up_to_a_users_image_size() -> None:
    small, large = digits_protocols()[3], digits_protocols(image_size=64)[3]
    assert all(image.shape == (64, 64) and image.dtype == np.uint8 for image in large.train)
    assert len(large.train) == len(small.train) and np.array_equal(large.test.labels, small.test.labels)
    # The same digit, larger: its 8 × 8 block means follow the original's pixels (bilinear blurs the blocks' edges).
    pooled = large.train[0].reshape(8, 8, 8, 8).mean(axis=(1, 3))
    assert np.corrcoef(pooled.ravel(), small.train[0].ravel())[0, 1] > 0.95


def test_object_protocol_shoots_one_colour_object_with_painted_defects() -> None:
    protocol = object_protocol("coffee", train_shots=6, eval_shots=6)
    assert all(shot.shape == (128, 128, 3) for shot in [*protocol.train, *protocol.test.images])
    # No two shots alike: each has its own framing, exposure and noise.
    assert len({shot.tobytes() for shot in protocol.train}) == 6
    assert protocol.test.labels.tolist() == [0, 1] * 3 and protocol.test.masks.shape == (6, 128, 128)
    assert [bool(mask.any()) for mask in protocol.test.masks] == [bool(label) for label in protocol.test.labels]
    image, donor = protocol.train[0], object_image("rocket")
    for kind in DEFECT_KINDS:
        defective, mask = paint_defect(image, kind, np.random.default_rng(1), donor)
        assert defective.shape == image.shape and np.array_equal(defective[~mask], image[~mask]), kind
        assert np.abs(defective[mask].astype(int) - image[mask].astype(int)).mean() > 20, kind
    with pytest.raises(ValueError, match="unknown object"):
        object_image("teapot")


def _rows_of(crop: np.ndarray, photo: np.ndarray) -> range:
    for top in range(photo.shape[0] - 63):
        for left in range(photo.shape[1] - 63):
            if photo[top, left] == crop[0, 0] and np.array_equal(photo[top:top + 64, left:left + 64], crop):
                return range(top, top + 64)
    raise AssertionError("crop not found in the photograph")


def _run(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "benchmarks/oesdn.py", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_benchmark_runs_as_a_script_and_ends_with_its_summary_line() -> None:
    assert "--protocol" in _run("--help")
    out = _run("--protocol", "texture", "--cases", "brick", "--self-check", *TINY)
    case, _, last = out.strip().splitlines()
    assert re.fullmatch(r"oesdn protocol=texture " + MASKED_METRICS + r" train_s=\d+", last)
    # The per-case line carries the line's self-check on the validation goods, and whom it leaves out.
    checked = re.search(r"train_s=\d+ selfcheck_ae=([01]\.\d{4}) selfcheck_oesdn=([01]\.\d{4}) left_out=(\S+)$", case)
    assert case.startswith("oesdn protocol=texture case=brick seed=0 split=test ") and checked
    ae, oesdn = float(checked[1]), float(checked[2])
    below = [name for name, auroc in (("ae", ae), ("oesdn", oesdn))
             if auroc < 0.6 or (name == "oesdn" and ae - auroc > 0.02)]
    assert checked[3] == (",".join(below) or "none")  # a line of the default detectors keeps PatchCore


def test_benchmark_at_init_line_settings_marks_its_lines() -> None:
    out = _run("--protocol", "digits", "--image-size", "64", "--defaults", "--cases", "3", *TINY)
    lines = out.strip().splitlines()
    assert len(lines) == 3 and all(line.endswith(" defaults=init-line") for line in lines)
    assert re.fullmatch(r"oesdn protocol=digits image_size=64 auroc_ae=[01]\.\d{4} auroc_ae_ssim=[01]\.\d{4} "
                        r"auroc_sdn=[01]\.\d{4} auroc_oesdn=[01]\.\d{4} train_s=\d+ defaults=init-line", lines[-1])


def test_object_protocol_at_init_line_settings_reports_maps_too() -> None:
    out = _run("--protocol", "objects", "--defaults", "--cases", "coffee", *TINY)
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("oesdn protocol=objects case=coffee seed=0 split=test ")
    assert re.fullmatch(r"oesdn protocol=objects " + MASKED_METRICS + r" train_s=\d+ defaults=init-line", lines[-1])


def test_a_line_self_check_holds_out_the_goods_a_rebuild_would() -> None:
    """--line with --self-check trains without the line's calibration goods and judges on them."""
    from benchmarks.oesdn import elpv_protocol

    whole, _ = elpv_protocol("elpv-mono")
    held, _ = elpv_protocol("elpv-mono", hold_out=True)
    assert len(held.train) + len(held.val.images) == len(whole.train)
    assert 0 < len(held.val.images) < len(whole.train) / 5
    assert not held.val.labels.any() and len(held.test.images) == len(whole.test.images)
    out = _run("--line", "elpv-mono", "--self-check", *TINY, "--set", "image_size=32")
    assert re.search(r"^oesdn line=elpv-mono case=elpv-mono seed=0 split=test .* train_s=\d+ selfcheck_ae=[01]\.\d{4} "
                     r"selfcheck_oesdn=[01]\.\d{4} left_out=\S+$", out, re.M)


def test_survey_trains_the_networks_at_the_detail_of_scaled_up_digits_only() -> None:
    """--survey prints what init-line reads and writes per case: the digits, scaled up from 8 px, lose little
    contrast at 16 px and train there with σ 1; the texture crops lose far more and keep 64 px and σ 4."""
    lines = [*_run("--protocol", "digits", "--image-size", "64", "--cases", "1", "8", "--survey").splitlines(),
             *_run("--protocol", "texture", "--survey").splitlines()]
    number = r"0\.\d{4}"
    for line, case, size, sigma in zip(lines, ("digit-1", "digit-8", "brick", "grass", "gravel"),
                                       (16, 16, 64, 64, 64), (1, 1, 4, 4, 4), strict=True):
        protocol = "digits image_size=64" if case.startswith("digit") else "texture"
        assert re.fullmatch(f"survey protocol={protocol} case={case} contrast_lost_16={number} "
                            f"contrast_lost_32={number} oesdn_image_size={size} smoothing_sigma={sigma}", line), line
        lost_16 = float(line.split("contrast_lost_16=")[1].split()[0])
        assert (lost_16 <= 0.03) == (size == 16)
