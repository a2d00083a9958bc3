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
# The AE trained on two threads, on 25 images of which 23 train in batches of 11: 11 and 12, never 11, 11 and 1.
TRAIN_AE = """
import hashlib, numpy as np, torch
torch.set_num_threads(2)
from patchline.models.config import OeSdnConfig
from patchline.models.oesdn.training import train_autoencoder
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (32, 32), dtype=np.uint8) for _ in range(25)]
config = OeSdnConfig(image_size=16, batch_size=11, epochs=4, patience=10)
network, _ = train_autoencoder(images, config, torch.device("cpu"))
print(hashlib.sha256(b"".join(t.numpy().tobytes() for t in network.state_dict().values())).hexdigest())
"""


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


def test_the_networks_train_to_the_same_weights_in_any_process():
    """One process and the next give the same AE bit for bit. Before, a last batch of a single image was
    trained on, and PyTorch's two-thread backward pass on one image summed in an order that changed between
    processes (one rebuild's OE-SDN stopped after 41 epochs, the next one's after 75, on the same images)."""
    digests = {subprocess.run([sys.executable, "-c", TRAIN_AE], capture_output=True, text=True, check=True,
                              timeout=300).stdout.strip() for _ in range(3)}
    assert len(digests) == 1 and len(next(iter(digests))) == 64
