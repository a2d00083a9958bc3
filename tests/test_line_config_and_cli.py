"""Line configs by name or by file, and the CLI commands of the foundation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from patchline.cli import app
from patchline.storage.line_config import LineConfigError, bundled_line_files, load_line, save_line

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
    config_path = tmp_path / "widget.yaml"
    runner.invoke(app, ["init-line", "widget", "--mvtec-root", str(mvtec_root), "--out", str(config_path)])
    result = runner.invoke(app, ["ingest", str(config_path)])
    assert result.exit_code == 2
    assert "broken.png: empty file (0 bytes)" in result.output


def test_cli_init_line_rejects_a_folder_without_the_layout(tmp_path):
    result = runner.invoke(app, ["init-line", "widget", "--mvtec-root", str(tmp_path)])
    assert result.exit_code == 2 and "train/good" in result.output


def test_every_command_has_help():
    for command in ("lines", "ingest", "init-line"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output
