"""The same images, config and seed give the same model: two rebuilds of one line, one of them beside a
load generator that keeps every core busy, log bundles whose files have the same SHA-256 (weights,
memory bank, calibration). Before, the networks stopped at a wall-clock cap, and safetensors wrote its
header's metadata in an order that changed from process to process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow

from patchline.storage.line_config import load_line
from patchline.storage.registry import registered_model_name
from patchline.storage.tracking import configure_mlflow
from tests.conftest import write_line_config, write_mvtec_line

BURN = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass"


def bundle_digests(line: str, version: str, folder: Path) -> dict[str, str]:
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{registered_model_name(line)}/{version}",
                                                     dst_path=str(folder)))
    return json.loads(next(local.rglob("digests.json")).read_text())


def test_two_rebuilds_on_different_machine_loads_give_the_same_weights(home, tmp_path):
    from patchline.flows.rebuild import rebuild_product_line

    root = write_mvtec_line(tmp_path / "line", train=10)
    # No early stop within the budget: every epoch of the cap runs, however long it takes under load.
    config = load_line(write_line_config(tmp_path / "widget.yaml", root, name="repro", epochs=6, sdn_epochs=6,
                                         patience=6, detectors=("patchcore", "oesdn", "ae")))
    quiet = rebuild_product_line(config)
    burners = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(4)]
    try:
        busy = rebuild_product_line(config, force=True, full=True)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    configure_mlflow()
    assert (quiet.version, busy.version) == ("1", "2")
    first, second = (bundle_digests("repro", v, tmp_path / f"v{v}") for v in ("1", "2"))
    assert {"autoencoder.safetensors", "sdn.safetensors", "memory_bank.safetensors"} <= first.keys()
    assert first == second
