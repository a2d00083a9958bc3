"""Line configs by name or by file, and the CLI commands of the foundation."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from patchline.cli import app
from patchline.models.config import ScheduleConfig
from patchline.storage.line_config import LineConfigError, bundled_line_files, load_line, save_line
from tests.conftest import png_claiming, without_root_override, write_image

PATCHLINE = str(Path(sys.executable).with_name("patchline"))

runner = CliRunner()


def test_bundled_lines_load_by_name_and_by_path():
    assert set(bundled_line_files()) >= {"elpv", "elpv-mono", "elpv-poly"}
    by_name = load_line("elpv-mono")
    assert by_name.source.cell_type == "mono" and by_name.schedule.cron
    assert load_line(bundled_line_files()["elpv-mono"]) == by_name


def test_config_round_trips_through_yaml(tmp_path):
    config = load_line("elpv-poly")
    assert load_line(save_line(config, tmp_path / "copy.yaml")) == config


@pytest.mark.parametrize("text, message", [
    ("name: x\nsource: {kind: elpv}\nimage_size: 250\n", "multiple of 32"),
    ("name: x\nsource: {kind: elpv}\ncoreset_ratio: 0.1\n", "Extra inputs are not permitted"),
    ("name: Bad Name\nsource: {kind: elpv}\n", "should match pattern"),
    ("name: x\nsource: {kind: s3}\n", "does not match any of the expected tags"),
    ("[unclosed", "not valid YAML"),
    ("- a list\n", "expected a mapping"),
    ("name: x\nsource: {kind: elpv}\noesdn: {augmentations: [hflip, vflip]}\n", "compose to a turn by 180°"),
    ("name: x\nsource: {kind: elpv}\noesdn: {image_size: 16, smoothing_sigma: 6}\n", "too wide for image_size 16"),
    ("name: x\nsource: {kind: elpv}\nschedule: {cron: '0 0 2 * * *'}\n", "has 6 fields; a line's schedule takes exactly 5"),
    ("name: " + "a" * 300 + "\nsource: {kind: elpv}\n", "String should have at most 64 characters"),
])
def test_invalid_config_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "line.yaml"
    path.write_text(text)
    with pytest.raises(LineConfigError) as caught:
        load_line(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_unknown_line_lists_the_known_ones():
    with pytest.raises(LineConfigError, match="unknown product line 'nope'.*elpv-mono"):
        load_line("nope")


def test_relative_data_root_is_read_from_the_config_folder(tmp_path, mvtec_root):
    path = tmp_path / "widget.yaml"
    path.write_text(yaml.safe_dump({"name": "widget", "source": {"kind": "mvtec", "root": mvtec_root.name}}))
    assert load_line(path).source.root == mvtec_root.resolve()


def test_cli_lines_lists_every_bundled_line():
    result = runner.invoke(app, ["lines"])
    assert result.exit_code == 0
    for name in ("elpv ", "elpv-mono", "elpv-poly"):
        assert name in result.output


def test_cli_init_line_then_ingest_a_users_own_folder(tmp_path, mvtec_root):
    config_path = tmp_path / "widget.yaml"
    result = runner.invoke(app, ["init-line", "widget", "--mvtec-root", str(mvtec_root), "--out", str(config_path)])
    assert result.exit_code == 0, result.output
    assert load_line(config_path).source.root == mvtec_root.resolve()
    result = runner.invoke(app, ["ingest", str(config_path), "--out", str(tmp_path / "manifests")])
    assert result.exit_code == 0, result.output
    assert "train/good" in result.output and "4" in result.output
    rows = (tmp_path / "manifests" / "widget.csv").read_text().splitlines()
    assert rows[0].startswith("id,source,split,label") and len(rows) == 1 + 8


def test_cli_ingest_reports_bad_input_and_exits_non_zero(tmp_path, mvtec_root):
    (mvtec_root / "train" / "good" / "broken.png").write_bytes(b"")
    (mvtec_root / "test" / "good" / "bomb.png").write_bytes(png_claiming(14_000, 14_000))
    config_path = tmp_path / "widget.yaml"
    runner.invoke(app, ["init-line", "widget", "--mvtec-root", str(mvtec_root), "--out", str(config_path)])
    result = runner.invoke(app, ["ingest", str(config_path)])
    assert result.exit_code == 2 and not isinstance(result.exception, (ValueError, OSError))
    assert "broken.png: empty file (0 bytes)" in result.output and "bomb.png: image too large" in result.output
    config_path.write_text(config_path.read_text().replace("on_bad_input: fail", "on_bad_input: skip"))
    result = runner.invoke(app, ["ingest", str(config_path)])
    assert result.exit_code == 0 and "skipped 2 bad files" in result.output
    result = runner.invoke(app, ["ingest", str(config_path)], env={"PATCHLINE_MAX_IMAGE_PIXELS": "0"})
    assert result.exit_code == 2 and "PATCHLINE_MAX_IMAGE_PIXELS='0': expected a positive" in result.output


def test_cli_deploy_to_a_work_pool_asks_for_the_prefect_server_it_lives_in(tmp_path):
    result = runner.invoke(app, ["deploy", "elpv-mono", "--pool", "nightly"],
                           env={"PATCHLINE_HOME": str(tmp_path), "PREFECT_API_URL": ""})
    assert result.exit_code == 2
    assert "--pool nightly: a work pool lives in a Prefect server; set PREFECT_API_URL" in result.output


def test_cli_init_line_keeps_an_existing_config_unless_forced(tmp_path, mvtec_root):
    config_path = tmp_path / "widget.yaml"
    command = ["init-line", "widget", "--mvtec-root", str(mvtec_root), "--out", str(config_path)]
    assert runner.invoke(app, command).exit_code == 0
    edited = config_path.read_text().replace("on_bad_input: fail", "on_bad_input: skip")
    config_path.write_text(edited)
    result = runner.invoke(app, command)
    assert result.exit_code == 2 and "widget.yaml exists" in result.output and "--force" in result.output
    assert config_path.read_text() == edited
    assert runner.invoke(app, [*command, "--force"]).exit_code == 0
    assert load_line(config_path).on_bad_input == "fail"


def test_cli_lines_shows_a_line_defined_by_a_config_file(tmp_path, mvtec_root):
    config_path = tmp_path / "widget.yaml"
    runner.invoke(app, ["init-line", "widget", "--mvtec-root", str(mvtec_root), "--out", str(config_path)])
    result = runner.invoke(app, ["lines", str(config_path), "elpv-mono"])
    assert result.exit_code == 0, result.output
    shown = [line.split()[0] for line in result.output.splitlines() if not line.startswith(" ")]
    assert shown == ["widget", "elpv-mono"] and "champion: none yet" in result.output


@pytest.mark.parametrize("spoil", ["read-only home", "read-only folder in it", "home cannot be created"])
def test_an_unwritable_home_fails_at_start_with_one_line_naming_it(tmp_path, mvtec_root, spoil):
    home = tmp_path / "home"
    (home / "mlflow").mkdir(parents=True)
    blocked = {"read-only home": home, "read-only folder in it": home / "mlflow", "home cannot be created": tmp_path}[spoil]
    if spoil == "home cannot be created":
        home = tmp_path / "locked" / "home"
        blocked = tmp_path / "locked"
        blocked.mkdir()
    blocked.chmod(0o555)
    config_path = tmp_path / "widget.yaml"
    runner.invoke(app, ["init-line", "widget", "--mvtec-root", str(mvtec_root), "--out", str(config_path)])
    env = {**os.environ, "PATCHLINE_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        commands = [["lines"], ["rebuild", str(config_path)], ["score", str(config_path), str(mvtec_root)]]
        for command in commands if spoil == "read-only home" else commands[1:2]:
            result = subprocess.run([*without_root_override(), PATCHLINE, *command], env=env, capture_output=True,
                                    text=True, timeout=120)
            assert result.returncode == 2, result.stderr
            assert result.stderr.splitlines() == [
                f"error: PATCHLINE_HOME: cannot write to {blocked if spoil != 'home cannot be created' else home} "
                "(Permission denied); make it writable or set PATCHLINE_HOME to a folder you can write"], command
    finally:
        blocked.chmod(0o755)


def test_cli_init_line_rejects_a_folder_without_the_layout(tmp_path):
    result = runner.invoke(app, ["init-line", "widget", "--mvtec-root", str(tmp_path)])
    assert result.exit_code == 2 and "train/good" in result.output


def test_every_command_has_help():
    for command in ("lines", "ingest", "init-line"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output



def test_an_unwritable_out_folder_is_named_before_any_work(tmp_path, mvtec_root):
    config_path = tmp_path / "widget.yaml"
    runner.invoke(app, ["init-line", "widget", "--mvtec-root", str(mvtec_root), "--out", str(config_path)])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    env = {**os.environ, "PATCHLINE_HOME": str(tmp_path / "home")}
    try:
        for command, folder in ((["init-line", "w", "--mvtec-root", str(mvtec_root), "--out", str(locked / "w.yaml")],
                                 locked),
                                (["score", str(config_path), str(mvtec_root), "--out", str(locked / "scores")],
                                 locked / "scores")):
            result = subprocess.run([*without_root_override(), PATCHLINE, *command], env=env, capture_output=True,
                                    text=True, timeout=120)
            assert result.returncode == 2 and result.stderr.splitlines() == [
                f"error: --out: cannot write to {folder} (Permission denied); choose a folder you can write"], result.stderr
    finally:
        locked.chmod(0o755)


def test_a_billion_laughs_config_is_refused_at_once_naming_the_line(tmp_path):
    """Nine levels of ten aliases each: 10^9 strings once expanded."""
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("name: x\nsource: {kind: elpv}\n" + "\n".join(levels) + "\n")
    started = time.perf_counter()
    with pytest.raises(LineConfigError, match=r"bomb.yaml: line 4: YAML aliases \(\*a0\) are not accepted"):
        load_line(path)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("cron, zone", [("0 2 * * *", "UTC"), ("30 3 * * 1-5", "Europe/Berlin"),
                                        ("0 */6 * * *", "America/New_York"), ("15 1 1 * *", "Asia/Tokyo"),
                                        ("0 2 1 * 1", "UTC"), ("45 23 * * 0", "Australia/Sydney")])
def test_the_schedule_the_config_accepts_is_the_one_prefect_runs(cron, zone):
    """The next fire times of an accepted schedule, as patchline reads it (cronsim, `patchline status`) and as
    Prefect's scheduler does, across both 2026 DST changes of Europe and America. They differ only for
    local times that a DST change skips (02:30 on a spring-forward night: Prefect 01:30, cronsim 03:00),
    which this table leaves out."""
    import asyncio
    from datetime import datetime, timezone
    from zoneinfo import ZoneInfo

    from cronsim import CronSim
    from prefect.server.schemas.schedules import CronSchedule

    config = ScheduleConfig(cron=cron, timezone=zone)
    start = datetime(2026, 3, 1, tzinfo=timezone.utc)
    prefect = asyncio.run(CronSchedule(cron=config.cron, timezone=config.timezone).get_dates(n=40, start=start))
    ours = CronSim(config.cron, start.astimezone(ZoneInfo(config.timezone)))
    assert [when.timestamp() for when in prefect] == [next(ours).timestamp() for _ in prefect]


def test_the_cli_sets_prefects_home_before_anything_loads_prefect(tmp_path):
    """Prefect reads its settings when first imported: the CLI module sets them and loads neither it nor MLflow."""
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "PREFECT_HOME"}
    probe = ("import sys, os\nimport patchline.cli\n"
             "print(sorted(m for m in ('prefect', 'mlflow') if m in sys.modules), os.environ['PREFECT_HOME'])")
    result = subprocess.run([sys.executable, "-c", probe], env={**env, "PATCHLINE_HOME": str(tmp_path)},
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]", str(tmp_path / "prefect")]


def _folder(root: Path, train: list[np.ndarray], defects: list[np.ndarray], masked: int = 0) -> Path:
    for i, pixels in enumerate(train):
        write_image(root / "train" / "good" / f"{i:03d}.png", pixels)
    for i, pixels in enumerate(defects):
        write_image(root / "test" / "good" / f"{i:03d}.png", 255 - train[i])  # not a copy: ingest refuses those
        write_image(root / "test" / "dent" / f"{i:03d}.png", pixels)
    for i in range(masked):
        mask = np.zeros(defects[i].shape[:2], np.uint8)
        mask[10:20, 5:9] = 255
        write_image(root / "ground_truth" / "dent" / f"{i:03d}_mask.png", mask)
    return root


def _noise(count: int, shape: tuple[int, ...], dtype: type = np.uint8, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype) for _ in range(count)]


def _scaled_up(count: int, original: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Noise of `original` px scaled up to `size` px, bilinear: a folder whose detail is coarser than its pixels."""
    return [np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR))
            for small in _noise(count, (original, original), seed=seed)]


_SURVEYED_FOLDERS = {
    # 6 colour goods of 150 × 120 px, defects of 160 × 130 px, one with a mask.
    "colour": (lambda: (_noise(6, (120, 150, 3)), _noise(2, (130, 160, 3), seed=1), 1),
               {"image_size": 96, "oesdn.image_size": 64, "oesdn.channels": 3, "oesdn.batch_size": 2,
                "oesdn.epochs": 100},
               ["image_size: 96 (the training images' median short side is 120 px; a line is not scaled up past its "
                "images; sizes vary from 150×120 to 160×130, each image is resized)",
                "oesdn.image_size: 64 (the default)",
                "oesdn.channels: 3 (the training images are colour)",
                "oesdn.batch_size: 2 (4 images train the networks: at least 8 steps per epoch)",
                "6 good training images, 2 of them held out for calibration; fewer than 20",
                "masks for 1 of 2 defective test images: pixel AUROC is reported"]),
    # 600 grey goods of 64 px: more than the epoch budget covers at the default cap.
    "grey": (lambda: (_noise(600, (64, 64)), _noise(2, (64, 64), seed=1), 0),
             {"image_size": 64, "oesdn.image_size": 64, "oesdn.channels": 1, "oesdn.batch_size": 16,
              "oesdn.epochs": 84},
             ["image_size: 64 (the training images' median short side is 64 px; a line is not scaled up past its "
              "images)",
              "oesdn.channels: 1 (the training images are grey)",
              "oesdn.epochs, oesdn.sdn_epochs: 84 (a budget of 40,000 image passes at 64 px over 476 images at 64 px)",
              "masks for 0 of 2 defective test images: image metrics only"]),
    # 16-bit grey goods of 48 px: below the backbones' least size, not below the networks'.
    "16-bit": (lambda: (_noise(24, (48, 48), np.uint16), _noise(2, (48, 48), np.uint16, seed=1), 0),
               {"image_size": 64, "oesdn.image_size": 48, "oesdn.channels": 1, "oesdn.batch_size": 2,
                "oesdn.smoothing_sigma": 3.0},
               ["image_size: 64 (the least PatchCore's backbones take; the training images' median short side is "
                "48 px)",
                "oesdn.image_size: 48 (the training images' median short side is 48 px)",
                "oesdn.smoothing_sigma: 3 (4 px at 64 px, the same share of the image)",
                "16-bit training images: each image is scaled to 8 bits between its own darkest and brightest "
                "pixel, so brightness is compared within an image, not between images"]),
    # Grey goods of three sizes: the median short side decides.
    "mixed sizes": (lambda: ([*_noise(3, (100, 200)), *_noise(3, (150, 300), seed=1), *_noise(3, (200, 400), seed=2)],
                             _noise(2, (150, 300), seed=3), 0),
                    {"image_size": 128, "oesdn.image_size": 64, "oesdn.channels": 1},
                    ["image_size: 128 (the training images' median short side is 150 px; a line is not scaled up "
                     "past its images; sizes vary from 200×100 to 400×200, each image is resized)"]),
    # 64 px goods scaled up from 4 px and from 8 px originals: the networks train at the detail's scale,
    # their maps smoothed over the same share of the image.
    "scaled up from 4 px": (lambda: (_scaled_up(24, 4, 64), _scaled_up(2, 4, 64, seed=1), 0),
                            {"image_size": 64, "oesdn.image_size": 16, "oesdn.smoothing_sigma": 1.0},
                            ["oesdn.image_size: 16 (scaled to 16 px and back, the training images lose 0.",
                             "oesdn.smoothing_sigma: 1 (4 px at 64 px, the same share of the image)"]),
    "scaled up from 8 px": (lambda: (_scaled_up(24, 8, 64), _scaled_up(2, 8, 64, seed=1), 0),
                            {"image_size": 64, "oesdn.image_size": 32, "oesdn.smoothing_sigma": 2.0},
                            ["oesdn.image_size: 32 (scaled to 32 px and back, the training images lose 0.",
                             "oesdn.smoothing_sigma: 2 (4 px at 64 px, the same share of the image)"]),
}


@pytest.mark.parametrize("kind", list(_SURVEYED_FOLDERS))
def test_cli_init_line_reads_the_data_and_says_why_for_each_setting(tmp_path, kind):
    """Issue 37: `init-line` looks at the images before it writes settings: not scaled up past them, the
    networks trained at the scale of the images' detail, colour for colour data, the networks' batches and
    epochs sized to the images, 16-bit data named, and one line saying why for each."""
    make, expected, reasons = _SURVEYED_FOLDERS[kind]
    root = _folder(tmp_path / "parts", *make())
    config_path = tmp_path / "parts.yaml"
    result = runner.invoke(app, ["init-line", "parts", "--mvtec-root", str(root), "--out", str(config_path)])
    assert result.exit_code == 0, result.output
    config = load_line(config_path).model_dump()
    for field, value in expected.items():
        section, _, key = field.rpartition(".")
        assert (config[section] if section else config)[key] == value, field
    for reason in reasons:
        assert reason in result.output
    assert ("16-bit" in result.output) == (kind == "16-bit")

