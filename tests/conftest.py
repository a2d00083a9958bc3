"""Shared fixtures: real (small) images on disk in the MVTec AD layout."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

# Before anything imports Prefect or MLflow: no telemetry, state under a per-session folder.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def write_image(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_line_config(path: Path, root: Path, *, name: str = "widget", image_size: int = 64,
                      coreset_ratio: float = 0.2, calibration_fraction: float = 0.25,
                      detectors: tuple[str, ...] = ("patchcore", "ae"), **oesdn) -> Path:
    """A line config for an MVTec-layout folder with networks small enough for CI; `oesdn` overrides."""
    networks = {"image_size": 32, "epochs": 2, "sdn_epochs": 2, "batch_size": 4, "ae_base_width": 8,
                "sdn_base_width": 8, "smoothing_sigma": 1.0, **oesdn}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        "name": name, "source": {"kind": "mvtec", "root": str(root)}, "image_size": image_size,
        "patchcore": {"coreset_ratio": coreset_ratio}, "oesdn": networks,
        "evaluation": {"calibration_fraction": calibration_fraction, "detectors": list(detectors)}}))
    return path


def write_elpv_line(root: Path, train: int, test_good: int,
                    test_cracked: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real mono ELPV cells in the MVTec layout: the first `train` good cells to train on, the next
    `test_good` and the first `test_cracked` of the defective ones (probability 1) to test on. Returns
    (all cells, good indices, defective indices), so a caller can take cells the line has not seen."""
    from patchline.storage.sources.elpv import elpv_arrays

    images, levels, types = elpv_arrays()
    good = np.flatnonzero((levels == 0) & (types == "mono"))
    bad = np.flatnonzero((levels == 3) & (types == "mono"))
    for i, index in enumerate(good[:train]):
        write_image(root / "train" / "good" / f"{i:03d}.png", images[index])
    for i, index in enumerate(good[train:train + test_good]):
        write_image(root / "test" / "good" / f"{i:03d}.png", images[index])
    for i, index in enumerate(bad[:test_cracked]):
        write_image(root / "test" / "crack" / f"{i:03d}.png", images[index])
    return images, good, bad


def png_claiming(width: int, height: int) -> bytes:
    """A decompression bomb's header: a few dozen bytes of valid PNG claiming `width` x `height` pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def without_root_override() -> list[str]:
    """A command prefix that makes file permissions apply: root (CI's user) reads and writes past them."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", "--bounding-set", caps, "--inh-caps", caps]


def textured(seed: int, size: int = 32, rgb: bool = False) -> np.ndarray:
    """A distinct image per seed (so no two are accidental duplicates)."""
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if rgb else (size, size)
    return rng.integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A test module's own PATCHLINE_HOME (MLflow and feature stores) and a temporary Prefect API for its flows."""
    from prefect.testing.utilities import prefect_test_harness

    folder = tmp_path_factory.mktemp("patchline-home")
    patcher = pytest.MonkeyPatch()
    patcher.setenv("PATCHLINE_HOME", str(folder))
    patcher.delenv("MLFLOW_TRACKING_URI", raising=False)
    with prefect_test_harness(server_startup_timeout=120):
        yield folder
    patcher.undo()


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """A tiny valid MVTec-layout line: 4 good train images, 2 good + 2 scratch test images with masks."""
    return write_mvtec_line(tmp_path / "line", train=4)


def write_mvtec_line(root: Path, train: int) -> Path:
    """`train` good train images, 2 good + 2 scratch test images with masks, under `root`."""
    for i in range(train):
        write_image(root / "train" / "good" / f"{i:03d}.png", textured(i))
    for i in range(2):
        write_image(root / "test" / "good" / f"{i:03d}.png", textured(100 + i))
        write_image(root / "test" / "scratch" / f"{i:03d}.png", textured(200 + i, rgb=True))
        mask = np.zeros((32, 32), np.uint8)
        mask[10:20, 5:9] = 255
        write_image(root / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root
