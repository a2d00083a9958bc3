"""patchline as a package: the built wheel, the layer contracts checked on it, and the CLI run from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import png_claiming, write_line_config

REPO = Path(__file__).resolve().parent.parent
BUNDLED_LINES = ("elpv", "elpv-mono", "elpv-poly")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(REPO)], check=True, cwd=out)
    return next(out.glob("patchline-*.whl"))


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder)
    return folder


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A new virtualenv with the wheel installed; the dependencies are this environment's packages."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # A plain path entry: .pth files there (this checkout's editable finder among them) are not run.
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
                   check=True)
    return venv


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([Path(sys.executable).with_name("lint-imports"), "--config", str(REPO / "pyproject.toml")],
                          cwd=tree, env=env, capture_output=True, text=True)


def test_wheel_holds_one_namespace_with_the_line_configs_and_the_model_entry_point(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"patchline"}
    assert {f"patchline/deployments/lines/{line}.yaml" for line in BUNDLED_LINES} <= set(names)
    # Every module of the checkout's folders is in the wheel (a sub-package missing from pyproject's list is not).
    for folder in ("models", "storage", "tasks", "flows", "deployments"):
        for module in (REPO / folder).rglob("*.py"):
            assert f"patchline/{module.relative_to(REPO)}" in names


def test_layer_contracts_hold_in_the_checkout_and_the_wheel(unpacked):
    """`make lint` runs `lint-imports` in the checkout, as a developer types it: the folders are linked into
    `patchline/`, so it sees every module there, as it does in the wheel."""
    modules = sum(name.endswith(".py") for _, _, names in os.walk(REPO / "patchline", followlinks=True) for name in names)
    assert modules > 70, "the checkout's patchline/ reaches every folder through its links"
    recipe = (REPO / "Makefile").read_text().split("\nlint:", 1)[1].splitlines()[1].strip()
    assert recipe == "$(BIN)/lint-imports"
    for result in (subprocess.run([Path(sys.executable).with_name("lint-imports")], cwd=REPO, capture_output=True,
                                  text=True), lint_imports(unpacked)):
        assert result.returncode == 0, result.stdout + result.stderr
        assert "5 kept, 0 broken" in result.stdout
        assert int(result.stdout.split("Analyzed ")[1].split()[0]) >= modules


def test_an_import_against_the_layers_breaks_its_contract(unpacked, tmp_path):
    shutil.copytree(unpacked / "patchline", tmp_path / "patchline")
    (tmp_path / "patchline" / "models" / "registry_lookup.py").write_text(
        "from patchline.storage.registry import CHAMPION\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "models import no Prefect, MLflow, Zarr or storage BROKEN" in result.stdout
    assert "patchline.models.registry_lookup -> patchline.storage.registry" in result.stdout


def test_installed_wheel_lists_lines_and_rebuilds_a_folder_from_anywhere(installed, mvtec_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PATCHLINE_HOME", "PREFECT_HOME",
                                                                           "MLFLOW_TRACKING_URI", "PYTHONPATH")}
    patchline = str(installed / "bin" / "patchline")

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)

    listed = run(patchline, "lines")
    assert listed.returncode == 0, listed.stderr
    assert all(line in listed.stdout for line in BUNDLED_LINES)
    assert "No module named 'models'" in run(str(installed / "bin" / "python"), "-c", "import models").stderr
    where = run(str(installed / "bin" / "python"), "-c", "import patchline.flows.rebuild as m; print(m.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(installed)

    config = write_line_config(tmp_path / "configs" / "widget.yaml", mvtec_root, detectors=("patchcore", "oesdn"))
    bomb = mvtec_root / "train" / "good" / "bomb.png"
    bomb.write_bytes(png_claiming(14_000, 14_000))
    refused = run(patchline, "rebuild", str(config))
    bomb.unlink()
    assert refused.returncode == 2
    last = refused.stderr.splitlines()[-2:]
    assert last[0].startswith("error: rebuild of widget failed") and "1 bad input file(s)" in last[0], refused.stderr
    assert last[1].startswith(f"  {bomb}: image too large: 14000x14000")
    assert "Traceback" not in refused.stderr and "Error logging to API" not in refused.stderr, refused.stderr
    rebuilt = run(patchline, "rebuild", str(config))
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert "widget: image AUROC patchcore" in rebuilt.stdout and "version 1 promoted to champion" in rebuilt.stdout
    assert "  rebuild: full rebuild: no champion to start from" in rebuilt.stdout, rebuilt.stdout
    again = run(patchline, "rebuild", str(config), "--force", "--full")
    assert again.returncode == 0 and "  rebuild: full rebuild: asked for (--full" in again.stdout, again.stdout
    # The default data directory is the working directory's `.patchline/`.
    assert (elsewhere / ".patchline" / "mlflow").is_dir()
